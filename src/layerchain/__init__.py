"""layerchain: run large language models on a peer-to-peer network of ordinary devices."""

__version__ = "0.1.0"
