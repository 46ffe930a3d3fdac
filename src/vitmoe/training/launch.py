"""Multi-process training on torch.distributed.

* `vitmoe train --gpu N` starts N workers on this machine through PyTorch's elastic launcher
  (the engine behind torchrun): one per GPU with NCCL, or N CPU processes with gloo.
* `torchrun [--nnodes ... --rdzv-endpoint ...] -m vitmoe train ...` starts the workers itself;
  each one sees RANK/WORLD_SIZE/LOCAL_RANK in its environment and trains directly.

Every worker builds a DistContext and runs the same Trainer; only rank 0 writes the run
directory and prints. A worker that dies makes the launcher stop the others and report which
rank failed; a worker stuck in a collective fails after `dist_timeout_s` instead of hanging.

`launch` first checks in this process what can fail early (the dataset's files, the run
directory), so such errors are one line before any worker starts. A worker that fails anyway
leaves a one-line record of its error; the parent re-raises the root cause (the first failure
that is not a rank losing its peers) as that line, keeps the launcher's own logging and
tracebacks off the screen, and suggests `--resume` only when a checkpoint exists.
"""
from __future__ import annotations

import contextlib
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
from .config import TrainConfig, check_ep_size


# Messages of collectives whose peer is gone (gloo, NCCL, the c10d store).
_PEER_FAILURE_HINTS = ("Connection closed", "Connection reset", "timed out", "Timed out", "Broken pipe",
                       "NCCL", "gloo")


class WorkerFailedError(RuntimeError):
    """A worker process died or failed; the others were stopped."""


class WorkerUserError(ValueError):
    """A worker stopped on an error that is the user's to fix (bad value, missing or broken data, run
    directory in use); the message is the worker's own one line."""


def _resume_hint(out: str | None) -> str:
    """`Resume ... with: vitmoe train --resume OUT` when OUT holds a complete checkpoint, else ''."""
    from .checkpoint import latest_checkpoint

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


def run_worker(cfg: TrainConfig, resume: bool, log=None) -> dict:
    """Join the process group described by the environment and train (this process is one rank)."""
    import torch.distributed as dist

    from .dist import DistContext
    from .trainer import train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.dist_timeout_s))
    try:
        ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)
        # One run directory for all ranks: rank 0's choice (a default name holds a timestamp).
        cfg.out = ctx.broadcast_object(cfg.out or cfg.default_out())
        cfg.nproc = world
        try:
            result = train(cfg, ctx, resume=resume, log=log or (lambda m: print(m, flush=True)))
        except (dist.DistError, RuntimeError) as e:
            if not isinstance(e, dist.DistError) and not any(k in str(e) for k in _PEER_FAILURE_HINTS):
                raise
            hint = _resume_hint(cfg.out)
            raise WorkerFailedError(
                f"rank {rank} lost its peers (a worker died or stalled past dist_timeout_s="
                f"{cfg.dist_timeout_s:g}s): {str(e).strip().splitlines()[0]}." + (f" {hint}" if hint else "")) from e
        return result.summary
    finally:
        dist.destroy_process_group()


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..data import DatasetError
    from .checkpoint import CheckpointError
    from .trainer import RunDirError

    return (ConfigError, DatasetError, RunDirError, CheckpointError, FileNotFoundError)


def _record_failure(error_dir: str, e: BaseException) -> None:
    """Leave this worker's error as one JSON record for the parent (see `_root_cause`)."""
    from ..fileio import atomic_write_text
    from .trainer import NonFiniteLossError

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
    record = {"rank": rank, "kind": kind, "message": message, "time": time.time()}
    if kind == "crash":
        record["traceback"] = "".join(traceback.format_exception(e))
    with contextlib.suppress(OSError):
        atomic_write_text(Path(error_dir) / f"rank-{rank}.json", json.dumps(record))


def _elastic_entry(cfg_dict: dict, resume: bool, error_dir: str | None = None) -> dict:
    try:
        return run_worker(TrainConfig.from_dict(cfg_dict).validate(), resume)
    except BaseException as e:
        if error_dir:
            _record_failure(error_dir, e)
        raise


def _root_cause(error_dir: str) -> dict | None:
    """The failure that started it: the earliest record that is not a rank losing its peers (those
    follow from another rank's failure), else the earliest record."""
    records = []
    for f in Path(error_dir).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(f.read_text()))
    if not records:
        return None
    primary = [r for r in records if r.get("kind") not in ("peer", "interrupted")]
    return min(primary or records, key=lambda r: r.get("time", 0.0))


@contextlib.contextmanager
def _quiet_launcher():
    """Keep the elastic launcher's logging (its copies of worker tracebacks, 'closing signal' notes)
    off the screen: the failure is reported once, by `launch`."""
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def preflight(cfg: TrainConfig, resume: bool = False) -> None:
    """Check in this process what would otherwise fail in every worker: the run directory and the
    dataset's files (found, or downloaded once here; presence, headers and sizes verified)."""
    from ..data import check_dataset
    from .checkpoint import latest_checkpoint
    from .trainer import RunDirError

    out = Path(cfg.out or cfg.default_out())
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is a file, not a directory; choose another --out")
    if not resume and latest_checkpoint(out) is not None:
        raise RunDirError(f"run directory {out} already holds a run; resume it with "
                          f"--resume {out} or choose another --out")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise RunDirError(f"cannot create the run directory {out}: {parent} is not a writable directory")
    check_dataset(cfg.dataset, cfg.data_dir)


def _raise_worker_failure(cfg: TrainConfig, error_dir: str, rank: int, failure) -> None:
    """Turn a failed launch into one exception: the root-cause worker's own error when it left one."""
    from .trainer import NonFiniteLossError

    root = _root_cause(error_dir)
    hint = _resume_hint(cfg.out)
    if root is not None and root["kind"] == "user":
        raise WorkerUserError(root["message"])
    if root is not None and root["kind"] == "nonfinite":
        raise NonFiniteLossError(root["message"])
    if root is not None and root["kind"] == "crash":
        # An unexpected error (a bug): the worker's own traceback, not the launcher's copies of it.
        sys.stderr.write(root.get("traceback", ""))
        sys.stderr.flush()
        raise WorkerFailedError(f"worker rank {root['rank']} failed: {root['message']}; the other workers were "
                                f"stopped." + (f" {hint}" if hint else ""))
    if root is not None and root["rank"] == rank:  # it only lost its peers; whoever died left no record
        message = root["message"]
        raise WorkerFailedError(f"worker {message}" if message.startswith("rank ") else
                                f"worker rank {rank} failed: {message}")
    # The worker died without a word (killed, out of memory, os._exit).
    cause = f"exit code {failure.exitcode}"
    if failure.exitcode is not None and failure.exitcode < 0:
        cause = f"killed by signal {-failure.exitcode}"
    raise WorkerFailedError(f"worker rank {rank} failed ({cause}); the other workers were stopped."
                            + (f" {hint}" if hint else ""))


def launch(cfg: TrainConfig, resume: bool = False) -> dict:
    """Start `cfg.nproc` workers on this machine and wait for them; returns rank 0's summary."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.nproc
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if gpu and n > torch.cuda.device_count():
        raise ConfigError(f"nproc={n} (--gpu {n}) is not allowed: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.batch_size < n:
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: the global batch must be >= nproc={n}")
    check_ep_size(cfg.ep_size, n)
    cfg.out = cfg.out or cfg.default_out()  # one run directory for every worker
    preflight(cfg, resume)
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                      monitor_interval=0.5, start_method="spawn")
    print(f"launching {n} worker processes ({'nccl' if gpu else 'gloo'}"
          f"{f', expert parallel groups of {cfg.ep_size}' if cfg.ep_size > 1 else ''})", flush=True)
    error_dir = tempfile.mkdtemp(prefix="vitmoe-workers-")
    try:
        failed = None
        try:
            with _quiet_launcher():
                results = elastic_launch(lc, _elastic_entry)(cfg.to_dict(), resume, error_dir)
        except ChildFailedError as e:
            failed = e.get_first_failure()
        if failed is not None:
            _raise_worker_failure(cfg, error_dir, *failed)
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)
    return results[0]
