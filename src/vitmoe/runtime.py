"""Keeping freed memory in the process heap, so that large per-step CPU tensors do not page-fault.

glibc serves allocations above 32 MB (its largest mmap threshold on 64-bit) with fresh `mmap`
pages and returns them on free, so a tensor that size allocated every step pays page faults
and kernel zeroing each time. An MoE layer makes such tensors every step from a few experts
up: the stacked `[E, D, H]` weight gradient (64 experts at d 300, hidden 1024: 78 MB), and the
optimizer's temporaries of the same size. On the 2-core machine of BENCHMARKS.md writing fresh
pages ran at about 1 GB/s against 30 GB/s into reused memory, which made the 64-expert layer's
forward+backward 3.1x the dense layer's instead of 1.4x.

So the first expert layer whose stacked weights reach that size, when it allocates them on
the CPU (or at its first CPU training step, if it was built elsewhere), calls
`keep_freed_memory()` (glibc only) and says so on the "vitmoe" logger: the heap then keeps
freed blocks for the next step, as the caching allocators PyTorch recommends for CPU training
(jemalloc, tcmalloc) do. The cost: the process keeps its peak heap size until it exits. Opt
out with the environment variable VITMOE_MALLOC=default (read when the first such step runs),
or call `keep_freed_memory()` yourself to apply it up front. Applying it before the weights
are allocated matters too: with the weights in mmap'd blocks rather than the heap the same
64-expert step measured 146 ms against 117 ms. The alternatives measured worse:
a reused gradient buffer cannot help the optimizer's temporaries, and `torch._grouped_mm` has
no `out=` to write the gradient into one without an extra 78 MB copy per weight.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

LARGE_BYTES = 32 * 2**20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: blocks at least this large always get fresh pages."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state: dict[str, bool] = {}

log = logging.getLogger("vitmoe")


def opted_out() -> bool:
    return os.environ.get("VITMOE_MALLOC", "keep") == "default"


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no trimming).

    Returns whether the setting is in force (Linux with glibc, not disabled by VITMOE_MALLOC).
    Applying it twice is harmless.
    """
    if opted_out() or not sys.platform.startswith("linux"):
        return False
    if "kept" not in _state:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            _state["kept"] = False
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _state["kept"] = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _state["kept"]


def before_large_cpu_tensors(nbytes: int) -> None:
    """Called by the expert layers before allocating, or training with, CPU expert tensors of
    `nbytes` each: applies `keep_freed_memory` once, the first time that reaches LARGE_BYTES."""
    if "decided" in _state or nbytes < LARGE_BYTES:
        return
    _state["decided"] = True
    if opted_out():
        log.info("vitmoe: VITMOE_MALLOC=default: glibc returns large blocks to the OS after each use "
                 "(expert gradients of %d MB will page-fault every step)", nbytes // 2**20)
    elif keep_freed_memory():
        log.info("vitmoe: expert tensors of %d MB: glibc malloc now keeps freed memory for reuse "
                 "(see vitmoe.runtime; VITMOE_MALLOC=default opts out)", nbytes // 2**20)


def allocator_decided() -> bool:
    return "decided" in _state
