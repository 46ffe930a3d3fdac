"""Training: configuration, the training loop, crash-safe checkpoints and exact resume."""
from .checkpoint import CheckpointError, latest_checkpoint, load_state, resolve_model_file, save_checkpoint
from .config import TrainConfig, experts_of, model_label, parse_set
from .dist import DistContext, resolve_device
from .losses import symmetric_kl
from .schedule import lr_factor
from .trainer import NonFiniteLossError, RunDirError, Trainer, TrainResult, evaluate, train

__all__ = [
    "TrainConfig", "Trainer", "TrainResult", "train", "evaluate", "DistContext", "resolve_device",
    "NonFiniteLossError", "RunDirError", "CheckpointError", "save_checkpoint", "latest_checkpoint",
    "load_state", "resolve_model_file", "lr_factor", "parse_set", "model_label", "experts_of",
    "symmetric_kl",
]
