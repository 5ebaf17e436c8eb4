"""The `layerchain` command line (typer + rich)."""
