"""The process settings of devices.py, each checked in a fresh interpreter (they are process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

MALLOC_PROBE = """
import ctypes
import torch
from mnist_world.core.devices import keep_freed_memory

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def allocate():  # bytes newly mmapped while a 64 MiB tensor lives, and free heap bytes once it is gone
    mapped = libc.mallinfo2().hblkhd
    block = torch.ones(64 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - mapped
    del block
    return mapped, libc.mallinfo2().fordblks

print(*allocate())
keep_freed_memory()
print(*allocate())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_serves_large_blocks_from_the_kept_heap() -> None:
    """By default glibc mmaps a 64 MiB block and unmaps it on free; after keep_freed_memory the block comes
    from the heap and stays there, free, for the next allocation."""
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, check=True)
    (mapped_before, _), (mapped_after, free_after) = (
        [int(n) for n in line.split()] for line in result.stdout.splitlines()
    )
    assert mapped_before >= 64 << 20
    assert mapped_after == 0
    assert free_after >= 64 << 20
