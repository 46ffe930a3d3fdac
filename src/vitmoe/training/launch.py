"""Multi-process training on torch.distributed.

* `vitmoe train --gpu N` starts N workers on this machine through PyTorch's elastic launcher
  (the engine behind torchrun): one per GPU with NCCL, or N CPU processes with gloo.
* `torchrun [--nnodes ... --rdzv-endpoint ...] -m vitmoe train ...` starts the workers itself;
  each one sees RANK/WORLD_SIZE/LOCAL_RANK in its environment and trains directly.

Every worker builds a DistContext and runs the same Trainer; only rank 0 writes the run
directory (holding its lock, vitmoe.rundir) and prints. A worker that dies makes the launcher
stop the others; a worker stuck in a collective fails after `dist_timeout_s` instead of hanging.
With `max_restarts` K (torchrun's --max-restarts, or `vitmoe train --gpu N --max-restarts K`) the
launcher then starts them all again, up to K times, and they continue the run from its newest
verified checkpoint (`restart`: which run, the lock handover, each attempt's own store keys).

`launch` first checks in this process what can fail early (the dataset's files, the run
directory: in use, an existing run, a folder that is not vitmoe's), so such errors are one line
before any worker starts. A worker that fails anyway leaves a record of its error (one line, its
traceback, where it was). The parent turns them into one line for the user:

* a rank's own error: bad input (exit status 2), a non-finite loss (3; every rank stops at the
  same step, rank 0's line names the last checkpoint), a crash (4);
* no rank failed on its own: the rank that died without a word (its peers lost the connection,
  or the launcher saw its exit), or the rank that stalled (its peers timed out waiting for it,
  while it neither failed nor exited) is named, not the healthy rank that gave up waiting (4).

The launcher's logging and the workers' tracebacks go to RUN/launcher.log (a temporary file when
the run directory is not there or not ours), named in the error line; `verbose` shows them on
screen as well. `--resume` is suggested only when a checkpoint exists.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

import torch

from ..models import ConfigError
from ..rundir import LAUNCHER_LOG
from ..rundir import RunDirError, RunLock, check_run_dir
from .config.model import check_ep_size
from .config.spec import default_out, resolve
from .config.train_config import TrainConfig


# Messages of collectives whose peer is gone (gloo, NCCL, the c10d store).
_PEER_FAILURE_HINTS = ("Connection closed", "Connection reset", "timed out", "Timed out", "Broken pipe",
                       "NCCL", "gloo")
# Loggers of the elastic launcher and of torch.multiprocessing (its 'Terminating process' notes).
_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


class WorkerFailedError(RuntimeError):
    """A worker process died or failed; the others were stopped."""


class WorkerUserError(ValueError):
    """A worker stopped on an error that is the user's to fix (bad value, missing or broken data, run
    directory in use); the message is the worker's own one line."""


def _resume_hint(out: str | None) -> str:
    """`Resume ... with: vitmoe train --resume OUT` when OUT holds a complete checkpoint, else ''."""
    from .checkpoints.checkpoint import latest_checkpoint

    if not out:
        return ""
    ck = latest_checkpoint(out)
    if ck is None:
        return ""
    return f"The last complete checkpoint ({ck.name}) resumes with: vitmoe train --resume {out} (any --gpu)"


def under_torchrun() -> bool:
    """True when this process is one worker of a torchrun / elastic launch."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _position(trainer) -> str:
    """Where a worker was when it failed: 'in epoch 2 after step 14'."""
    state = getattr(trainer, "state", None)
    if state is None or not state.step:
        return "before its first training step"
    return f"in epoch {min(state.epoch + 1, trainer.cfg.epochs)} after step {state.step}"


def _lost_peers(e: BaseException) -> bool:
    """A collective failed because a peer is gone or silent (not an error of this rank's own)."""
    import torch.distributed as dist

    from .loop.trainer import NonFiniteLossError

    if isinstance(e, (NonFiniteLossError, WorkerFailedError, *_user_error_types())):
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError)
                                             and any(k in str(e) for k in _PEER_FAILURE_HINTS))


def _timed_out(message: str) -> bool:
    return "timed out" in message.lower() or "timeout" in message.lower()


def run_worker(cfg: TrainConfig, resume: bool | str, log=None, force: bool = False):
    """Join the process group described by the environment and train (this process is one rank).
    `cfg` is checked (`validate()`); its run directory and process count are set here, from rank 0
    and the world, before the run is resolved. `resume`: True, False or "auto" (`restart.AUTO`:
    continue --out if it holds this run); an elastic restart decides as "auto" does unless True.
    Returns this rank's TrainResult."""
    import torch.distributed as dist

    from .distributed.context import DistContext, resolve_device
    from .loop.trainer import Trainer
    from .restart import decides_itself, global_restart_count, join_process_group, max_restarts, restart_count

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(cfg.device, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    join_process_group("nccl" if use_cuda else "gloo", rank, world, timedelta(seconds=cfg.dist_timeout_s))
    try:
        restart = global_restart_count(device)
        ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0,
                          restart=restart)
        log = log or (lambda m: print(m, flush=True))
        # One run directory for all ranks: rank 0's choice (a default name holds a timestamp).
        cfg = cfg.with_run(out=ctx.broadcast_object(cfg.out or default_out(cfg)), nproc=world)
        if decides_itself(resume, restart):
            resume = _resume_decision(ctx, cfg)
        if restart and ctx.is_main:
            log(f"elastic restart {restart} (of at most {max_restarts()}) after a worker failed: "
                f"{'continuing' if resume else 'starting'} {cfg.out}")
        trainer = None
        try:
            trainer = Trainer(resolve(cfg), ctx, resume=bool(resume), log=log, force=force)
            return trainer.fit()
        except Exception as e:
            if not _lost_peers(e):
                raise
            hint = _resume_hint(cfg.out)
            if max_restarts() > restart_count():  # this line is not the end of the job
                hint = (f"The elastic agent restarts the workers, continuing from the newest checkpoint "
                        f"({max_restarts() - restart_count()} restart(s) left).")
            err = WorkerFailedError(
                f"rank {rank} lost its peers {_position(trainer)} (a worker died or stalled past dist_timeout_s="
                f"{cfg.dist_timeout_s:g}s): {str(e).strip().splitlines()[0]}." + (f" {hint}" if hint else ""))
            err.where, err.timed_out = _position(trainer), _timed_out(str(e))
            raise err from e
    finally:
        dist.destroy_process_group()


def _resume_decision(ctx, cfg: TrainConfig) -> bool:
    """Rank 0's answer to "does --out hold this run?" (`restart.holds_run`), the same on every rank:
    all ranks load the same checkpoint, or all fail with rank 0's one line."""
    from .restart import holds_run

    answer: tuple[str, object] = ("ok", False)
    if ctx.is_main:
        try:
            answer = ("ok", holds_run(cfg))
        except RunDirError as e:
            answer = ("error", str(e))
    kind, value = ctx.broadcast_object(answer)
    if kind == "error":
        raise RunDirError(value)
    return bool(value)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..data import DatasetError
    from ..fileio import DiskFullError, PathError
    from ..models import ModelFileError
    from .checkpoints.checkpoint import CheckpointError

    return (ConfigError, DatasetError, RunDirError, CheckpointError, FileNotFoundError, ModelFileError, DiskFullError,
            PathError)


def _record_failure(error_dir: str, e: BaseException) -> None:
    """Leave this worker's error as one JSON record for the parent (see `_root_cause`)."""
    from ..fileio import atomic_write_text
    from .loop.trainer import NonFiniteLossError

    if isinstance(e, FileNotFoundError) and e.filename:
        message = f"{e.strerror}: {e.filename}"
    else:
        message = str(e).strip() or type(e).__name__
    if isinstance(e, _user_error_types()):
        kind = "user"
    elif isinstance(e, NonFiniteLossError):
        kind = "nonfinite"
    elif isinstance(e, WorkerFailedError):
        kind = "peer"  # a consequence of another rank's failure
    elif isinstance(e, (KeyboardInterrupt, SystemExit)):
        kind = "interrupted"
    else:
        kind = "crash"
        message = f"{type(e).__name__}: {message}"
    rank = int(os.environ.get("RANK", 0))
    record = {"rank": rank, "kind": kind, "message": message, "time": time.time(),
              "where": getattr(e, "where", None), "timed_out": getattr(e, "timed_out", False),
              "traceback": "".join(traceback.format_exception(e))}
    with contextlib.suppress(OSError):
        atomic_write_text(Path(error_dir) / f"rank-{rank}.json", json.dumps(record))


def _elastic_entry(cfg_dict: dict, resume: bool, error_dir: str | None = None, force: bool = False) -> dict:
    if error_dir:  # a restarted worker: its failed attempt's record is not this attempt's
        with contextlib.suppress(OSError):
            (Path(error_dir) / f"rank-{os.environ.get('RANK', 0)}.json").unlink()
    try:
        return run_worker(TrainConfig.from_dict(cfg_dict).validate(), resume, force=force).summary
    except BaseException as e:
        if error_dir:
            _record_failure(error_dir, e)
        raise


def _records(error_dir: str) -> dict[int, dict]:
    """The workers' failure records by rank (see `_record_failure`)."""
    records = {}
    for f in Path(error_dir).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(f.read_text())
            records[int(record["rank"])] = record
    return records


def _root_cause(records: dict[int, dict]) -> dict | None:
    """The failure that started it: the earliest record of a rank's own error (a rank losing its
    peers follows from another's failure); None when no rank failed on its own. A non-finite loss
    stops every rank at the same step: rank 0's line (the lowest rank's) names the checkpoint."""
    primary = [r for r in records.values() if r.get("kind") not in ("peer", "interrupted")]
    if not primary:
        return None
    root = min(primary, key=lambda r: r.get("time", 0.0))
    if root["kind"] == "nonfinite":
        root = min((r for r in primary if r["kind"] == "nonfinite"), key=lambda r: r["rank"])
    return root


@contextlib.contextmanager
def _launcher_logging(buffer: io.StringIO, verbose: bool):
    """Send the elastic launcher's logging (its copies of worker tracebacks, 'Terminating process'
    notes) to `buffer`, for the launcher log; on screen too only when `verbose`."""
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in _LAUNCHER_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = verbose
    try:
        yield
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate = propagate


def preflight(cfg: TrainConfig, resume: bool = False, force: bool = False) -> None:
    """Check in this process what would otherwise fail in every worker: the run directory (in use
    by another process, a run not resumed, a folder vitmoe did not make: `rundir.check_run_dir`)
    and the dataset's files (found, or downloaded once here; presence, headers and sizes verified)."""
    from ..data import check_dataset
    from .config.data import folder_options

    out = Path(cfg.out or default_out(cfg))
    check_run_dir(out, resume, force)
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise RunDirError(f"cannot create the run directory {out}: {parent} is not a writable directory")
    check_dataset(cfg.dataset, cfg.data_dir, **folder_options(cfg))


def _write_launcher_log(out: str, text: str) -> Path:
    """Append `text` to RUN/launcher.log when the run directory is there and no other process holds
    it (our workers have stopped), else to a new temporary file; returns the file's path."""
    run = Path(out)
    if run.is_dir():
        with contextlib.suppress(RunDirError, OSError), RunLock(run):
            fd = os.open(run / LAUNCHER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(text)
            return run / LAUNCHER_LOG
    fd, name = tempfile.mkstemp(prefix="vitmoe-launcher-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(name)


def _failure_report(cfg: TrainConfig, records: dict[int, dict], launcher_text: str) -> str:
    lines = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} vitmoe train --gpu {cfg.nproc}: the workers failed "
             f"(run directory {cfg.out}) ==="]
    for rank in sorted(records):
        r = records[rank]
        lines.append(f"--- rank {rank} ({r.get('kind')}, {r.get('where') or 'position unknown'}): {r.get('message')}")
        lines.append(r.get("traceback", "").rstrip())
    missing = sorted(set(range(cfg.nproc)) - set(records))
    if missing:
        lines.append(f"--- no record from rank(s) {', '.join(map(str, missing))} (stalled, killed or stopped)")
    lines += ["--- launcher", launcher_text.rstrip(), ""]
    return "\n".join(lines)


def _raise_worker_failure(cfg: TrainConfig, records: dict[int, dict], failures: dict, log_path) -> None:
    """Turn a failed launch into one exception: the root-cause worker's own error when it left one,
    else the rank that died or stalled (not the healthy ranks that lost it)."""
    from .loop.trainer import NonFiniteLossError

    root = _root_cause(records)
    hint = _resume_hint(cfg.out)
    tail = (f" {hint}" if hint else "") + (f" Details: {log_path}" if log_path else "")
    if root is not None and root["kind"] == "user":
        raise WorkerUserError(root["message"])
    if root is not None and root["kind"] == "nonfinite":
        raise NonFiniteLossError(root["message"])
    if root is not None:  # an unexpected error (a bug); its traceback is in the launcher log
        raise WorkerFailedError(f"worker rank {root['rank']} failed: {root['message']}; the other workers were "
                                f"stopped." + tail)
    # No rank failed on its own. A rank that exited without a record died (killed, out of memory, os._exit).
    dead = sorted((r for r in failures if r not in records), key=lambda r: failures[r].timestamp)
    if dead:
        code = failures[dead[0]].exitcode
        cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise WorkerFailedError(f"worker rank {dead[0]} failed ({cause}); the other workers were stopped." + tail)
    peers = sorted((r for r in records.values() if r["kind"] == "peer"), key=lambda r: r.get("time", 0.0))
    silent = sorted(set(range(cfg.nproc)) - set(records) - set(failures))
    if peers and silent:
        who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
        first, where = peers[0], peers[0].get("where") or "at some point"
        if first.get("timed_out"):  # the silent ranks were alive but did not answer: they stalled
            raise WorkerFailedError(
                f"worker {who} stalled: rank {first['rank']} waited dist_timeout_s={cfg.dist_timeout_s:g}s for it "
                f"{where} and gave up; the workers were stopped." + tail)
        raise WorkerFailedError(f"worker {who} stopped without an error: rank {first['rank']} lost the connection "
                                f"to it {where}; the other workers were stopped." + tail)
    if peers:
        message = peers[0]["message"]
        raise WorkerFailedError(f"worker {message}" + (f" Details: {log_path}" if log_path else ""))
    rank = min(failures, key=lambda r: failures[r].timestamp) if failures else 0
    code = failures[rank].exitcode if failures else None
    cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    raise WorkerFailedError(f"worker rank {rank} failed ({cause}); the other workers were stopped." + tail)


def launch(cfg: TrainConfig, resume: bool = False, force: bool = False, verbose: bool = False) -> dict:
    """Start `cfg.nproc` workers on this machine and wait for them; returns rank 0's summary. `cfg`
    is checked (`validate()`); without `out` the run directory gets its default name here.
    `force`: see `rundir.check_run_dir`; `verbose`: the launcher's logging and the workers'
    tracebacks on screen too (they always go to the launcher log when a worker fails)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.nproc
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if gpu and n > torch.cuda.device_count():
        raise ConfigError(f"nproc={n} (--gpu {n}) is not allowed: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.batch_size < n:
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: the global batch must be >= nproc={n}")
    check_ep_size(cfg.ep_size, n)
    cfg = cfg.with_run(out=cfg.out or default_out(cfg))  # one run directory for every worker
    preflight(cfg, resume, force)
    # max_restarts: the agent starts every worker again after one fails; they continue the run (restart.py)
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=cfg.max_restarts,
                      monitor_interval=0.5, start_method="spawn")
    print(f"launching {n} worker process{'es' if n > 1 else ''} ({'nccl' if gpu else 'gloo'}"
          f"{f', expert parallel groups of {cfg.ep_size}' if cfg.ep_size > 1 else ''}"
          f"{f', up to {cfg.max_restarts} restart(s)' if cfg.max_restarts else ''})", flush=True)
    error_dir = tempfile.mkdtemp(prefix="vitmoe-workers-")
    launcher_text = io.StringIO()
    try:
        try:
            with _launcher_logging(launcher_text, verbose):
                results = elastic_launch(lc, _elastic_entry)(cfg.to_dict(), resume, error_dir, force)
        except ChildFailedError as e:
            records = _records(error_dir)
            if verbose:
                for r in sorted(records):
                    sys.stderr.write(f"rank {r}: {records[r].get('traceback', '')}")
                sys.stderr.flush()
            root = _root_cause(records)
            log_path = None
            if root is None or root["kind"] not in ("user", "nonfinite"):  # the one line is not the whole story
                log_path = _write_launcher_log(cfg.out, _failure_report(cfg, records, launcher_text.getvalue()))
            _raise_worker_failure(cfg, records, e.failures, log_path)
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)
    return results[0]
