"""Multi-node rendezvous for real: two torchrun agents (two "nodes" on this machine, c10d on
127.0.0.1) run README's two-node command in a cheap form (same torchrun flags, one process per
node, a tiny switch model on digits with its experts split across the nodes)."""
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import free_port
from test_readme import COMMANDS

# Aux losses are per rank (as in Switch/GShard), not of the global batch: off, so 2 ranks = 1 process.
TINY = ["--dataset", "digits", "--batch", "64", "--set", "progress=false", "--set", "log_every=0",
        "--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.num_heads=2",
        "--set", "model.mlp_hidden=16", "--set", "model.head_hidden=16", "--set", "model.moe.balance_loss_weight=0",
        "--set", "model.moe.z_loss_weight=0"]
README_TWO_NODES = next(c for c in COMMANDS if "--nnodes=2" in c and c.startswith("torchrun"))


def _cheap(command: str, port: int, out: Path, extra: list[str]) -> list[str]:
    """README's two-node command with 1 process per node, this machine as HOST0, and a tiny run: the
    torchrun flags stay as written."""
    swaps = {"--nproc_per_node=8": "--nproc_per_node=1", "HOST0:29500": f"127.0.0.1:{port}",
             "--config configs/switch_vit_cifar10.yaml --experts 64 --ep-size 8 --out runs/sw64":
                 f"--model switch_vit --experts 4 --ep-size 2 --out {out}"}
    for old, new in swaps.items():
        assert old in command, f"README's two-node command changed ({old!r} is gone): {command}"
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:], *TINY, *extra]


def _agents(cmd: list[str], port: int) -> list[subprocess.Popen]:
    """Node 0 (it hosts the c10d rendezvous store on `port`, as HOST0 does), then node 1."""
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "node 0 did not open its rendezvous store"
            time.sleep(0.1)
    return [first, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]


def _node(pid: int) -> list[int]:
    """An agent and every process under it (torchrun starts each worker in a session of its own)."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid] + [d for k in kids for d in _node(k)]


def _signal_node(agent: subprocess.Popen, sig) -> None:
    for pid in _node(agent.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(procs) -> None:
    for p in procs:
        _signal_node(p, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        p.wait()


@pytest.mark.slow
def test_two_nodes_with_experts_split_across_them_equal_one_process(tmp_path):
    out, port = tmp_path / "two-nodes", free_port()
    agents = _agents(_cheap(README_TWO_NODES, port, out, ["--epochs", "1"]), port)
    try:
        outputs = [p.communicate(timeout=240)[0] for p in agents]
    finally:
        _stop(agents)
    assert [p.returncode for p in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    single = tmp_path / "one-process"
    done = subprocess.run([sys.executable, "-m", "vitmoe", "train", "--model", "switch_vit", "--experts", "4",
                           "--epochs", "1", "--out", str(single), *TINY], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    two, one = (load_file(str(r / "checkpoints" / "epoch-0001" / "model.safetensors")) for r in (out, single))
    assert two.keys() == one.keys()
    for k in one:  # float32 sums in another order: ~1e-6 apart after 23 AdamW steps
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5, msg=k)
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_node_ends_the_other_within_the_dist_timeout(tmp_path, fault):
    # killed: the node's processes are gone (its sockets close); frozen: they stop answering (SIGSTOP,
    # a node cut off the network) and the survivor gives up after --dist-timeout.
    timeout_s = 10
    out, port = tmp_path / "run", free_port()
    agents = _agents(_cheap(README_TWO_NODES, port, out, ["--epochs", "200", "--dist-timeout", str(timeout_s)]), port)
    survivor, lost = agents  # node 1 is lost: node 0 holds the rendezvous (when HOST0 goes, torchrun itself fails)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").exists():
            assert all(p.poll() is None for p in agents), "\n".join(p.stdout.read()[-2000:] for p in agents if p.poll() is not None)
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        _signal_node(lost, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        output, _ = survivor.communicate(timeout=timeout_s + 60)
        took = time.monotonic() - t0
    finally:
        _stop(agents)
    assert survivor.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("vitmoe: error:")]
    assert len(errors) == 1, output[-3000:]
    assert "lost its peers" in errors[0] and f"dist_timeout_s={timeout_s}s" in errors[0], errors[0]
    # The worker gave up within the timeout (plus the agent's own shutdown).
    assert took < timeout_s + 45, f"the surviving node took {took:.0f}s to fail"
    print(f"{fault}: surviving node failed {took:.1f}s after the fault: {errors[0][:160]}")
