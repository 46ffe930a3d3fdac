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


PROBE = "import vitmoe.runtime as r; print(r.tcmalloc_loaded(), r.os.environ.get('LD_PRELOAD', ''))"
REEXEC = ("import sys; from vitmoe.runtime import reexec_with_tcmalloc; "
          f"reexec_with_tcmalloc([sys.executable, '-c', {PROBE!r}]); print('not re-executed')")


def _reexec(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VITMOE_MALLOC", "LD_PRELOAD")} | env_extra
    proc = subprocess.run([sys.executable, "-c", REEXEC], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is the Linux loader's")
def test_reexec_starts_the_program_again_on_tcmalloc_unless_opted_out():
    from vitmoe.runtime import find_tcmalloc

    path = find_tcmalloc()
    if path is None:
        # Without the library nothing happens: the caller goes on in the same process.
        assert _reexec({}) == "not re-executed"
        pytest.skip("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    loaded, preload = _reexec({}).split(" ", 1)
    assert loaded == "True" and preload == path
    # An LD_PRELOAD the user set is kept, after ours.
    assert _reexec({"LD_PRELOAD": "/nonexistent/libx.so"}).split(" ", 1)[1] == f"{path} /nonexistent/libx.so"
    assert _reexec({"VITMOE_MALLOC": "default"}) == "not re-executed"
    # The re-executed program does not exec again (a library that failed to preload cannot loop).
    assert _reexec({"VITMOE_ALLOCATOR_REEXEC": "1"}) == "not re-executed"


@pytest.mark.parametrize("command, reexec", [
    ("train", True), ("sweep", True), ("demo", True), ("eval", True), ("analyze", True),
    ("info", False), ("report", False), ("merge", False), ("export", False),
])
def test_only_the_long_running_commands_started_as_programs_reexec(monkeypatch, capsys, command, reexec):
    from vitmoe import runtime
    from vitmoe.cli import main as cli_main

    calls = []

    def fake(cmd):
        calls.append(list(cmd))
        raise SystemExit(0)  # the real one does not return when it re-executes

    monkeypatch.setattr(runtime, "reexec_with_tcmalloc", fake)
    monkeypatch.setattr(sys, "argv", ["vitmoe", command, "--help"])
    with pytest.raises(SystemExit):  # the fake exec, or argparse after printing the help
        cli_main.main()
    assert calls == ([[sys.executable, "-m", "vitmoe", command, "--help"]] if reexec else [])
    assert ("usage: vitmoe " in capsys.readouterr().out) is not reexec
    # Called from Python with an argv, main never re-executes the caller's process.
    with pytest.raises(SystemExit):
        cli_main.main([command, "--help"])
    assert len(calls) == int(reexec)
