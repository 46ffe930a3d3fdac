"""How a run describes itself: the fields of summary.json (rewritten every epoch) and the log line
that opens the run. Both read the RunSpec and the TrainState they are given, never the Trainer."""
from __future__ import annotations

from typing import Any

import torch

from ... import rundir
from ...models import ModelInfo
from ..checkpoints.state import TrainState
from ..config.spec import RunSpec
from ..evaluation.precision import resolve_amp
from ..recipe.ema import ema_summary
from .loaders import data_notes


def run_summary(spec: RunSpec, state: TrainState, info: ModelInfo, test_images: int, device: torch.device,
                world_size: int) -> dict[str, Any]:
    """summary.json: the source table's columns, the run's settings and, with EMA on, the best of
    both models (`best_model` names which; see recipe.ema). `info`: the model's parameter counts."""
    cfg, model = spec.config, spec.model
    summary = {
        "name": spec.label,
        "model": cfg.model,
        "experts": spec.experts,
        "params": info.total_params,
        "active_params": info.active_params_per_token,
        "merged_params": info.merged_params,
        "forward_flops_per_image": info.forward_flops_per_image,
        "expert_flops_share": info.expert_flops_share,
        **rundir.summarize(state.history, cfg.threshold),
        "epochs_planned": cfg.epochs,
        "dataset": cfg.dataset,
        **spec.class_metadata(),
        "test_images": test_images,
        "batch_size": cfg.batch_size,
        "eval_mode": model.moe.eval_mode if model.moe_block_indices() else None,
        "device": str(device),
        "amp": resolve_amp(cfg.amp, device),  # the precision it trained in ("auto" resolved)
        "world_size": world_size,
        "forwards_per_step": cfg.forwards_per_step,
        "consistency_weight": cfg.consistency_weight,
        "augment_policy": cfg.augment_policy if cfg.augment else None,
        "mixup_alpha": cfg.mixup_alpha,
        "cutmix_alpha": cfg.cutmix_alpha,
        "merge_every": cfg.merge_every,
        "freeze_unrouted": cfg.freeze_unrouted,
        "time_budget_s": cfg.time_budget_s,
        "stopped_by_budget": state.stopped_by_budget,
        "resume_schedule": cfg.resume_schedule,
        "init": cfg.init,
        "steps": state.step,
    }
    if cfg.ema_decay > 0:
        summary.update(ema_summary(state.history, state.best_acc, state.best_epoch, state.best_model, cfg.ema_decay,
                                   cfg.threshold))
    return summary


def describe(spec: RunSpec, info: ModelInfo, train_loader, test_loader, device: torch.device, mixer,
             lr_cycles: list[int]) -> str:
    """The run's first log line: model, data, sizes, and every option that changes the recipe
    (`mixer`: the batch mixer or None; `lr_cycles`: the lr schedule's cycle boundaries in steps)."""
    cfg = spec.config
    extras = data_notes(train_loader)  # resized, streamed from host memory
    if cfg.consistency_weight > 0:
        extras.append(f"consistency weight {cfg.consistency_weight:g} (2 forwards/step"
                      f"{', stop-gradient' if cfg.consistency_stopgrad else ''})")
    if cfg.augment and cfg.augment_policy != "none":
        extras.append(f"augment {cfg.augment_policy}")
    if mixer is not None:
        extras.append(mixer.describe())
    if cfg.ema_decay > 0:
        extras.append(f"EMA of the weights, decay {cfg.ema_decay:g}")
    if cfg.merge_every:
        extras.append(f"experts averaged every {cfg.merge_every} steps")
    if cfg.freeze_unrouted:
        extras.append("experts without tokens frozen in their step")
    if cfg.time_budget_s is not None:
        extras.append(f"time budget {cfg.time_budget_s:g}s of training")
    if len(lr_cycles) > 2:
        extras.append(f"lr cycles restart at steps {', '.join(map(str, lr_cycles[1:-1]))}")
    steps = len(train_loader)
    return (f"{spec.label} ({cfg.model}) on {cfg.dataset}: {info.total_params:,} parameters "
            f"({info.active_params_per_token:,} active per token), {train_loader.num_samples:,} train / "
            f"{test_loader.num_samples:,} test images, {steps} step{'' if steps == 1 else 's'}/epoch, batch "
            f"{cfg.batch_size}, device {device}, run dir {spec.run_dir}" + "".join(f"; {e}" for e in extras))
