"""Runs that outlive a fault: --resume auto, elastic restarts that continue the run (torchrun
--max-restarts and vitmoe train --gpu N --max-restarts), and the run lock's handover."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_SETS
from vitmoe.cli.main import main
from vitmoe.rundir import RunDirError, RunLock

# A switch model with its experts split over the 2 workers (the exchange crosses processes), 23
# steps an epoch on digits; 4 epochs leave room to kill a worker after the first checkpoint.
TRAIN = ["--dataset", "digits", "--model", "switch_vit", "--experts", "4", "--ep-size", "2", "--epochs", "4",
         "--batch", "64", "--dist-timeout", "30", "--set", "progress=false", "--set", "keep_checkpoints=4", *TINY_SETS]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _final_weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "epoch-0004", latest
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]


def _worker_pids(launcher: int) -> list[int]:
    """The training workers under `launcher` (torchrun's or vitmoe's), oldest first."""
    found = []
    for pid in _descendants(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"vitmoe" in cmd or b"multiprocessing" in cmd:
            found.append(pid)
    return found


def _run_and_kill(cmd: list[str], run: Path, pick) -> tuple[str, int]:
    """Start `cmd`; once the run has a checkpoint, SIGKILL the worker `pick(workers)` chooses; wait
    for the job to end on its own. Returns (output, the pid killed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        assert len(workers) >= 2, workers
        victim = pick(workers)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return output, victim


def _torchrun_rank0(workers: list[int]) -> int:
    """torchrun's workers carry RANK in their environment: the writer of the run, rank 0."""
    for pid in workers:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=0" in env:
            return pid
    raise AssertionError(f"no rank 0 among {workers}")


@pytest.mark.slow
def test_killed_workers_restart_and_finish_as_a_run_resumed_at_that_checkpoint(tmp_path):
    # torchrun --max-restarts 1: rank 0 (the run's writer, holding its lock) is killed after a checkpoint;
    # the agent restarts both workers with the same command line, which now continues the run.
    a = tmp_path / "torchrun"
    out, _ = _run_and_kill([*TORCHRUN, "--max-restarts", "1", "-m", "vitmoe", "train", *TRAIN, "--out", str(a)],
                           a, _torchrun_rank0)
    assert "elastic restart 1 (of at most 1) after a worker failed: continuing" in out, out[-3000:]
    assert "restart(s) left" in out  # the lost peer's line says the job goes on
    resumed = re.search(r"resumed \S+ from (epoch-\d+)", out)
    assert resumed, out[-3000:]
    assert not (a / ".vitmoe.lock").exists()  # the restarted writer took the lock and released it at the end
    restarted = _final_weights(a)

    # The same run stopped at that checkpoint and resumed by hand (`--resume`, 2 processes).
    b = tmp_path / "resumed"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(a / "config.yaml", b / "config.yaml")
    shutil.copytree(a / "checkpoints" / resumed.group(1), b / "checkpoints" / resumed.group(1))
    (b / "checkpoints" / "latest").write_text(resumed.group(1) + "\n")
    done = subprocess.run([*TORCHRUN, "-m", "vitmoe", "train", "--resume", str(b)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    by_hand = _final_weights(b)
    assert by_hand.keys() == restarted.keys()
    for k in by_hand:
        assert torch.equal(restarted[k], by_hand[k]), k

    # vitmoe's own launcher (--gpu 2 --max-restarts 1), a worker killed wherever it is: the same weights.
    c = tmp_path / "gpu2"
    out, _ = _run_and_kill([sys.executable, "-m", "vitmoe", "train", *TRAIN, "--gpu", "2", "--max-restarts", "1",
                            "--out", str(c)], c, lambda workers: workers[-1])
    assert "up to 1 restart(s)" in out and "elastic restart 1" in out, out[-3000:]
    own = _final_weights(c)
    for k in by_hand:
        assert torch.equal(own[k], by_hand[k]), k
    summary = json.loads((c / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["world_size"] == 2


def test_resume_auto_starts_then_continues(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--model", "vit", "--batch", "128", "--set", "progress=false", *TINY_SETS,
            "--resume", "auto", "--out", str(run)]
    assert main([*base, "--epochs", "1"]) == 0
    assert "--resume auto: starting" in capsys.readouterr().out
    first = (run / "metrics.jsonl").read_text()
    assert main([*base, "--epochs", "2"]) == 0  # the same command line, one epoch more: it continues
    out = capsys.readouterr().out
    assert "--resume auto: continuing" in out and "resumed" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (run / "metrics.jsonl").read_text().startswith(first)


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.depth=3"], "holds a run whose model.depth differs from this command's"),
    (["--lr", "0.1", "--set", "model.num_heads=4"], "holds a run whose lr, model.num_heads differ"),
])
def test_resume_auto_refuses_a_run_of_another_configuration(tmp_path, capsys, argv, message, no_data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: vit\ndataset: digits\nepochs: 3\nmodel_config: {embed_dim: 16, depth: 2, "
                                     "num_heads: 2, mlp_hidden: 32, head: linear}\n")
    (run / "metrics.jsonl").write_text("")
    base = ["train", "--dataset", "digits", "--model", "vit", *TINY_SETS, "--resume", "auto", "--out", str(run)]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitmoe: error: --resume auto: ") and message in err and err.count("\n") == 0, err


def test_resume_auto_needs_out(capsys, no_data):
    assert main(["train", "--dataset", "digits", "--resume", "auto", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("vitmoe: error: --resume auto continues or starts the run in --out: "
                                               "give --out RUN_DIR (a run directory named auto is --resume ./auto)")


def _hold(run_dir, seconds, ready):
    lock = RunLock(run_dir).acquire()  # noqa: F841 - held until the process dies
    Path(ready).touch()
    time.sleep(seconds)
    os._exit(0)  # dies holding it: the OS drops the lock, nothing removes the file


def test_a_restarted_writer_waits_for_the_dying_one(tmp_path):
    import multiprocessing as mp

    run, ready = tmp_path / "run", tmp_path / "ready"
    holder = mp.get_context("spawn").Process(target=_hold, args=(str(run), 6.0, str(ready)))
    holder.start()
    try:
        while not ready.exists():
            assert holder.is_alive()
            time.sleep(0.02)
        with pytest.raises(RunDirError, match=rf"in use by another vitmoe process \(pid {holder.pid} "):
            RunLock(run).acquire()  # a first start fails at once, naming the holder
        with pytest.raises(RunDirError, match=r"\(waited 0.2s for it to stop\)"):
            RunLock(run).acquire(wait_s=0.2)
        lock = RunLock(run).acquire(wait_s=30)  # a restart takes over once the holder is gone
        holder.join(10)
        assert holder.exitcode == 0
        assert json.loads((run / ".vitmoe.lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.join(10)
