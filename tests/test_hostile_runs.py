"""A run directory nobody can break: one writer per run (a lock that dies with its holder), --out
never takes over a folder vitmoe did not make, readers of a running run, and multi-process
failures that name the rank at fault in one line."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_SETS

import vitmoe.data

from vitmoe import rundir
from vitmoe.cli.main import main
from vitmoe.rundir import RunDirError, RunLock, check_run_dir, lock_holder

DIGITS = ["--dataset", "digits", "--noswitch", "--batch", "128", *TINY_SETS]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitmoe: error: "), err
    return lines[0]


def _hold_lock(run: Path) -> subprocess.Popen:
    """A process holding `run`'s lock until it is killed."""
    code = "import sys, time; from vitmoe.rundir import RunLock; l = RunLock(sys.argv[1]).acquire(); " \
           "print('locked', flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def no_workers(monkeypatch):
    import torch.distributed.launcher.api as api

    def boom(*a, **k):
        raise AssertionError("workers were started before the error")

    monkeypatch.setattr(api, "elastic_launch", boom)


# -- 1. two writers, one run ---------------------------------------------------------------------------
def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        assert json.loads(lock_holder(run))["pid"] == holder.pid
        with pytest.raises(RunDirError, match=f"is in use by another vitmoe process \\(pid {holder.pid} on "):
            RunLock(run).acquire()
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            check_run_dir(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    # The OS dropped the lock with its process: the file it left is not a lock.
    assert (run / rundir.LOCK_FILE).is_file() and lock_holder(run) is None
    check_run_dir(run)
    with RunLock(run) as lock:
        assert lock.held and json.loads(lock_holder(run))["pid"] == os.getpid()
        # flock belongs to an open file description: a second open in this very process is refused too.
        with pytest.raises(RunDirError, match=f"pid {os.getpid()} on "):
            RunLock(run).acquire()
    assert not (run / rundir.LOCK_FILE).exists() and lock_holder(run) is None  # a clean end leaves nothing


@pytest.mark.slow
def test_a_second_writer_of_a_running_run_fails_at_once_naming_the_pid(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    # keep_checkpoints: eval below must not meet a checkpoint pruned between finding and opening it
    # (a reader's race with prune, not the writer's lock).
    first = subprocess.Popen([sys.executable, "-m", "vitmoe", "train", *DIGITS, "--epochs", "1000", "--out", str(run),
                              "--set", "keep_checkpoints=10000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        assert json.loads(lock_holder(run))["pid"] == first.pid
        config = (run / rundir.CONFIG_FILE).read_bytes()
        for argv in (["train", *DIGITS, "--epochs", "2", "--out", str(run)],  # a fresh run on its --out
                     ["train", "--resume", str(run)],  # resuming the running run
                     ["train", *DIGITS, "--epochs", "2", "--out", str(run), "--force"]):
            loaded = []
            with monkeypatch.context() as m:  # at once: before any data is loaded
                m.setattr(vitmoe.data, "load_dataset", lambda *a, **k: loaded.append(a))
                assert main(argv) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert line.startswith(f"vitmoe: error: run directory {run} is in use by another vitmoe process "
                                   f"(pid {first.pid} on "), line
            assert loaded == []
        assert (run / rundir.CONFIG_FILE).read_bytes() == config
        # Readers need no lock: report and eval of the running run read its files whole.
        assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
        assert "vit" in capsys.readouterr().out
        assert main(["eval", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 359
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # Killed: the lock went with it, and the run resumes.
    assert lock_holder(run) is None
    epochs = [r["epoch"] for r in rundir.read_metrics(run / rundir.METRICS_FILE)]
    assert epochs == list(range(1, len(epochs) + 1))
    last = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert main(["train", "--resume", str(run), "--epochs", str(last + 1)]) == 0
    epochs = [r["epoch"] for r in rundir.read_metrics(run / rundir.METRICS_FILE)]
    assert epochs == list(range(1, last + 2)) and not (run / rundir.LOCK_FILE).exists()


def test_report_of_a_run_with_a_half_written_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *DIGITS, "--epochs", "2", "--out", str(run)]) == 0
    rows = rundir.read_metrics(run / rundir.METRICS_FILE)
    with open(run / rundir.METRICS_FILE, "a") as f:  # the writer is in the middle of epoch 3's line
        f.write(json.dumps({**rows[-1], "epoch": 3, "test_acc": 99.0})[:40])
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert f"{run / rundir.METRICS_FILE}:3: ignoring truncated last line" in err
    best = max(r["test_acc"] for r in rows)
    assert f"{best:.2f}" in out and "99.00" not in out
    assert [r["epoch"] for r in rundir.read_metrics(run / rundir.METRICS_FILE)] == [1, 2]


# -- 2. --out never takes over a folder ------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_out_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "config.yaml").write_text("model: my own model\nlayers: 3\n")
    before = _listing(mine)
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(mine)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"vitmoe: error: --out {mine} is not empty and is not a vitmoe run directory (it holds config.yaml, "
        f"notes.txt); choose another --out, or add --force to write the run beside those files")
    # --force adds a run beside other files, but never replaces one vitmoe did not write.
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(mine), "--force"]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"vitmoe: error: --out {mine} already holds config.yaml, not written by vitmoe; --force adds a run "
        f"beside other files but never replaces them: choose another --out")
    assert _listing(mine) == before
    (mine / "config.yaml").unlink()
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(mine), "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "notes.txt",
                                                     "summary.json"]
    # Now it is a run: a fresh run there is refused, --resume continues it.
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(mine), "--force"]) == 2
    assert "already holds a run; resume it with --resume" in capsys.readouterr().err


def test_which_folders_out_accepts(tmp_path, monkeypatch):
    with pytest.raises(RunDirError, match="^--out / is the filesystem root"):
        check_run_dir("/", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_dir(empty)
    check_run_dir(tmp_path / "new" / "deeper")
    (empty / rundir.LAUNCHER_LOG).write_text("an earlier failed launch\n")
    (empty / rundir.LOCK_FILE).write_text("")
    check_run_dir(empty)  # only vitmoe's leftovers: still empty
    (empty / "x").write_text("")
    with pytest.raises(RunDirError, match=r"\(it holds x\);"):
        check_run_dir(empty, resume=True)
    # A run killed before its first checkpoint is vitmoe's: a new run may start over there.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / rundir.CONFIG_FILE).write_text("model: vit\ndataset: digits\n")
    (killed / rundir.METRICS_FILE).write_text("")
    assert rundir.is_run_dir(killed) and not rundir.is_run_dir(empty)
    check_run_dir(killed)
    # `vitmoe train --out /` stops before anything is loaded or written.
    from vitmoe.training.loop.trainer import Trainer

    monkeypatch.setattr(Trainer, "setup", lambda self: pytest.fail("setup reached with --out /"))
    assert main(["train", *DIGITS, "--epochs", "1", "--out", "/", "--force"]) == 2


def test_multiprocess_out_checks_come_before_any_worker(tmp_path, no_workers, capfd):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = ["train", *DIGITS, "--gpu", "2", "--device", "cpu", "--epochs", "1"]
    assert main([*argv, "--out", str(mine)]) == 2
    assert "is not a vitmoe run directory (it holds notes.txt)" in _one_error_line(capfd.readouterr().err)
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        assert main([*argv, "--out", str(run)]) == 2
        line = _one_error_line(capfd.readouterr().err)
        assert f"run directory {run} is in use by another vitmoe process (pid {holder.pid} on " in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert list(run.iterdir()) == [run / rundir.LOCK_FILE]


# -- 3. multi-process failures -----------------------------------------------------------------------------
# Faults in spawned workers: a sitecustomize on PYTHONPATH wraps the training step in every process.
FAULT_HOOK = textwrap.dedent('''
    import json, os, time
    _spec = os.environ.get("VITMOE_TEST_FAULT")  # "RANK:CALL:nan|raise|sleep=S"
    if _spec:
        import vitmoe.training.loop.step as _step
        from vitmoe.rundir import lock_holder
        _rank, _call, _action = _spec.split(":")
        _orig = _step.TrainStep.__call__

        def _hooked(self, x, y, scale):
            self._fault_calls = getattr(self, "_fault_calls", 0) + 1
            if os.environ.get("RANK") == _rank and self._fault_calls == int(_call):
                if _action == "nan":
                    x = x * float("nan")
                elif _action == "raise":
                    raise RuntimeError("injected bug")
                else:
                    with open(os.environ["VITMOE_TEST_FAULT_LOG"], "w") as f:
                        json.dump({"holder": lock_holder(os.environ["VITMOE_TEST_FAULT_OUT"]), "pid": os.getpid(),
                                   "ppid": os.getppid()}, f)
                    time.sleep(float(_action.split("=")[1]))
            return _orig(self, x, y, scale)

        _step.TrainStep.__call__ = _hooked
''')


@pytest.fixture
def fault(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))

    def set_fault(spec: str, out: Path | None = None) -> Path:
        monkeypatch.setenv("VITMOE_TEST_FAULT", spec)
        log = tmp_path / "fault.json"
        monkeypatch.setenv("VITMOE_TEST_FAULT_LOG", str(log))
        monkeypatch.setenv("VITMOE_TEST_FAULT_OUT", str(out or ""))
        return log
    return set_fault


MP = ["train", *DIGITS, "--gpu", "2", "--device", "cpu", "--lr", "1e-3"]


@pytest.mark.slow
def test_multiprocess_nan_exits_3_naming_the_first_bad_step(tmp_path, fault, capfd):
    """Rank 1's loss goes NaN at step 15 (epoch 2; 12 steps per epoch), rank 0's at 16: every rank
    stops at the same check, and the line is rank 0's (it names the checkpoint). A run directory
    whose name holds 'gloo' must not turn the NaN into a 'lost peers' crash."""
    run = tmp_path / "gloo-run"
    fault("1:15:nan")
    assert main([*MP, "--epochs", "3", "--out", str(run), "--dist-timeout", "20"]) == 3
    out, err = capfd.readouterr()
    assert _one_error_line(err) == (
        "vitmoe: error: non-finite loss (NaN/inf) at epoch 2, step 15 (loss checked at the end of the epoch); "
        f"stopped without saving this state; the last good checkpoint is {run / 'checkpoints' / 'epoch-0001'} "
        f"(loadable; resume with --resume {run}). Lower --lr or enable grad_clip.")
    assert "Traceback" not in out and not (run / rundir.LAUNCHER_LOG).exists()
    assert lock_holder(run) is None


@pytest.mark.slow
def test_a_stalled_rank_is_named_not_the_rank_that_waited_for_it(tmp_path, fault, capfd):
    run = tmp_path / "run"
    seen = fault("1:3:sleep=120", out=run)
    assert main([*MP, "--epochs", "2", "--out", str(run), "--dist-timeout", "10"]) == 4
    # The stalled rank was stopped in its 120 s sleep, not waited for: its process is gone.
    with pytest.raises(ProcessLookupError):
        os.kill(json.loads(seen.read_text())["pid"], 0)
    out, err = capfd.readouterr()
    log = run / rundir.LAUNCHER_LOG
    assert _one_error_line(err) == (
        "vitmoe: error: worker rank 1 stalled: rank 0 waited dist_timeout_s=10s for it in epoch 1 after step 2 and "
        f"gave up; the workers were stopped. Details: {log}")
    assert "Traceback" not in out + err and "SIGTERM" not in out + err
    text = log.read_text()
    assert "Timed out" in text and "Traceback" in text and "no record from rank(s) 1" in text
    # While it ran, rank 0 (neither the stalled rank 1 nor the launcher) held the run directory.
    stalled = json.loads(seen.read_text())
    holder_pid = json.loads(stalled["holder"])["pid"]
    assert holder_pid not in (stalled["pid"], stalled["ppid"], os.getpid())
    assert lock_holder(run) is None


@pytest.mark.slow
def test_a_worker_crash_is_one_line_and_verbose_shows_its_traceback(tmp_path, fault, capfd):
    run = tmp_path / "run"
    fault("1:1:raise")
    assert main([*MP, "--epochs", "1", "--out", str(run), "--dist-timeout", "20", "--verbose"]) == 4
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert lines[-1] == (f"vitmoe: error: worker rank 1 failed: RuntimeError: injected bug; the other workers "
                         f"were stopped. Details: {run / rundir.LAUNCHER_LOG}")
    assert "Traceback" in err and 'raise RuntimeError("injected bug")' in err  # --verbose: on screen too
    assert "RuntimeError: injected bug" in (run / rundir.LAUNCHER_LOG).read_text()
