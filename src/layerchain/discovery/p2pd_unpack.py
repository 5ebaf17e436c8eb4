"""Unpacking hivemind's UPX-packed ``p2pd``, so its code is shared file pages, not private memory.

hivemind 1.1.12's wheel ships the libp2p daemon packed with UPX (a 9.5 MB file whose loader
unpacks the 28.8 MB program into anonymous memory at every start): each p2pd then holds all
its code as private pages, ~64 MiB PSS of a node's ~250 (docs/BENCHMARKS.md "Node memory").
Unpacked, the kernel maps the program from the file: only the pages it touches are resident,
and they are page cache, shared by every p2pd of the machine. Debian bookworm has no ``upx``
package and PyPI none either, so this module undoes the packing itself; ``make install`` runs
``python -m layerchain.discovery.p2pd_unpack`` once after installing hivemind (idempotent: an
unpacked file is left alone).

What it undoes, and nothing more (anything else is refused with ``UnpackError`` and the packed
file stays): UPX's Linux ELF64 x86-64 format (22) with NRV2E blocks (method 8, the default),
without filters (UPX's call-address filters are for x86 code it chose to filter; this file has
none). The packed file holds, after the loader's own ELF header, ``l_info`` and ``p_info``
(original size), then ``b_info`` blocks (sizes, method, filter) each followed by its data: the
original ELF and program headers, the rest of each ``PT_LOAD`` segment's file bytes in order,
an empty block; the loader; then the bytes after the last segment (the section headers) as one
more block just before the trailing ``PackHeader`` (which gives its sizes). Bytes between
segments are alignment padding, zero. The result is checked: every block decompresses to
exactly its stated size, the blocks fill the ELF header's segments exactly, the file has the
original size and its section headers lie within it.

NRV2E is UCL's (Markus Oberhumer's) LZ77 variant with an interleaved 32-bit little-endian bit
stream; ``nrv2e_decompress`` is its reference decoder (ucl ``n2e_d.c``) in Python (~25 s for
the 28.8 MB program on one core, at install time only).
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

UPX_MAGIC = b"UPX!"
FORMAT_ELF64_AMD64 = 22  # UPX_F_LINUX_ELF64_AMD
METHOD_NRV2E_LE32 = 8  # M_NRV2E_LE32
_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1


class UnpackError(Exception):
    """The file is not a packed program this module can unpack (or its data is damaged)."""


@dataclass(frozen=True)
class Block:
    """One ``b_info`` block: its data at ``offset`` in the packed file (``size_packed``
    bytes), ``size`` bytes once decompressed."""

    offset: int
    size: int
    size_packed: int
    method: int
    filter_id: int


def is_packed(data: bytes) -> bool:
    """Whether ``data`` (a file's first bytes suffice: 512) is an ELF file packed by UPX."""
    return data[:4] == _ELF_MAGIC and UPX_MAGIC in data[:512]


def nrv2e_decompress(src: bytes, start: int, size: int) -> bytes:
    """``size`` bytes decompressed from UCL NRV2E (32-bit little-endian bit buffer) data at
    ``src[start:]``; UnpackError if the stream ends elsewhere or reads out of bounds."""
    dst = bytearray()
    pos, bits, count, last_off = start, 0, 0, 1

    def bit() -> int:
        nonlocal bits, count, pos
        if count:
            count -= 1
            return (bits >> count) & 1
        (bits,) = struct.unpack_from("<I", src, pos)
        pos += 4
        count = 31
        return bits >> 31

    try:
        while True:
            while bit():  # literals
                dst.append(src[pos])
                pos += 1
            off = 1
            while True:
                off = off * 2 + bit()
                if bit():
                    break
                off = (off - 1) * 2 + bit()
            if off == 2:  # the last offset again
                off, length = last_off, bit()
            else:
                off = (off - 3) * 256 + src[pos]
                pos += 1
                if off == 0xFFFFFFFF:  # end of stream
                    break
                length = (off ^ 0xFFFFFFFF) & 1
                off = (off >> 1) + 1
                last_off = off
            if length:
                length = 1 + bit()
            elif bit():
                length = 3 + bit()
            else:
                length += 1
                while True:
                    length = length * 2 + bit()
                    if bit():
                        break
                length += 3
            length += 1 + (off > 0x500)  # bytes to copy
            at = len(dst) - off
            if at < 0:
                raise UnpackError("NRV2E stream refers before its start")
            if off >= length:
                dst += dst[at : at + length]
            else:  # overlapping: a run
                for i in range(length):
                    dst.append(dst[at + i])
    except (IndexError, struct.error):
        raise UnpackError("NRV2E stream ends early") from None
    if len(dst) != size:
        raise UnpackError(f"NRV2E block gave {len(dst)} bytes, expected {size}")
    return bytes(dst)


def _block_at(data: bytes, pos: int) -> Block:
    size, packed, method, filter_id = struct.unpack_from("<IIBB", data, pos)
    return Block(pos + 12, size, packed, method, filter_id)


def _decompress(data: bytes, block: Block) -> bytes:
    if block.filter_id:
        raise UnpackError(f"a block uses UPX filter {block.filter_id:#x}, not undone here")
    if block.size_packed == block.size:  # stored as is
        return data[block.offset : block.offset + block.size]
    if block.method != METHOD_NRV2E_LE32:
        raise UnpackError(f"UPX method {block.method} is not NRV2E ({METHOD_NRV2E_LE32})")
    return nrv2e_decompress(data, block.offset, block.size)


def _loads(header: bytes) -> list[tuple[int, int]]:
    """(file offset, file size) of each PT_LOAD segment, in order, from ELF64 headers."""
    if header[:4] != _ELF_MAGIC or header[4] != 2 or header[5] != 1:
        raise UnpackError("the packed program is not a little-endian ELF64 file")
    (phoff,) = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    if phoff + phentsize * phnum > len(header):
        raise UnpackError("the packed program's headers are truncated")
    loads = []
    for i in range(phnum):
        p_type, _flags, offset = struct.unpack_from("<IIQ", header, phoff + i * phentsize)
        (filesz,) = struct.unpack_from("<Q", header, phoff + i * phentsize + 32)
        if p_type == _PT_LOAD:
            loads.append((offset, filesz))
    if not loads or loads[0][0] != 0 or loads != sorted(loads):
        raise UnpackError("the packed program's segments are not laid out as expected")
    return loads


def unpack(data: bytes) -> bytes:
    """The original program of a UPX-packed ELF64 x86-64 file ``data``; UnpackError if it is
    not one this module can unpack, or the result does not check out."""
    if not is_packed(data):
        raise UnpackError("not a UPX-packed ELF file")
    trailer = data.rfind(UPX_MAGIC)
    if trailer < 0 or len(data) - trailer < 32:
        raise UnpackError("no UPX PackHeader at the end of the file")
    version, fmt, method = data[trailer + 4], data[trailer + 5], data[trailer + 6]
    tail_size, tail_packed = struct.unpack_from("<II", data, trailer + 16)
    if fmt != FORMAT_ELF64_AMD64 or method != METHOD_NRV2E_LE32 or version < 13:
        raise UnpackError(f"UPX format {fmt}, method {method}, version {version}: not handled")
    l_info = data.find(UPX_MAGIC, 0, 512) - 4  # l_checksum, l_magic, l_lsize, l_version, l_format
    (file_size,) = struct.unpack_from("<I", data, l_info + 16)  # p_info: p_progid, p_filesize
    first = _block_at(data, l_info + 24)
    header = _decompress(data, first)
    loads = _loads(header)
    out = bytearray(file_size)  # padding between segments stays zero
    out[: len(header)] = header
    pos, where = first.offset + first.size_packed, len(header)
    for offset, size in loads:
        start = max(offset, where)  # the first segment begins with the headers
        block = _block_at(data, pos)
        if block.size != offset + size - start:
            raise UnpackError(f"a block of {block.size} bytes for a segment of {size}")
        out[start : start + block.size] = _decompress(data, block)
        pos, where = block.offset + block.size_packed, start + block.size
    if _block_at(data, pos).size != 0:
        raise UnpackError("more blocks than segments")
    end = loads[-1][0] + loads[-1][1]
    if file_size - end != tail_size:
        raise UnpackError(f"{file_size - end} bytes after the segments, the trailer says {tail_size}")
    if tail_size:
        tail_at = data.rfind(struct.pack("<II", tail_size, tail_packed), 0, trailer)
        out[end:] = _decompress(data, _block_at(data, tail_at))
    shoff, = struct.unpack_from("<Q", out, 40)
    shentsize, shnum = struct.unpack_from("<HH", out, 58)
    if shnum and shoff + shentsize * shnum > file_size:
        raise UnpackError("the unpacked program's section headers lie past its end")
    return bytes(out)


def unpack_file(path: Path) -> bool:
    """Replace the packed program at ``path`` by its unpacked self (atomically, same mode);
    False (nothing done) if it is not packed; UnpackError if it cannot be unpacked."""
    data = path.read_bytes()
    if not is_packed(data):
        return False
    program = unpack(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(program)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def hivemind_p2pd() -> Path | None:
    """Where hivemind's p2pd binary is (None: hivemind is not installed), found without
    importing hivemind."""
    import importlib.util

    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "hivemind_cli" / "p2pd"


def main(argv: list[str] | None = None) -> int:
    """``python -m layerchain.discovery.p2pd_unpack [PATH]``: unpack PATH (default:
    hivemind's p2pd) in place if UPX-packed. Exit 0 whatever happens to a file that cannot
    be unpacked (it stays packed and works as before; the reason is printed)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else hivemind_p2pd()
    if path is None or not path.is_file():
        print(f"p2pd_unpack: no p2pd at {path}", file=sys.stderr)
        return 0
    try:
        done = unpack_file(path)
    except UnpackError as error:
        print(f"p2pd_unpack: {path} left packed: {error}", file=sys.stderr)
        return 0
    print(f"p2pd_unpack: {path} {'unpacked' if done else 'is not packed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
