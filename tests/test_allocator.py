"""The MoE layer keeps its large expert gradients out of fresh mmap pages in a plain user loop.

Each case runs in its own interpreter, since the glibc setting is process-wide and permanent.
What is checked is the mechanism, not a timing: the minor page faults of a second training
step, which are one per 4 KiB page of every freshly mapped block.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, logging, resource, sys, torch
from vitmoe.moe import MoEMlp
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
torch.manual_seed(0)
# w1 is [8, 256, 4096] fp32: 32 MiB, at glibc's largest mmap threshold.
layer = MoEMlp(256, 4096, num_experts=8, router="switch")
opt = torch.optim.SGD(layer.parameters(), lr=0.0)
x = torch.randn(2, 32, 256)
faults = []
for _ in range(6):
    opt.zero_grad()  # default set_to_none=True: each step's gradients are new tensors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer(x).square().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "grad_pages": layer.experts.w1.nbytes // 4096}))
"""


def _run(env_extra: dict) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "VITMOE_MALLOC"} | env_extra
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_expert_gradients_reuse_heap_memory_unless_opted_out():
    kept, log = _run({})
    default, log_default = _run({"VITMOE_MALLOC": "default"})
    pages = kept["grad_pages"]
    assert pages == 8192
    # Opted out: each step maps both 32 MiB gradients afresh, so every step faults about two
    # pages per gradient page.
    assert min(default["faults"][2:]) >= 1.5 * pages, default
    # Kept: once the heap has grown (two steps), a typical step reuses it and faults far less
    # than one gradient (an occasional step still lands one block on new pages).
    assert statistics.median(kept["faults"][2:]) < pages // 4, kept
    assert "glibc malloc now keeps freed memory" in log and "VITMOE_MALLOC=default opts out" in log
    assert "VITMOE_MALLOC=default: glibc returns large blocks" in log_default


def test_small_layers_leave_the_allocator_alone():
    from vitmoe import runtime

    saved = dict(runtime._state)
    runtime._state.pop("decided", None)
    try:
        runtime.before_large_cpu_tensors(runtime.LARGE_BYTES - 1)
        assert not runtime.allocator_decided()
    finally:
        runtime._state.clear()
        runtime._state.update(saved)
