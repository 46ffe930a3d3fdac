"""The run directory, the contract between the trainer (which writes a run) and `vitmoe.report`
(which reads it).

* `layout`: what a run directory is and who may write it: the file and checkpoint-folder names,
  `has_checkpoint`, `is_run_dir`, the writer's lock (`RunLock`), `check_run_dir` (may `--out`
  take this folder) and `run_owning` (would writing a path write a run's own files).
* `records`: metrics.jsonl, summary.json and config.yaml written and read, and the numbers the
  tables derive from them (`summarize`, the threshold rule, the 60,000-image times).

Importing this package does not import torch (the report reads runs without it).
"""
from .layout import (BEST, CHECKPOINT_DIR, CONFIG_FILE, EPOCH_DIR_RE, LATEST, LAUNCHER_LOG, LOCK_FILE, METRICS_FILE,
                     POINTERS, RUN_FILES, SHADOWING_FILES, SUMMARY_FILE, TENSORBOARD_DIR, RunDirError, RunLock,
                     all_epoch_dirs, check_run_dir, describe_holder, epoch_dir_name, has_checkpoint, is_run,
                     is_run_dir, lock_holder, lock_run_dir, run_owning)
from .records import (DEFAULT_THRESHOLD, IMAGES_60K, THRESHOLD_EPS, RunFormatError, append_metrics,
                      epochs_to_threshold, finite, finite_int, read_config, read_metrics, read_summary, reached,
                      summarize, time_for_60k, write_json, write_metrics, write_summary)

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "SUMMARY_FILE", "CHECKPOINT_DIR", "TENSORBOARD_DIR", "LOCK_FILE", "LAUNCHER_LOG",
    "RUN_FILES", "LATEST", "BEST", "POINTERS", "EPOCH_DIR_RE", "epoch_dir_name", "all_epoch_dirs", "has_checkpoint",
    "is_run_dir", "is_run", "run_owning", "SHADOWING_FILES", "RunDirError", "RunLock", "lock_holder", "describe_holder", "check_run_dir", "lock_run_dir",
    "IMAGES_60K", "DEFAULT_THRESHOLD", "THRESHOLD_EPS", "RunFormatError", "finite", "finite_int", "reached",
    "epochs_to_threshold", "time_for_60k", "summarize", "write_json", "write_summary", "write_metrics",
    "append_metrics", "read_metrics", "read_summary", "read_config",
]
