"""`--gpu N` / `nproc > 1`: N worker processes on this machine (torch elastic), one per GPU, or CPU
processes with the gloo backend when there is no GPU. Each worker builds a DistContext and runs the
same Trainer; the model is wrapped in DistributedDataParallel and the global batch is split by the
DeviceLoader. Only rank 0 writes the run directory and prints.
"""
from __future__ import annotations

import os
import socket
import uuid

import torch

from ..models import ConfigError
from .config import TrainConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg_dict: dict, resume: bool) -> dict:
    import torch.distributed as dist

    from .dist import DistContext
    from .trainer import train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cfg = TrainConfig.from_dict(cfg_dict).validate()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)
        result = train(cfg, ctx, resume=resume, log=lambda m: print(m, flush=True))
        return result.summary
    finally:
        dist.destroy_process_group()


def launch(cfg: TrainConfig, resume: bool = False) -> int:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.nproc
    if torch.cuda.is_available() and cfg.device != "cpu" and n > torch.cuda.device_count():
        raise ConfigError(f"nproc={n} (--gpu {n}) is not allowed: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.batch_size < n:
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: the global batch must be >= nproc={n}")
    cfg.out = cfg.out or cfg.default_out()  # one run directory for every worker
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                      monitor_interval=0.5, start_method="spawn")
    print(f"launching {n} worker processes ({'nccl' if torch.cuda.is_available() and cfg.device != 'cpu' else 'gloo'})",
          flush=True)
    results = elastic_launch(lc, _worker)(cfg.to_dict(), resume)
    summary = results[0]
    print(f"summary: {os.path.join(cfg.out, 'summary.json')} (best {summary['best_acc']:.2f}% at epoch "
          f"{summary['best_epoch']})", flush=True)
    return 0
