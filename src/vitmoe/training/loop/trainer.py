"""The training loop: per epoch, for each batch: step (forward with the losses, backward, clip,
optimizer step), add to the meters, log; then evaluate, checkpoint and write the metrics row.

The Trainer takes a RunSpec (config.spec: the run resolved once) and carries a TrainState (state:
epoch, step, best, history), which checkpoints save, `--resume` restores and the summary reads.
The details live beside it in this package (see its map); optional recipe parts: batch mixing
(`vitmoe.data.mix`, before the step), `recipe.freeze` (inside it), `recipe.expert_averaging` and
`recipe.ema` (after it).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ... import rundir
from ...fileio import reporting_disk_full
from ...models import VisionTransformer, model_info
from ...moe import seed_random_routers
from ...moe.parallel import init_expert_parallel
from ...data.mix import BatchMixer
from ...rundir import RunDirError, RunLock, check_run_dir, lock_run_dir
from ...validation import ConfigError
from ..checkpoints import checkpoint as ckpt
from ..checkpoints.restore import restore_checkpoint
from ..checkpoints.warm_start import apply_init, check_init
from ..config.model import check_ep_size
from ..config.spec import RunSpec, resolve
from ..config.train_config import TrainConfig
from ..distributed import expert_parallel
from ..distributed.context import DistContext, resolve_device, synchronize, wrap_ddp
from ..evaluation.evaluate import evaluate
from ..evaluation.precision import amp_note
from ..recipe.ema import ModelEMA, better_model
from .dead_experts import DeadExpertNotes
from ..recipe.expert_averaging import ExpertAverager
from .budget import TimeBudget
from .loaders import build_loaders
from .meters import EpochMeters
from .optim import build_optimizer
from .progress import Progress, open_tensorboard
from .schedule import LRSchedule, build_scheduler
from ..checkpoints.state import TrainState
from .step import TrainStep
from .summary import describe, run_summary

__all__ = ["Trainer", "TrainResult", "train", "NonFiniteLossError", "RunDirError", "seed_everything"]


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
        if device.type == "cpu":
            # Deterministic mode also fills every new tensor with NaN, a debugging aid that makes a kernel
            # reading memory it did not write show up: 238 fills a step, 1-3 % of the recipe's CPU step
            # (BENCHMARKS.md s.9). The CPU kernels vitmoe uses write what they read (a run trains the
            # same weights bit for bit with and without it, tests/test_train_checkpoint.py); on GPUs,
            # where fills are cheap and some grouped-matmul kernels have been reported to leave
            # outputs unwritten, it stays on.
            torch.utils.deterministic.fill_uninitialized_memory = False


class Trainer:
    """One training run. `Trainer(spec).fit()`; `resume=True` continues from the run directory's latest
    checkpoint. `spec` is a RunSpec (`config.spec.resolve`), or a TrainConfig that is resolved here."""

    def __init__(self, spec: RunSpec | TrainConfig, dist: DistContext | None = None, resume: bool = False,
                 log: Callable[[str], None] | None = None, train_data=None, test_data=None, force: bool = False):
        self.spec = spec if isinstance(spec, RunSpec) else resolve(spec)
        cfg = self.spec.config
        self.dist = dist or DistContext(device=resolve_device(cfg.device))
        self.device = self.dist.device
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp='fp16' is not allowed on CPU: use bf16, auto or off (fp16 with GradScaler needs CUDA)")
        self.run_dir = self.spec.run_dir
        if cfg.init and not resume:  # before any data is loaded: SRC exists and fits this model
            check_init(cfg.init, self.spec.model)
        self.resume = resume
        self._log = log or print
        self.force, self._lock, self.tb = force, RunLock(self.run_dir), None
        if self.dist.is_main:  # in use by another process, a run not resumed, a folder vitmoe did not make
            # (a restart's lock is waited for in setup: the failed attempt's writer may still be dying)
            check_run_dir(self.run_dir, resume, force, check_lock=not self.dist.restart)
        self._train_data, self._test_data = train_data, test_data
        self.state = TrainState()
        self.dead_notes = DeadExpertNotes(self.spec.model)  # what the log last said about dead experts

    @property
    def cfg(self) -> TrainConfig:
        return self.spec.config

    @property
    def model_cfg(self):
        return self.spec.model

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        spec, cfg, dist, device = self.spec, self.cfg, self.dist, self.device
        seed_everything(cfg.seed, cfg.deterministic, device)
        # on the device, or streamed from host memory above stream_above_mb; resized to the model's side
        self.train_loader, self.test_loader = build_loaders(spec, dist, device, self._train_data, self._test_data)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else int(round(cfg.warmup_epochs * self.steps_per_epoch)))

        # Built whole and alike on every rank (same seed); expert parallelism then keeps this
        # rank's slice, so shared-init experts stay identical copies and independent ones distinct.
        self.model = VisionTransformer(spec.model).to(device)
        # --init SRC: its weights (upcycled / adapted), before experts are split over ranks
        apply_init(self.model, cfg.init, self.resume, self.run_dir, self.log)
        self.ep = None
        check_ep_size(cfg.ep_size, dist.world_size)
        if cfg.ep_size > 1:
            self.ep = init_expert_parallel(cfg.ep_size, timedelta(seconds=cfg.dist_timeout_s))
            expert_parallel.shard_experts(self.model, self.ep)
        self.route_generators = seed_random_routers(self.model, cfg.seed, device)
        self.info = model_info(spec.model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.mixer = BatchMixer.from_config(cfg, spec.model.num_classes)
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

        self.state = TrainState()
        if dist.is_main:  # one writer per run directory, from before its first write until fit() ends
            # a restart takes over from the failed attempt's writer, which may still be dying (rundir's handover)
            self._lock = lock_run_dir(self.run_dir, self.resume, self.force,
                                      wait_s=cfg.dist_timeout_s if dist.restart else 0.0)
        if self.resume:
            self._restore()
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            spec.save_yaml(self.run_dir / rundir.CONFIG_FILE)
            rundir.write_metrics(self.run_dir, self.state.history)
        self.tb = open_tensorboard(self.run_dir, self.log) if cfg.tensorboard and dist.is_main else None
        self.budget.used_s = self.state.budget_used_s
        self.log(describe(spec, self.info, self.train_loader, self.test_loader, self.device, self.mixer,
                          self.lr_schedule.cycles))
        note = amp_note(cfg.amp, device)  # what "auto" chose, or bf16 asked of a device that emulates it
        if note:
            self.log(note)

    # -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            self.setup()
            cfg = self.cfg
            if self.state.epoch >= cfg.epochs:
                self.log(f"run already has {self.state.epoch} of {cfg.epochs} epochs; nothing to do")
            while self.state.epoch < cfg.epochs:
                if self.budget.exhausted():
                    self.state.stopped_by_budget = True
                    self.log(f"time budget {cfg.time_budget_s:g}s used ({self.budget.used_s:.1f}s of training); "
                             f"stopping after epoch {self.state.epoch}")
                    break
                self.train_epoch(self.state.epoch + 1)
            summary = self.summary()
            if self.dist.is_main:
                rundir.write_summary(self.run_dir, summary)
                self.log(f"done: best test accuracy {summary['best_acc']:.2f}% at epoch {summary['best_epoch']}; "
                         f"run dir {self.run_dir}")
        finally:
            if self.tb is not None:
                self.tb.close()
            self._lock.release()
        return TrainResult(self.run_dir, summary, self.state.history)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, loader = self.cfg, self.train_loader
        self.model.train()
        meters = EpochMeters(self.device, self.state.step, cfg.forwards_per_step)
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
            self.state.step += 1
            step = self.state.step
            if self.averager is not None:
                self.averager.after_step(step)
            if self.ema is not None:
                self.ema.update()
            meters.update(out, y, global_n, self.dist.world_size)
            bar.update()
            if cfg.log_every and step % cfg.log_every == 0:
                self._check_finite(meters, epoch, checked=f"every {cfg.log_every} steps")
                self._log_step(out, bar)
            if i + 1 < self.steps_per_epoch and self.budget.over_after_step(time.perf_counter() - t0, step):
                partial = True
                break
        synchronize(self.device)
        train_time = time.perf_counter() - t0
        bar.close()
        self._check_finite(meters, epoch, checked="at the end of the epoch")
        if self.budget.end_epoch(train_time):
            self.state.stopped_by_budget = True
        return self._end_epoch(epoch, meters, train_time, partial)

    def _log_step(self, out, bar: Progress) -> None:
        loss, lr = float(out.loss.detach()), self.scheduler.get_last_lr()[0]
        bar.postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, self.state.step)
            self.tb.add_scalar("train/lr", lr, self.state.step)

    def _end_epoch(self, epoch: int, meters: EpochMeters, train_time: float, partial: bool) -> dict[str, Any]:
        """Evaluate, write the metrics row and the checkpoint, log the epoch."""
        cfg = self.cfg
        train = meters.reduce(self.dist)
        ev = evaluate(self.model, self.test_loader, self.device, cfg.amp, self.dist)
        ema = self.ema.evaluate(self.test_loader, self.device, cfg.amp, self.dist, cfg.seed, epoch) if self.ema else {}
        row = {
            "epoch": epoch,
            "step": self.state.step,
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
        acc, which = better_model(row)  # with EMA on, `best` is the better of both models
        self.state, is_best = self.state.after_epoch(row, acc, which)
        self._save(row, is_best)
        budget = (f"  [{'partial epoch: ' + str(meters.steps) + ' steps, ' if partial else ''}time budget "
                  f"{self.budget.used_s:.1f}/{cfg.time_budget_s:g}s]" if cfg.time_budget_s is not None else "")
        self.log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                 f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
                 + (f"EMA loss {row['ema_test_loss']:.4f} acc {row['ema_test_acc']:.2f}%  " if ema else "")
                 + f"lr {row['lr']:.3g}  "
                 f"{row['images_per_s']:.0f} img/s  {train_time:.1f}s"
                 + (f"  aux {row['aux_loss']:.4f}" if self.spec.model.moe_block_indices() else "")
                 + (f"  consistency {row['consistency_loss']:.4f} (2 forwards/step)" if meters.forwards_per_step > 1 else "")
                 + budget)
        dead = self.dead_notes.note(epoch, row.get("expert_load"))
        if dead:
            self.log(dead)
        return row

    def _save(self, row: dict[str, Any], is_best: bool) -> None:
        """The epoch's checkpoint, metrics row and summary (rank 0 writes; gathering sharded experts
        is collective, so every rank takes part)."""
        spec, cfg, epoch = self.spec, self.cfg, row["epoch"]
        state = self._checkpoint_state()
        model_state = expert_parallel.full_state_dict(self.model) if self.ep is not None else None
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        if self.dist.is_main:
            meta = {"dataset": cfg.dataset, "epoch": epoch, "test_acc": row["test_acc"], "name": spec.label,
                    **spec.norm_metadata(), **spec.class_metadata(), **spec.preprocessing_metadata()}
            extra = ({ckpt.EMA_FILE: (self.ema.module, ema_state, {**meta, "test_acc": row["ema_test_acc"],
                                                              "ema_decay": cfg.ema_decay})} if self.ema else None)
            self.state.last_good = ckpt.save_checkpoint(self.run_dir, epoch, self.model, state, keep=cfg.keep_checkpoints,
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

    def _check_finite(self, meters: EpochMeters, epoch: int, checked: str) -> None:
        # Host sync, only at log points and epoch end; the first bad step of any rank, so all stop here together.
        bad_step = self.dist.first_over_ranks(meters.first_bad_step())
        if bad_step < 0:
            return
        last_good = self.state.last_good
        where = (f"the last good checkpoint is {last_good} (loadable; resume with --resume {self.run_dir})"
                 if last_good is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss (NaN/inf) at epoch {epoch}, step {bad_step} (loss checked {checked}); "
            f"stopped without saving this state; {where}. Lower --lr or enable grad_clip.")

    # -----------------------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        """state.pt: the run's progress (TrainState) and what the loop needs to continue exactly."""
        return {
            **self.state.as_checkpoint(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": expert_parallel.full_optimizer_state(self.optimizer, self.model),
            "route_rng": {name: g.get_state() for name, g in self.route_generators.items()},
            "scheduler": self.scheduler.state_dict(),
            "lr_cycles": list(self.lr_schedule.cycles),
            **self.train_step.state_dict(),
            "rng": ckpt.rng_state(),
            "usage": {name: m.usage.detach().cpu() for name, m in self.model.moe_modules()},
            "config": self.cfg.to_dict(),
        }

    def _restore(self) -> None:
        # the newest usable checkpoint, checked against this run's model, loaded into its parts
        found = restore_checkpoint(self.run_dir, self.spec.model, self.device, self.model, self.optimizer,
                                   self.scheduler, self.route_generators, self.train_step, self.ema,
                                   sharded=self.ep is not None, log=self.log)
        if found is None:
            self.log(f"resume: {self.run_dir} has no checkpoint yet; starting from epoch 1")
            return
        self.state, saved = found
        self._restore_schedule(saved)
        self.log(f"resumed {self.run_dir} from {self.state.last_good.name} (epoch {self.state.epoch}, "
                 f"step {self.state.step})")

    def _restore_schedule(self, state: dict[str, Any]) -> None:
        """The lr cycles the checkpoint planned, adapted to this run's epochs (`resume_schedule`)."""
        saved = state.get("lr_cycles") or [0, int(state.get("config", {}).get("epochs", self.cfg.epochs))
                                           * self.steps_per_epoch]
        self.budget.used_s = self.state.budget_used_s
        if self.lr_schedule.resume(saved, self.cfg.resume_schedule, self.scheduler, self.state.step):
            self.log(f"resume: {saved[-1] // self.steps_per_epoch} -> {self.cfg.epochs} epochs; lr schedule "
                     f"{self.cfg.resume_schedule!r}: cycles {self.lr_schedule.cycles} (steps)")

    # -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return run_summary(self.spec, self.state, self.info, self.test_loader.num_samples, self.device,
                           self.dist.world_size)


def train(cfg: RunSpec | TrainConfig, dist: DistContext | None = None, resume: bool = False,
          log: Callable[[str], None] | None = None, train_data=None, test_data=None,
          force: bool = False) -> TrainResult:
    """Train one run described by `cfg`, a RunSpec or a TrainConfig (its `out` is the run directory;
    `force`: see rundir.check_run_dir)."""
    return Trainer(cfg, dist, resume, log, train_data, test_data, force).fit()
