# Types of the parts of msgpack (1.x) that layerchain uses; msgpack ships no type hints.
# mypy reads this through pyproject's `mypy_path`; nothing imports it at run time.
from collections.abc import Callable
from typing import Any

version: tuple[int, int, int]

class UnpackException(Exception): ...
class UnpackValueError(UnpackException, ValueError): ...
class ExtraData(UnpackValueError): ...

class Packer:
    def __init__(
        self,
        *,
        default: Callable[[Any], Any] | None = ...,
        use_single_float: bool = ...,
        autoreset: bool = ...,
        use_bin_type: bool = ...,
        strict_types: bool = ...,
        datetime: bool = ...,
        unicode_errors: str | None = ...,
    ) -> None: ...
    def pack(self, obj: object) -> bytes: ...

def packb(o: object, **kwargs: Any) -> bytes: ...
def unpackb(packed: bytes | bytearray | memoryview, **kwargs: Any) -> Any: ...
