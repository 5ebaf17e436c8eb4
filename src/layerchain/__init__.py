"""layerchain: run large language models on a peer-to-peer network of ordinary devices.

Importing it has no side effect on the process: the OpenMP setting the ``layerchain``
command applies to its own processes is ``layerchain.openmp.tune_openmp``.
"""

__version__ = "0.1.0"
