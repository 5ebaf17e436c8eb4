"""The names of the weight forms (``--dtype``), without torch: configs and the CLI check a
name before anything loads (``import layerchain.cli.main`` stays torch-free,
``tests/test_startup.py``). ``quant`` implements the forms and re-exports ``DTYPES``."""

from layerchain.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "int4")  # --dtype choices


def check_dtype(name: str) -> str:
    """``name`` if it is one of ``DTYPES``, else ConfigError listing them."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}")
    return name
