"""The CPU allocator: large per-step tensors must not page-fault, and freed memory must be reused.

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

That setting stops the page faults of the largest blocks but not all of glibc's: a training
step of an MoE model mixes blocks of tens of MB with temporaries whose sizes follow the routing.
A 16-expert d-300 bf16 step (benchmarks/bench_steps.py) still faulted 15k pages a step with 2.3
GB resident (25k and 2.9 GB before the experts rounded their row counts); tcmalloc, the
allocator PyTorch's CPU performance guide recommends, reuses freed memory per size class: under
500 faults, 1.4 GB, and 4-5 % less time a step (BENCHMARKS.md s.0). An allocator can only be
chosen when a process starts, so `vitmoe`'s training commands re-execute themselves once with
tcmalloc preloaded when the system has it (Debian/Ubuntu: libtcmalloc-minimal4; see
`reexec_with_tcmalloc`); a user's own script can start under `LD_PRELOAD=<path of
libtcmalloc_minimal.so.4>` for the same effect. VITMOE_MALLOC=default opts out of both.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Sequence

LARGE_BYTES = 32 * 2**20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: blocks at least this large always get fresh pages."""

TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
"""Library names searched for tcmalloc (the minimal build has no heap profiler, and is what
Debian's libtcmalloc-minimal4 and Ubuntu ship)."""
_TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/lib")
_REEXEC_MARK = "VITMOE_ALLOCATOR_REEXEC"
"""Set in the re-executed process, so a library that failed to preload cannot cause a second exec."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state: dict[str, bool] = {}

log = logging.getLogger("vitmoe")


def opted_out() -> bool:
    return os.environ.get("VITMOE_MALLOC", "keep") == "default"


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (preloaded, or linked by whoever started Python)."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def find_tcmalloc() -> str | None:
    """Path of the system's tcmalloc shared library, or None."""
    for name in TCMALLOC:
        for directory in _TCMALLOC_DIRS:
            path = os.path.join(directory, f"lib{name}.so.4")
            if os.path.exists(path):
                return path
    return None


def reexec_with_tcmalloc(command: Sequence[str]) -> None:
    """Replace this process by `command` (argv, its first item the program) started with tcmalloc
    preloaded, when that is possible and useful: Linux, not opted out (VITMOE_MALLOC=default), not
    already on tcmalloc or re-executed, and the library installed. Otherwise return and change
    nothing. Only whole programs call this (the `vitmoe` command): it must run before any thread
    or file is open that the new image would lose."""
    if (opted_out() or not sys.platform.startswith("linux") or os.environ.get(_REEXEC_MARK)
            or tcmalloc_loaded()):
        return
    path = find_tcmalloc()
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{path} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else path
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], list(command), env)


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no trimming).

    Returns whether the setting is in force (Linux with glibc, not disabled by VITMOE_MALLOC).
    Applying it twice is harmless.
    """
    if opted_out() or not sys.platform.startswith("linux"):
        return False
    if tcmalloc_loaded():
        return False  # glibc's malloc is not the one in use
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
    if tcmalloc_loaded():
        log.info("vitmoe: expert tensors of %d MB: the CPU allocator is tcmalloc (freed memory is "
                 "reused; see vitmoe.runtime)", nbytes // 2**20)
    elif opted_out():
        log.info("vitmoe: VITMOE_MALLOC=default: glibc returns large blocks to the OS after each use "
                 "(expert gradients of %d MB will page-fault every step)", nbytes // 2**20)
    elif keep_freed_memory():
        log.info("vitmoe: expert tensors of %d MB: glibc malloc now keeps freed memory for reuse "
                 "(see vitmoe.runtime; VITMOE_MALLOC=default opts out)", nbytes // 2**20)


def allocator_decided() -> bool:
    return "decided" in _state
