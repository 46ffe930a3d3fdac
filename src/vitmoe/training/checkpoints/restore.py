"""Resuming a Trainer: the newest usable checkpoint (`checkpoint.load_for_resume`: it verifies and
loads as plain data; skipped ones are logged), checked against the run's model before anything is
loaded, then applied to the model (and its EMA: a checkpoint without one, e.g. written before EMA
was turned on, restarts the EMA at the resumed weights), optimizer, scheduler, step counters and
RNGs. A checkpoint that
does not fit the run is one error naming its file and what differs, never a load_state_dict
traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ... import rundir
from ...models import VisionTransformer
from ...models.io import ModelFileError, check_tensors
from . import checkpoint as ckpt
from ..distributed import expert_parallel
from .state import TrainState


def restore_checkpoint(run_dir: Path, model_cfg, device: torch.device, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler, route_generators: dict, train_step, ema,
                       sharded: bool, log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any]] | None:
    """Load the newest usable checkpoint of `run_dir` into the run's parts (the model of config
    `model_cfg`, its optimizer, lr scheduler, route generators, training step and EMA or None;
    `sharded`: this rank holds a slice of the experts). Returns the TrainState it recorded (its
    `last_good` the checkpoint's directory) and its whole saved state, or None when the run has no
    checkpoint yet."""
    found = ckpt.load_for_resume(run_dir, device, log=log)
    if found is None:
        return None
    ck, weights, state = found
    check_fits(ck / ckpt.MODEL_FILE, model, model_cfg, sharded, weights)
    ema_weights = None
    if ema is not None and (ck / ckpt.EMA_FILE).is_file():
        ema_weights = ckpt.read_weights(ck, device, ckpt.EMA_FILE)
        check_fits(ck / ckpt.EMA_FILE, model, model_cfg, sharded, ema_weights)
    try:
        # Checkpoints hold every expert: slice this rank's share, whatever world size wrote them.
        model.load_state_dict(expert_parallel.local_state_dict(model, weights), strict=True)
        optimizer.load_state_dict(expert_parallel.local_optimizer_state(state["optimizer"], optimizer, model))
        for name, g in route_generators.items():
            if name in state.get("route_rng", {}):
                g.set_state(state["route_rng"][name].cpu())
        scheduler.load_state_dict(state["scheduler"])
        train_step.load_state_dict(state)
        progress = TrainState.from_checkpoint(state, last_good=ck)
        if ema_weights is not None:
            ema.load(ema_weights, state.get("ema"))
        elif ema is not None:
            ema.copy_from_model()
            log(f"resume: {ck.name} holds no EMA of the weights; the EMA starts from the resumed weights")
        for name, m in model.moe_modules():
            if name in state.get("usage", {}):
                m.usage.copy_(state["usage"][name].to(device))
        ckpt.set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{ck / ckpt.STATE_FILE} does not fit this run: {type(e).__name__}: "
                                   f"{ckpt.first_line(e)}") from None
    return progress, state


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
