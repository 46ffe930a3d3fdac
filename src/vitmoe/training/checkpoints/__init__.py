"""Checkpoints and resume: crash-safe checkpoints that load without running code, and the two ways a
run starts from saved weights.

* `checkpoint`: writing (atomic, verified, pruned), finding (`latest` / `best`, the newest that
  verifies) and reading checkpoints; `resolve_model_file` (a file, run or checkpoint directory).
  The folder names are vitmoe.rundir.layout's.
* `verify`: the manifest (sizes, sha256) and the checks a checkpoint must pass before it is read.
* `safe_state`: state.pt as plain data (tensors, numbers, strings), loaded with weights_only=True.
* `state`: TrainState, the run's progress (epoch, step, best, history, time budget used): the loop
  advances it, a checkpoint saves it, `restore` returns it and the summary reads it.
* `restore`: `--resume`: the newest usable checkpoint checked against the run's model, then loaded
  into its parts; returns the TrainState it holds.
* `warm_start`: `--init SRC`: another model's weights (upcycled, merged or adapted) for a new run.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_state, resolve_model_file, save_checkpoint

__all__ = ["CheckpointError", "latest_checkpoint", "load_state", "resolve_model_file", "save_checkpoint"]
