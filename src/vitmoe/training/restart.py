"""Runs that outlive a fault: whether a (re)started `vitmoe train` continues its run or starts it.

* `--resume auto` (with `--out RUN`): RUN continues from its newest verified checkpoint when it holds
  a run of this command's configuration (only epochs and execution settings may differ, as for
  `--resume RUN`); a RUN that does not exist, or holds no run yet, starts fresh.
* **An elastic restart means the same.** `torchrun --max-restarts K` (or `vitmoe train --gpu N
  --max-restarts K`) starts every worker again with the first attempt's command line after one of
  them failed (TORCHELASTIC_RESTART_COUNT > 0 in their environment). That command names an --out
  the first attempt has since filled; refusing it as an existing run would end the job on its first
  fault, so a restart continues it instead (torchtitan and other trainers resume on restart too).
  Rank 0 decides and every rank follows, so all load the same checkpoint.
* The run lock passes from the failed attempt to the new one (`vitmoe.rundir`): flock dies with
  its holder, and a restarted rank 0 waits up to dist_timeout_s for a holder that is still dying (a
  worker of the failed attempt left on a lost node fails within that time of losing its peers).

A restart without `--out` could not find its run (the default name holds the time it started), so
torchrun with --max-restarts needs --out.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..rundir import CONFIG_FILE, RunDirError
from ..validation import ConfigError
from .config.train_config import TrainConfig

AUTO = "auto"
"""`--resume auto`: continue the --out run if it exists, else start it."""


def restart_count() -> int:
    """Which attempt this worker is: 0 for the first, N after N elastic restarts (0 outside torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def max_restarts() -> int:
    """The restarts the elastic agent that started this worker allows (0 outside torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    except ValueError:
        return 0


def decides_itself(resume: bool | str, restart: int) -> bool:
    """Whether this start must look at --out to know if it resumes: `--resume auto`, or a restart
    (`restart` > 0) of a command that did not say `--resume RUN` (that one resumes on every attempt)."""
    return resume == AUTO or (resume is not True and restart > 0)


def join_process_group(backend: str, rank: int, world: int, timeout) -> None:
    """`init_process_group` from the environment torchrun (or `vitmoe train --gpu N`) set, in a
    namespace of its own per attempt.

    Why: the c10d rendezvous of torch >= 2.4 hands every attempt of a job the same TCPStore server
    (TORCHELASTIC_USE_AGENT_STORE=True) and nothing separates one attempt's keys from the next's, so
    a restarted worker may read a dead worker's address and fail to connect (gloo: "Connection
    refused"; NCCL: a stale unique id; pytorch/pytorch#135712, #167288). Prefixing the keys with the
    restart count isolates the attempts. torchelastic counts restarts per node, so a node restarted
    only because another failed may disagree on that count; for multi-node jobs with restarts,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment gives every round its own store."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    store = dist.PrefixStore(f"vitmoe/attempt-{restart_count()}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def global_restart_count(device) -> int:
    """The largest restart count over the ranks (a collective), 0 without --max-restarts: ranks whose
    node restarted only because another's worker failed still count 0 (see join_process_group)."""
    if max_restarts() == 0:  # the same on every rank (one command line), so no rank waits alone
        return 0
    import torch
    import torch.distributed as dist

    t = torch.tensor([restart_count()], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def holds_run(cfg: TrainConfig) -> bool:
    """Whether `cfg.out` holds a run (its config.yaml) to continue; raises RunDirError when that run
    was trained with another configuration than `cfg` (a `validate()`d TrainConfig)."""
    saved_path = Path(cfg.out) / CONFIG_FILE
    if not saved_path.is_file():
        return False
    try:
        saved = TrainConfig.from_yaml(saved_path).validate()
    except ConfigError as e:
        raise RunDirError(f"--resume auto: {saved_path} cannot be read as a vitmoe run ({e}); choose another --out") from None
    changed = [k for k in saved.structural_diff(cfg) if k != "model_config"]
    # model_config holds what was given (a partial dict); the model it resolves to is what counts
    changed += _model_diff(saved.checked_model.to_dict(), cfg.checked_model.to_dict(), "model.")
    if changed:
        how = "continuing it after a restart" if restart_count() else "--resume auto"
        raise RunDirError(f"{how}: {cfg.out} holds a run whose {', '.join(sorted(changed))} "
                          f"{'differs' if len(changed) == 1 else 'differ'} from this command's (only epochs and "
                          f"execution settings may change); continue it with --resume {cfg.out}, or choose another --out")
    return True


def _model_diff(a: dict, b: dict, prefix: str) -> list[str]:
    """The keys (`model.depth`, `model.moe.top_k`) whose values differ between two model dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _model_diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def check_restartable(cfg: TrainConfig) -> None:
    """Under torchrun --max-restarts K > 0, a run needs --out (see the module docstring)."""
    if cfg.out is None and max_restarts() > 0:
        raise ConfigError(f"--out is needed under torchrun --max-restarts {max_restarts()}: a restarted worker "
                          "continues the run in --out (without it every attempt would start a new run under "
                          "a new name)")
