"""`python -m layerchain` runs the CLI."""

from layerchain.cli.main import main

main()
