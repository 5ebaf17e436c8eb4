"""``discovery.p2pd_unpack``: undoing UPX's packing of p2pd, on files built here in UPX's
layout (an NRV2E encoder of literals and matches below), and on the installed p2pd."""

from __future__ import annotations

import struct
import subprocess

import pytest

from layerchain.discovery import p2pd_unpack
from layerchain.discovery.p2pd_unpack import UnpackError, nrv2e_decompress, unpack, unpack_file


class _Bits:
    """An NRV2E (LE32) stream writer: bits MSB first in 32-bit little-endian words placed
    where the decoder will read them, bytes in between."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.word_at, self.count, self.word = 0, 0, 0

    def bit(self, b: int) -> None:
        if self.count == 0:
            self.word_at, self.count, self.word = len(self.out), 32, 0
            self.out += b"\0\0\0\0"
        self.count -= 1
        self.word |= b << self.count
        struct.pack_into("<I", self.out, self.word_at, self.word)

    def byte(self, b: int) -> None:
        self.out.append(b)

    def gamma(self, value: int) -> None:
        """The bits the decoder's offset loop reads back as ``value`` (>= 2)."""
        steps, off = [], value // 2
        last = value % 2
        while off != 1:  # off = 4 * prev + e, e in -2..1
            prev, e = (off + 2) // 4, (off + 2) % 4 - 2
            steps.append(e)
            off = prev
        for e in reversed(steps):
            self.bit((e + 2) // 2)
            self.bit(0)  # go on
            self.bit((e + 2) % 2)
        self.bit(last)
        self.bit(1)  # stop


def nrv2e(data: bytes, match_at: dict[int, tuple[int, int]]) -> bytes:
    """``data`` encoded as literals, except at ``match_at``'s positions: (offset, copies
    2..5) bytes copied from ``offset`` bytes back; then the end marker."""
    w, i = _Bits(), 0
    while i < len(data):
        if i in match_at:
            offset, copies = match_at[i]
            short = copies <= 3  # the decoder's length flag: 2-3 bytes, else 4-5
            x = (offset - 1) * 2 + (0 if short else 1)
            w.bit(0)  # not a literal
            w.gamma(x // 256 + 3)
            w.byte(x % 256)
            if short:
                w.bit(copies - 2)
            else:
                w.bit(1)
                w.bit(copies - 4)
            i += copies
            continue
        w.bit(1)
        w.byte(data[i])
        i += 1
    w.bit(0)
    w.gamma(0xFFFFFF + 3)  # offset 0xffffffff: the end
    w.byte(0xFF)
    return bytes(w.out)


def test_nrv2e_decodes_literals_matches_and_runs():
    data = b"abcabcabcab-xyzxyzz-" + bytes(300) + b"abab"
    # 3: five bytes from 3 back (overlapping their source); 15: three from 3 back; 21:
    # two zero bytes from 1 back (a run); 322: "ab" from 2 back
    packed = nrv2e(data, {3: (3, 5), 15: (3, 3), 21: (1, 2), 322: (2, 2)})
    assert nrv2e_decompress(packed, 0, len(data)) == data
    assert nrv2e_decompress(nrv2e(data, {}), 0, len(data)) == data
    with pytest.raises(UnpackError):
        nrv2e_decompress(packed, 0, len(data) + 1)  # the stream gives other than promised
    with pytest.raises(UnpackError):
        nrv2e_decompress(packed[:-3], 0, len(data))  # cut short


def elf_with_loads(loads: list[tuple[int, int]], file_size: int, shnum: int = 2) -> bytearray:
    """An ELF64 header and PT_LOAD headers (offset, size) for a file of ``file_size``."""
    header = bytearray(64 + 56 * len(loads))
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQ", header, 32, 64, file_size - 64 * shnum)  # phoff, shoff
    struct.pack_into("<HHHH", header, 54, 56, len(loads), 64, shnum)
    for i, (offset, size) in enumerate(loads):
        struct.pack_into("<IIQ", header, 64 + 56 * i, 1, 5, offset)
        struct.pack_into("<Q", header, 64 + 56 * i + 32, size)
    return header


def upx_file(original: bytes, loads: list[tuple[int, int]], filter_id: int = 0) -> bytes:
    """``original`` packed in UPX's ELF64 layout (format 22, NRV2E blocks)."""
    header_len = 64 + 56 * len(loads)
    out = bytearray(elf_with_loads([(0, 0x200)], 0x4000))[:64 + 56]  # the loader's own headers
    out += bytes(0xE8 - len(out))
    out += struct.pack("<I4sHBB", 0, b"UPX!", 0, 14, 22)  # l_info
    out += struct.pack("<III", 0, len(original), 0)  # p_info

    def block(data: bytes, ftid: int = 0) -> None:
        packed = nrv2e(data, {})
        out.extend(struct.pack("<IIBBBB", len(data), len(packed), 8, ftid, 0, 0) + packed)

    block(original[:header_len])
    where = header_len
    for offset, size in loads:
        start = max(offset, where)
        block(original[start : offset + size], filter_id)
        where = offset + size
    out += struct.pack("<II", 0, 0) + b"\0\0\0\0" + b"loader code"
    tail = original[where:]
    block(tail)
    out += b"\0\0"
    out += b"UPX!" + bytes([14, 22, 8, 7]) + struct.pack("<IIII", 0, 0, len(tail), len(nrv2e(tail, {})))
    out += bytes(12)
    return bytes(out)


def sample_program() -> tuple[bytes, list[tuple[int, int]]]:
    loads = [(0, 0x300), (0x400, 0x180), (0x600, 0x100)]  # padding between segments: zeros
    size = 0x700 + 128
    original = bytearray(size)
    original[: 64 + 56 * 3] = elf_with_loads(loads, size)
    for offset, length in loads:
        start = max(offset, 64 + 56 * 3)
        original[start : offset + length] = bytes((i * 7 + offset) % 251 for i in range(start, offset + length))
    original[0x700:] = b"section headers!" * 8
    return bytes(original), loads


def test_a_packed_program_unpacks_to_its_original_bytes(tmp_path):
    original, loads = sample_program()
    packed = upx_file(original, loads)
    assert p2pd_unpack.is_packed(packed) and not p2pd_unpack.is_packed(original)
    assert unpack(packed) == original
    path = tmp_path / "p2pd"
    path.write_bytes(packed)
    path.chmod(0o755)
    assert unpack_file(path) is True
    assert path.read_bytes() == original and path.stat().st_mode & 0o777 == 0o755
    assert unpack_file(path) is False  # idempotent: an unpacked file is left alone
    assert [p.name for p in tmp_path.iterdir()] == ["p2pd"]  # no temporary left


def test_what_is_not_undone_here_is_refused_and_left_packed(tmp_path, capsys):
    original, loads = sample_program()
    filtered = upx_file(original, loads, filter_id=0x49)
    with pytest.raises(UnpackError, match="filter"):
        unpack(filtered)
    damaged = bytearray(upx_file(original, loads))
    damaged[0x100 : 0x104] = struct.pack("<I", 999)  # the headers' block size
    with pytest.raises(UnpackError):
        unpack(bytes(damaged))
    path = tmp_path / "p2pd"
    path.write_bytes(filtered)
    assert p2pd_unpack.main([str(path)]) == 0  # install goes on; the file stays as it was
    assert path.read_bytes() == filtered
    assert "left packed" in capsys.readouterr().err


def test_the_installed_p2pd_runs():
    """hivemind's p2pd as installed (unpacked by ``make install``, or still packed) starts."""
    path = p2pd_unpack.hivemind_p2pd()
    assert path is not None and path.is_file()
    done = subprocess.run([str(path), "-h"], capture_output=True, text=True, timeout=60)
    assert "Usage of" in done.stderr
