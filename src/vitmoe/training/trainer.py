"""The training loop: per epoch, for each batch: step (forward with the losses, backward, clip,
optimizer step), add to the meters, log; then evaluate, checkpoint and write the metrics row.

The details live beside it: `step` (one optimizer step, one path for fp32/bf16/fp16), `meters`
(device-side sums, no host sync in the loop), `evaluate`, `optim` (optimizer and lr schedule),
`budget` (time budget), `checkpoint` (crash-safe checkpoints) and `vitmoe.rundir` (the run
directory's files, read back by `vitmoe.report`). Optional recipe parts: batch mixing
(`vitmoe.data.mix`, before the step), `freeze` (inside it), `expert_averaging` and `ema` (after it).
"""
from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import rundir
from ..fileio import reporting_disk_full
from ..models import VisionTransformer, model_info
from ..moe import seed_random_routers
from ..moe.parallel import init_expert_parallel
from ..report.analysis import DEAD_THRESHOLD, dead_experts
from ..runlock import RunDirError, RunLock, check_run_dir, lock_run_dir
from ..validation import ConfigError
from . import checkpoint as ckpt
from . import expert_parallel
from .budget import TimeBudget
from .config import TrainConfig
from ..data.mix import BatchMixer
from .data_spec import build_loaders, class_metadata
from .dist import DistContext, resolve_device, synchronize, wrap_ddp
from .ema import ModelEMA, better_model
from .evaluate import autocast_context, evaluate
from .expert_averaging import ExpertAverager
from .init import apply_init, check_init
from .meters import EpochMeters
from .model_spec import check_ep_size
from .optim import LRSchedule, build_optimizer, build_scheduler, param_groups
from .progress import Progress, open_tensorboard
from .restore import restore_checkpoint
from .run_summary import describe, run_summary
from .step import TrainStep

__all__ = ["Trainer", "TrainResult", "train", "evaluate", "NonFiniteLossError", "RunDirError",
           "seed_everything", "build_optimizer", "param_groups", "autocast_context"]


def dead_experts_by_layer(expert_load: dict | None) -> dict[str, list[int]]:
    """Per MoE layer, the experts the epoch's routing left (nearly) unused."""
    found = {name: dead_experts(load) for name, load in (expert_load or {}).items() if len(load) > 1}
    return {name: experts for name, experts in found.items() if experts}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped without saving the bad state."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """One training run. `Trainer(cfg).fit()`; `resume=True` continues from `cfg.out`'s latest checkpoint.
    `cfg` is validated here unless it is already a validated copy (`TrainConfig.validate()`)."""

    def __init__(self, cfg: TrainConfig, dist: DistContext | None = None, resume: bool = False,
                 log: Callable[[str], None] | None = None, train_data=None, test_data=None, force: bool = False):
        cfg = cfg if cfg.validated else cfg.validate()
        self.dist = dist or DistContext(device=resolve_device(cfg.device))
        self.device = self.dist.device
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp='fp16' is not allowed on CPU: use bf16 or off (fp16 with GradScaler needs CUDA)")
        self.run_dir = Path(cfg.out or cfg.default_out())
        if cfg.out != str(self.run_dir):  # our copy names its run directory; the caller's stays as it was
            cfg = _with_out(cfg, str(self.run_dir))
        self.cfg = cfg
        self.model_cfg = cfg.resolved_model_config()
        if cfg.init and not resume:  # before any data is loaded: SRC exists and fits this model
            check_init(cfg.init, self.model_cfg)
        self.resume = resume
        self._log = log or print
        self.force, self._lock, self.tb = force, RunLock(self.run_dir), None
        if self.dist.is_main:  # in use by another process, a run not resumed, a folder vitmoe did not make
            check_run_dir(self.run_dir, resume, force)
        self._train_data, self._test_data = train_data, test_data

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, dist, device = self.cfg, self.dist, self.device
        seed_everything(cfg.seed, cfg.deterministic, device)
        self._build_loaders()
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else int(round(cfg.warmup_epochs * self.steps_per_epoch)))

        # Built whole and alike on every rank (same seed); expert parallelism then keeps this
        # rank's slice, so shared-init experts stay identical copies and independent ones distinct.
        self.model = VisionTransformer(self.model_cfg).to(device)
        apply_init(self)  # --init SRC: its weights (upcycled / adapted), before experts are split over ranks
        self.ep = None
        check_ep_size(cfg.ep_size, dist.world_size)
        if cfg.ep_size > 1:
            self.ep = init_expert_parallel(cfg.ep_size)
            expert_parallel.shard_experts(self.model, self.ep)
        self.route_generators = seed_random_routers(self.model, cfg.seed, device)
        self.info = model_info(self.model_cfg)
        self.optimizer = build_optimizer(cfg, self.model)
        self.mixer = BatchMixer.from_config(cfg, self.model_cfg.num_classes)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None  # before DDP wraps the model
        self.averager = ExpertAverager(self.model, self.optimizer, cfg.merge_every) if cfg.merge_every else None
        self.budget = TimeBudget(cfg.time_budget_s, dist, cfg.log_every)
        self.lr_schedule = LRSchedule(cfg, self.total_steps, self.warmup_steps, self.budget.fraction)
        self.scheduler = build_scheduler(self.optimizer, self.lr_schedule)
        train_module = self.model
        if dist.distributed:
            ignore = expert_parallel.expert_param_names(self.model) if self.ep is not None else []
            train_module = wrap_ddp(self.model, device, ignore)
        self.forward = torch.compile(train_module) if cfg.compile else train_module
        self.train_step = TrainStep(cfg, self.model, self.forward, self.optimizer, self.scheduler, device,
                                    dist.world_size, self.ep)

        self.epoch, self.step = 0, 0
        self.best_acc, self.best_epoch, self.best_model = -1.0, None, "model"
        self.history: list[dict[str, Any]] = []
        self.last_good: Path | None = None
        if dist.is_main:  # one writer per run directory, from before its first write until fit() ends
            self._lock = lock_run_dir(self.run_dir, self.resume, self.force)
        if self.resume:
            self._restore()
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / rundir.CONFIG_FILE)
            rundir.write_metrics(self.run_dir, self.history)
        self.tb = open_tensorboard(self.run_dir, self.log) if cfg.tensorboard and dist.is_main else None
        self.budget.used_s = sum(r["epoch_time_s"] for r in self.history)
        self.log(describe(self))

    def _build_loaders(self) -> None:
        # on the device, or streamed from host memory above stream_above_mb; resized to the model's side
        self.train_loader, self.test_loader = build_loaders(self.cfg, self.dist, self.device, self._train_data,
                                                            self._test_data)

    # -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            self.setup()
            cfg = self.cfg
            if self.epoch >= cfg.epochs:
                self.log(f"run already has {self.epoch} of {cfg.epochs} epochs; nothing to do")
            while self.epoch < cfg.epochs:
                if self.budget.exhausted():
                    self.budget.stopped = True
                    self.log(f"time budget {cfg.time_budget_s:g}s used ({self.budget.used_s:.1f}s of training); "
                             f"stopping after epoch {self.epoch}")
                    break
                self.train_epoch(self.epoch + 1)
            summary = self.summary()
            if self.dist.is_main:
                rundir.write_summary(self.run_dir, summary)
                self.log(f"done: best test accuracy {summary['best_acc']:.2f}% at epoch {summary['best_epoch']}; "
                         f"run dir {self.run_dir}")
        finally:
            if self.tb is not None:
                self.tb.close()
            self._lock.release()
        return TrainResult(self.run_dir, summary, self.history)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, loader = self.cfg, self.train_loader
        self.model.train()
        meters = EpochMeters(self.device, self.step, cfg.forwards_per_step)
        bar = Progress(cfg.progress and self.dist.is_main, self.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
        self.budget.begin_epoch()
        partial = False
        synchronize(self.device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader.iter_epoch(epoch)):
            # Mean over the GLOBAL batch: ranks may hold unequal shares of the last batch, and DDP
            # averages gradients over ranks, hence the factor world_size / global count.
            global_n = loader.global_batch_size(i)
            x, targets = self.mixer(x, y, epoch, i) if self.mixer is not None else (x, None)
            # Unmixed batches keep the three-argument call that wrappers of TrainStep are written for.
            out = self.train_step(x, y, self.dist.world_size / global_n, *(() if targets is None else (targets,)))
            self.step += 1
            if self.averager is not None:
                self.averager.after_step(self.step)
            if self.ema is not None:
                self.ema.update()
            meters.update(out, y, global_n, self.dist.world_size)
            bar.update()
            if cfg.log_every and self.step % cfg.log_every == 0:
                self._check_finite(meters, epoch, checked=f"every {cfg.log_every} steps")
                self._log_step(out, bar)
            if i + 1 < self.steps_per_epoch and self.budget.over_after_step(time.perf_counter() - t0, self.step):
                partial = True
                break
        synchronize(self.device)
        train_time = time.perf_counter() - t0
        bar.close()
        self._check_finite(meters, epoch, checked="at the end of the epoch")
        self.budget.end_epoch(train_time)
        return self._end_epoch(epoch, meters, train_time, partial)

    def _log_step(self, out, bar: Progress) -> None:
        loss, lr = float(out.loss.detach()), self.scheduler.get_last_lr()[0]
        bar.postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, self.step)
            self.tb.add_scalar("train/lr", lr, self.step)

    def _end_epoch(self, epoch: int, meters: EpochMeters, train_time: float, partial: bool) -> dict[str, Any]:
        """Evaluate, write the metrics row and the checkpoint, log the epoch."""
        cfg = self.cfg
        train = meters.reduce(self.dist)
        ev = evaluate(self.model, self.test_loader, self.device, cfg.amp, self.dist)
        ema = self.ema.evaluate(self.test_loader, self.device, cfg.amp, self.dist, cfg.seed, epoch) if self.ema else {}
        row = {
            "epoch": epoch,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": train["train_loss"],
            "train_acc": train["train_acc"],
            "test_loss": ev["loss"],
            "test_acc": ev["acc"],
            "epoch_time_s": train_time,
            "images_per_s": train["images"] / train_time if train_time > 0 else None,
            "eval_time_s": ev["seconds"],
            "eval_images_per_s": ev["images_per_s"],
            **ema,
            **{k: train[k] for k in ("aux_loss", "aux_terms", "expert_load", "dropped_frac", "router_entropy",
                                     "forwards_per_step", "consistency_loss", "steps_in_epoch")},
            "partial_epoch": partial,
        }
        self.epoch = epoch
        acc, which = better_model(row)  # with EMA on, `best` is the better of both models
        is_best = acc > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch, self.best_model = acc, epoch, which
        self.history.append(row)
        self._save(row, is_best)
        budget = (f"  [{'partial epoch: ' + str(meters.steps) + ' steps, ' if partial else ''}time budget "
                  f"{self.budget.used_s:.1f}/{cfg.time_budget_s:g}s]" if cfg.time_budget_s is not None else "")
        self.log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                 f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
                 + (f"EMA loss {row['ema_test_loss']:.4f} acc {row['ema_test_acc']:.2f}%  " if ema else "")
                 + f"lr {row['lr']:.3g}  "
                 f"{row['images_per_s']:.0f} img/s  {train_time:.1f}s"
                 + (f"  aux {row['aux_loss']:.4f}" if self.model_cfg.moe_block_indices() else "")
                 + (f"  consistency {row['consistency_loss']:.4f} (2 forwards/step)" if meters.forwards_per_step > 1 else "")
                 + budget)
        for layer, experts in dead_experts_by_layer(row.get("expert_load")).items():
            self.log(f"warning: {layer}: expert{'s' if len(experts) > 1 else ''} {experts} received under "
                     f"{100 * DEAD_THRESHOLD:g}% of a uniform share of the tokens this epoch (dead experts; "
                     f"`vitmoe analyze` shows the routing)")
        return row

    def _save(self, row: dict[str, Any], is_best: bool) -> None:
        """The epoch's checkpoint, metrics row and summary (rank 0 writes; gathering sharded experts
        is collective, so every rank takes part)."""
        cfg, epoch = self.cfg, row["epoch"]
        state = self._state()
        model_state = expert_parallel.full_state_dict(self.model) if self.ep is not None else None
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        if self.dist.is_main:
            meta = {"dataset": cfg.dataset, "epoch": epoch, "test_acc": row["test_acc"], "name": cfg.run_label(),
                    **self._norm_metadata(), **class_metadata(cfg)}
            extra = ({ckpt.EMA_FILE: (self.ema.module, ema_state, {**meta, "test_acc": row["ema_test_acc"],
                                                              "ema_decay": cfg.ema_decay})} if self.ema else None)
            self.last_good = ckpt.save_checkpoint(self.run_dir, epoch, self.model, state, keep=cfg.keep_checkpoints,
                                                  is_best=is_best, model_state=model_state, metadata=meta,
                                                  extra_models=extra)
            with reporting_disk_full(self.run_dir / rundir.METRICS_FILE):  # one message, not a traceback
                rundir.append_metrics(self.run_dir, row)
            rundir.write_summary(self.run_dir, self.summary())
            if self.tb is not None:
                for k in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "aux_loss",
                          "consistency_loss", "ema_test_loss", "ema_test_acc"):
                    if row.get(k) is not None:
                        self.tb.add_scalar(f"epoch/{k}", row[k], epoch)
        self.dist.barrier()

    def _norm_metadata(self) -> dict[str, Any]:
        """The normalisation, recorded in checkpoints when it is not the dataset's (for `vitmoe eval`)."""
        if self.cfg.norm_mean is None and self.cfg.norm_std is None:
            return {}
        mean, std = self.cfg.normalization()
        return {"normalization": {"mean": list(mean), "std": list(std)}}

    def _check_finite(self, meters: EpochMeters, epoch: int, checked: str) -> None:
        # Host sync, only at log points and epoch end; the first bad step of any rank, so all stop here together.
        bad_step = self.dist.first_over_ranks(meters.first_bad_step())
        if bad_step < 0:
            return
        where = (f"the last good checkpoint is {self.last_good} (loadable; resume with --resume {self.run_dir})"
                 if self.last_good is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss (NaN/inf) at epoch {epoch}, step {bad_step} (loss checked {checked}); "
            f"stopped without saving this state; {where}. Lower --lr or enable grad_clip.")

    # -----------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_model": self.best_model,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": expert_parallel.full_optimizer_state(self.optimizer, self.model),
            "route_rng": {name: g.get_state() for name, g in self.route_generators.items()},
            "scheduler": self.scheduler.state_dict(),
            "lr_cycles": list(self.lr_schedule.cycles),
            **self.train_step.state_dict(),
            "rng": ckpt.rng_state(),
            "history": self.history,
            "usage": {name: m.usage.detach().cpu() for name, m in self.model.moe_modules()},
            "config": self.cfg.to_dict(),
        }

    def _restore(self) -> None:
        found = restore_checkpoint(self)  # the newest usable checkpoint, checked against this run's model
        if found is None:
            self.log(f"resume: {self.run_dir} has no checkpoint yet; starting from epoch 1")
            return
        ck, state = found
        self.last_good = ck
        self._restore_schedule(state)
        self.log(f"resumed {self.run_dir} from {ck.name} (epoch {self.epoch}, step {self.step})")

    def _restore_schedule(self, state: dict[str, Any]) -> None:
        """The lr cycles the checkpoint planned, adapted to this run's epochs (`resume_schedule`)."""
        saved = state.get("lr_cycles") or [0, int(state.get("config", {}).get("epochs", self.cfg.epochs))
                                           * self.steps_per_epoch]
        self.budget.used_s = sum(r["epoch_time_s"] for r in self.history)
        if self.lr_schedule.resume(saved, self.cfg.resume_schedule, self.scheduler, self.step):
            self.log(f"resume: {saved[-1] // self.steps_per_epoch} -> {self.cfg.epochs} epochs; lr schedule "
                     f"{self.cfg.resume_schedule!r}: cycles {self.lr_schedule.cycles} (steps)")

    # -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return run_summary(self)


def _with_out(cfg: TrainConfig, out: str) -> TrainConfig:
    """A copy of a validated config naming its run directory (a str: nothing to re-check)."""
    new = copy.deepcopy(cfg)
    new.out = out
    return new


def train(cfg: TrainConfig, dist: DistContext | None = None, resume: bool = False,
          log: Callable[[str], None] | None = None, train_data=None, test_data=None,
          force: bool = False) -> TrainResult:
    """Train one run described by `cfg` (its `out` is the run directory; `force`: see runlock.check_run_dir)."""
    return Trainer(cfg, dist, resume, log, train_data, test_data, force).fit()
