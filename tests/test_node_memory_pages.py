"""``node.memory``: a serving node unmaps the clean file pages only its start touched, and
never a page that is not the file's own bytes (issue 21, item 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from layerchain.node.memory import Mapping, parse_smaps

SMAPS = """\
00400000-00452000 r-xp 00000000 08:01 1234                               /usr/lib/libx.so
Size:                328 kB
Rss:                 300 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me
00652000-00653000 r--p 00052000 08:01 1234                               /usr/lib/libx.so
Rss:                   4 kB
Anonymous:             4 kB
Swap:                  0 kB
00653000-00654000 rw-p 00053000 08:01 1234                               /usr/lib/libx.so
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                1024 kB
Anonymous:          1024 kB
7f0000100000-7f0000200000 r--s 00000000 08:01 99                         /data/my model.gguf
Rss:                 512 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000200000-7f0000201000 r--p 00000000 08:01 98                         /tmp/gone (deleted)
Rss:                   4 kB
Anonymous:             0 kB
7f0000300000-7f0000301000 r--p 00000000 08:01 97                         /tmp/swapped
Rss:                   0 kB
Anonymous:             0 kB
Swap:                  4 kB
7f0000400000-7f0000401000 r--s 00000000 00:05 96                         /dev/shm/x
Rss:                   4 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
Anonymous:            12 kB
"""


def test_parse_smaps_reads_each_mapping_and_its_fields():
    maps = parse_smaps(SMAPS)
    assert [m.path for m in maps] == [
        "/usr/lib/libx.so", "/usr/lib/libx.so", "/usr/lib/libx.so", "", "/data/my model.gguf",
        "/tmp/gone (deleted)", "/tmp/swapped", "/dev/shm/x", "[stack]"]
    assert maps[0] == Mapping(0x400000, 0x452000, "r-xp", "/usr/lib/libx.so", 300, 0, 0)
    assert (maps[1].rss_kib, maps[1].anonymous_kib) == (4, 4)
    assert maps[6].swap_kib == 4
    assert parse_smaps("") == []


def test_only_clean_read_only_regular_file_mappings_are_dropped():
    clean = [m.clean_file_backed for m in parse_smaps(SMAPS)]
    # code: yes; relocated data made read-only (private pages): no; writable: no; anonymous:
    # no; a read-only file (the GGUF): yes; deleted file, swapped private page, /dev: no
    assert clean == [True, False, False, False, True, False, False, False, False]


PROBE = textwrap.dedent("""
    import ctypes, json, mmap, os, sys
    from layerchain.node.memory import drop_clean_file_pages, parse_smaps

    def rss_kib(address):
        with open("/proc/self/smaps") as f:
            for m in parse_smaps(f.read()):
                if m.start <= address < m.end:
                    return m.rss_kib
        return -1

    path, size = sys.argv[1], 4 << 20
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    fd = os.open(path, os.O_RDWR)
    shared = mmap.mmap(fd, size, access=mmap.ACCESS_READ)  # a model file: read only
    total = sum(shared[i] for i in range(0, size, 4096))  # touch every page
    # a private copy-on-write mapping, written, then made read-only (as a loader does with
    # a library's relocated data): its pages are not the file's bytes any more
    private = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    private[:4096] = b"x" * 4096
    buf = ctypes.c_char.from_buffer(private)
    address = ctypes.addressof(buf)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(address, size, mmap.PROT_READ) == 0
    with open("/proc/self/maps") as f:
        line = next(l for l in f if l.rstrip().endswith(path) and " r--s " in l)
    shared_address = int(line.split("-")[0], 16)
    before = rss_kib(shared_address)
    dropped = drop_clean_file_pages()
    after = rss_kib(shared_address)
    print(json.dumps({
        "before": before, "after": after, "dropped_mb": dropped,
        "same_bytes": sum(shared[i] for i in range(0, size, 4096)) == total,
        "private_kept": private[:4096] == b"x" * 4096 and private[4096:4100] == bytes(range(4)),
    }))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="smaps and madvise: Linux")
def test_a_fresh_process_drops_its_file_pages_and_keeps_its_own(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "blob")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["before"] >= 4096  # all 4 MiB resident once read
    assert found["after"] == 0, found  # none after the drop
    assert found["dropped_mb"] >= 4.0
    assert found["same_bytes"]  # read again from the page cache, unchanged
    assert found["private_kept"], found  # the written private page was not reverted
