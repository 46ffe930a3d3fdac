"""Multi-process training on torch.distributed.

* `vitmoe train --gpu N` starts N workers on this machine through PyTorch's elastic launcher
  (the engine behind torchrun): one per GPU with NCCL, or N CPU processes with gloo.
* `torchrun [--nnodes ... --rdzv-endpoint ...] -m vitmoe train ...` starts the workers itself;
  each one sees RANK/WORLD_SIZE/LOCAL_RANK in its environment and trains directly.

Every worker builds a DistContext and runs the same Trainer; only rank 0 writes the run
directory and prints. A worker that dies makes the launcher stop the others and report which
rank failed; a worker stuck in a collective fails after `dist_timeout_s` instead of hanging.
"""
from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

import torch

from ..models import ConfigError
from .config import TrainConfig, check_ep_size


# Messages of collectives whose peer is gone (gloo, NCCL, the c10d store).
_PEER_FAILURE_HINTS = ("Connection closed", "Connection reset", "timed out", "Timed out", "Broken pipe",
                       "NCCL", "gloo")


class WorkerFailedError(RuntimeError):
    """A worker process died or failed; the others were stopped."""


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
            raise WorkerFailedError(
                f"rank {rank} lost its peers (a worker died or stalled past dist_timeout_s="
                f"{cfg.dist_timeout_s:g}s): {str(e).strip().splitlines()[0]}. Resume from the last complete "
                f"checkpoint with: vitmoe train --resume {cfg.out}") from e
        return result.summary
    finally:
        dist.destroy_process_group()


def _elastic_entry(cfg_dict: dict, resume: bool) -> dict:
    return run_worker(TrainConfig.from_dict(cfg_dict).validate(), resume)


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
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                      monitor_interval=0.5, start_method="spawn")
    print(f"launching {n} worker processes ({'nccl' if gpu else 'gloo'}"
          f"{f', expert parallel groups of {cfg.ep_size}' if cfg.ep_size > 1 else ''})", flush=True)
    try:
        results = elastic_launch(lc, _elastic_entry)(cfg.to_dict(), resume)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        cause = f"exit code {failure.exitcode}"
        if failure.exitcode is not None and failure.exitcode < 0:
            cause = f"killed by signal {-failure.exitcode}"
        detail = failure.message if isinstance(failure.message, str) else ""
        raise WorkerFailedError(
            f"worker rank {rank} failed ({cause}); the other workers were stopped. "
            + (f"{detail.strip().splitlines()[-1]}. " if detail.strip() else "")
            + f"The last complete checkpoint in {cfg.out} resumes with: vitmoe train --resume {cfg.out} "
            f"(any --gpu)") from None
    return results[0]
