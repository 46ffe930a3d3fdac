"""Training: a run resolved once, trained by a loop that carries its state, checkpointed, resumed.

Subpackages, lowest first (each imports only those above it in this list):

* `config`: TrainConfig (fields, YAML and overrides, checks), `resolve(cfg) -> RunSpec`, `load_config`.
* `distributed`: DistContext, devices, DDP, expert parallelism.
* `evaluation`: autocast, test loss and accuracy, a saved model prepared for `vitmoe eval`.
* `recipe`: optional recipe extras (EMA of the weights, expert averaging, freezing unrouted experts).
* `checkpoints`: crash-safe checkpoints, `--resume` (restore) and `--init` (warm start).
* `loop`: the Trainer, TrainState, the step, meters, optimizer (`fastest_adam`, also for your own
  loops) and lr schedule, loaders, summary.

`launch` starts the processes of a multi-process run (each runs the loop), `restart` decides whether a
(re)started run continues its run directory (`--resume auto`, elastic restarts); the run directory's
names and lock are `vitmoe.rundir`'s, batch mixing is `vitmoe.data.mix`.
"""
from .checkpoints.checkpoint import CheckpointError, latest_checkpoint, load_state, resolve_model_file, save_checkpoint
from .config.model import experts_of, model_label
from .config.spec import RunSpec, load_config, resolve
from .config.train_config import TrainConfig, parse_set
from .distributed.context import DistContext, resolve_device
from .evaluation.evaluate import evaluate
from .loop.losses import symmetric_kl
from .loop.optim import adam_kwargs, fastest_adam
from .loop.schedule import cyclic_lr_factor, extend_cycles, lr_factor
from .checkpoints.state import TrainState
from .loop.trainer import NonFiniteLossError, RunDirError, Trainer, TrainResult, train

__all__ = [
    "TrainConfig", "RunSpec", "resolve", "load_config", "TrainState", "Trainer", "TrainResult", "train", "evaluate",
    "DistContext", "resolve_device", "NonFiniteLossError", "RunDirError", "CheckpointError", "save_checkpoint",
    "latest_checkpoint", "load_state", "resolve_model_file", "lr_factor", "cyclic_lr_factor", "extend_cycles",
    "parse_set", "model_label", "experts_of", "symmetric_kl", "adam_kwargs", "fastest_adam",
]
