"""Process-wide CPU settings that the `vitmoe` command (not the library) applies to itself.

glibc serves allocations above 32 MB with fresh `mmap` pages and returns them on free, so a
tensor that size allocated every step (64 experts' stacked weight gradient at d 300 is 78 MB)
pays page faults and kernel zeroing each time: on a 2-core machine that doubled the cost of
an expert weight gradient. Keeping freed memory in the heap lets the next step reuse it, as
the caching allocators PyTorch recommends for CPU training (jemalloc, tcmalloc) do.
Set VITMOE_MALLOC=default to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no trimming).

    Returns whether the setting was applied (Linux with glibc, not disabled by VITMOE_MALLOC).
    The cost: the process keeps its peak heap size until it exits.
    """
    if os.environ.get("VITMOE_MALLOC", "keep") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
