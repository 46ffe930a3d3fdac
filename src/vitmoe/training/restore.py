"""Resuming a Trainer: the newest usable checkpoint (`checkpoint.load_for_resume`: it verifies and
loads as plain data; skipped ones are logged), checked against the run's model before anything is
loaded, then applied to the model (and its EMA: a checkpoint without one, e.g. written before EMA
was turned on, restarts the EMA at the resumed weights), optimizer, scheduler, step counters and
RNGs. A checkpoint that
does not fit the run is one error naming its file and what differs, never a load_state_dict
traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import rundir
from ..models import VisionTransformer
from ..models.io import ModelFileError, check_tensors
from . import checkpoint as ckpt
from . import expert_parallel


def restore_checkpoint(trainer) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest usable checkpoint of `trainer.run_dir` into the trainer; (its directory, its
    training state), or None when the run has no checkpoint yet."""
    t = trainer
    found = ckpt.load_for_resume(t.run_dir, t.device, log=t.log)
    if found is None:
        return None
    ck, weights, state = found
    check_fits(ck / ckpt.MODEL_FILE, t.model, t.model_cfg, t.ep is not None, weights)
    ema_weights = None
    if t.ema is not None and (ck / ckpt.EMA_FILE).is_file():
        ema_weights = ckpt.read_weights(ck, t.device, ckpt.EMA_FILE)
        check_fits(ck / ckpt.EMA_FILE, t.model, t.model_cfg, t.ep is not None, ema_weights)
    try:
        # Checkpoints hold every expert: slice this rank's share, whatever world size wrote them.
        t.model.load_state_dict(expert_parallel.local_state_dict(t.model, weights), strict=True)
        t.optimizer.load_state_dict(expert_parallel.local_optimizer_state(state["optimizer"], t.optimizer, t.model))
        for name, g in t.route_generators.items():
            if name in state.get("route_rng", {}):
                g.set_state(state["route_rng"][name].cpu())
        t.scheduler.load_state_dict(state["scheduler"])
        t.train_step.load_state_dict(state)
        t.epoch, t.step = int(state["epoch"]), int(state["step"])
        t.best_acc, t.best_epoch = float(state["best_acc"]), state["best_epoch"]
        t.best_model = str(state.get("best_model", "model"))
        if ema_weights is not None:
            t.ema.load(ema_weights, state.get("ema"))
        elif t.ema is not None:
            t.ema.copy_from_model()
            t.log(f"resume: {ck.name} holds no EMA of the weights; the EMA starts from the resumed weights")
        t.history = list(state.get("history", []))
        for name, m in t.model.moe_modules():
            if name in state.get("usage", {}):
                m.usage.copy_(state["usage"][name].to(t.device))
        ckpt.set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{ck / ckpt.STATE_FILE} does not fit this run: {type(e).__name__}: "
                                   f"{ckpt.first_line(e)}") from None
    return ck, state


def check_fits(model_file: Path, model: torch.nn.Module, model_cfg, sharded: bool,
               weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint's tensors are the ones the run's config builds (every expert, whatever this
    rank holds), or one ModelFileError naming the file and what differs."""
    whole = model
    if sharded:  # this rank holds a slice of the experts: compare with the whole model
        try:
            with torch.device("meta"):
                whole = VisionTransformer(model_cfg)
        except Exception:  # noqa: BLE001 - a layer that cannot be built on meta: compare this rank's slice
            whole = None
    try:
        if whole is not None:
            check_tensors(model_file, whole, weights)
        else:
            check_tensors(model_file, model, expert_parallel.local_state_dict(model, weights))
    except ModelFileError as e:
        raise ModelFileError(f"{e} (the run's {rundir.CONFIG_FILE} describes a different model than this "
                             "checkpoint holds)") from None
