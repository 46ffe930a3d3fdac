"""How a run describes itself: the fields of summary.json (rewritten every epoch) and the log line
that opens the run."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import rundir
from .data_spec import class_metadata, data_notes
from .ema import ema_summary
from .model_spec import experts_of

if TYPE_CHECKING:
    from .trainer import Trainer


def run_summary(t: "Trainer") -> dict[str, Any]:
    """summary.json: the source table's columns, the run's settings and, with EMA on, the best of
    both models (`best_model` names which; see training.ema)."""
    cfg = t.cfg
    summary = {
        "name": cfg.run_label(),
        "model": cfg.model,
        "experts": experts_of(t.model_cfg),
        "params": t.info.total_params,
        "active_params": t.info.active_params_per_token,
        "merged_params": t.info.merged_params,
        **rundir.summarize(t.history, cfg.threshold),
        "epochs_planned": cfg.epochs,
        "dataset": cfg.dataset,
        **class_metadata(cfg),
        "test_images": t.test_loader.num_samples,
        "batch_size": cfg.batch_size,
        "eval_mode": t.model_cfg.moe.eval_mode if t.model_cfg.moe_block_indices() else None,
        "device": str(t.device),
        "world_size": t.dist.world_size,
        "forwards_per_step": cfg.forwards_per_step,
        "consistency_weight": cfg.consistency_weight,
        "augment_policy": cfg.augment_policy if cfg.augment else None,
        "mixup_alpha": cfg.mixup_alpha,
        "cutmix_alpha": cfg.cutmix_alpha,
        "merge_every": cfg.merge_every,
        "freeze_unrouted": cfg.freeze_unrouted,
        "time_budget_s": cfg.time_budget_s,
        "stopped_by_budget": t.budget.stopped,
        "resume_schedule": cfg.resume_schedule,
        "init": cfg.init,
        "steps": t.step,
    }
    if t.ema is not None:
        summary.update(ema_summary(t.history, t.best_acc, t.best_epoch, t.best_model, cfg.ema_decay, cfg.threshold))
    return summary


def describe(t: "Trainer") -> str:
    """The run's first log line: model, data, sizes, and every option that changes the recipe."""
    cfg = t.cfg
    extras = data_notes(t.train_loader)  # resized, streamed from host memory
    if cfg.consistency_weight > 0:
        extras.append(f"consistency weight {cfg.consistency_weight:g} (2 forwards/step"
                      f"{', stop-gradient' if cfg.consistency_stopgrad else ''})")
    if cfg.augment and cfg.augment_policy != "none":
        extras.append(f"augment {cfg.augment_policy}")
    if t.mixer is not None:
        extras.append(t.mixer.describe())
    if t.ema is not None:
        extras.append(f"EMA of the weights, decay {cfg.ema_decay:g}")
    if cfg.merge_every:
        extras.append(f"experts averaged every {cfg.merge_every} steps")
    if cfg.freeze_unrouted:
        extras.append("experts without tokens frozen in their step")
    if cfg.time_budget_s is not None:
        extras.append(f"time budget {cfg.time_budget_s:g}s of training")
    if len(t.lr_schedule.cycles) > 2:
        extras.append(f"lr cycles restart at steps {', '.join(map(str, t.lr_schedule.cycles[1:-1]))}")
    return (f"{cfg.run_label()} ({cfg.model}) on {cfg.dataset}: {t.info.total_params:,} parameters "
            f"({t.info.active_params_per_token:,} active per token), {t.train_loader.num_samples:,} train / "
            f"{t.test_loader.num_samples:,} test images, {t.steps_per_epoch} steps/epoch, batch "
            f"{cfg.batch_size}, device {t.device}, run dir {t.run_dir}" + "".join(f"; {e}" for e in extras))
