"""Training: configuration, the training loop, crash-safe checkpoints and exact resume.

Layout: `config` (TrainConfig: fields, YAML and overrides, validation), `model_spec` (the model a
config trains, its label), `trainer` (the loop), `step` (one optimizer step), `meters` (device-side
epoch sums), `evaluate`, `optim` (optimizer, lr schedule; `fastest_adam`: torch's fastest Adam for some params), `schedule` (the lr factor and its
cycles), `budget` (time budget), `checkpoint`, `expert_parallel`, `dist`, `launch` (processes),
`progress`, `losses`, `run_summary` (summary.json, the run's first log line); optional recipe parts
`recipe_spec` (their checks), `ema` (EMA of the weights), `expert_averaging` (merge_every), `freeze`
(freeze_unrouted), with batch mixing in `vitmoe.data.mix`; the run directory's files are `vitmoe.rundir`'s.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_state, resolve_model_file, save_checkpoint
from .config import TrainConfig, parse_set
from .dist import DistContext, resolve_device
from .evaluate import evaluate
from .losses import symmetric_kl
from .model_spec import experts_of, model_label
from .optim import adam_kwargs, fastest_adam
from .schedule import cyclic_lr_factor, extend_cycles, lr_factor
from .trainer import NonFiniteLossError, RunDirError, Trainer, TrainResult, train

__all__ = [
    "TrainConfig", "Trainer", "TrainResult", "train", "evaluate", "DistContext", "resolve_device",
    "NonFiniteLossError", "RunDirError", "CheckpointError", "save_checkpoint", "latest_checkpoint",
    "load_state", "resolve_model_file", "lr_factor", "cyclic_lr_factor", "extend_cycles", "parse_set",
    "model_label", "experts_of", "symmetric_kl", "adam_kwargs", "fastest_adam",
]
