"""The training loop: device-resident data, AdamW/Adam, warm-up + cosine per step, label smoothing,
gradient clipping, MoE auxiliary loss, bf16/fp16 autocast, optional torch.compile, crash-safe
checkpoints, exact resume, and per-epoch metrics (the run-directory contract read by vitmoe.report).

Options of issue 5: consistency regularisation of randomly routed models (`consistency_weight`:
two forward passes per step, see `losses.symmetric_kl`), an augmentation policy and normalisation
overrides passed to the loader, and a training-time budget (`time_budget_s`, checked per step).

The hot loop does not synchronise with the device: losses, accuracy counts, expert loads and the
"first non-finite step" marker are accumulated in device tensors and read at log points
(every `log_every` steps) and at the end of each epoch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_write_text
from ..models import ConfigError, VisionTransformer, model_info
from ..moe import parallel as moe_parallel
from . import checkpoint as ckpt
from .config import TrainConfig, check_ep_size, experts_of
from .dist import DistContext, resolve_device
from .losses import symmetric_kl
from .schedule import lr_factor

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
IMAGES_60K = 60_000


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped without saving the bad state."""


class RunDirError(ValueError):
    """The run directory cannot be used (e.g. it already holds a run and --resume was not given)."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_1d: bool) -> list[dict[str, Any]]:
    """Weight decay on matrices (and stacked expert weights) only: not on biases, norms, pos/cls tokens."""
    if not no_decay_1d or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim <= 1 or name in ("pos_embed", "cls_token") or leaf.startswith("b")
                and name.split(".")[-2] == "experts")  # expert biases b1/b2 are [E, H]
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_1d)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def autocast_context(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Progress:
    """tqdm bar per epoch, only on the main rank and only when stdout is a terminal."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off",
             dist: DistContext | None = None) -> dict[str, float]:
    """Test loss and accuracy (percent) over the loader, plus timing (seconds, images/s)."""
    dist = dist or DistContext(device=device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    _sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        with autocast_context(amp, device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        count += y.numel()
    _sync(device)
    seconds = time.perf_counter() - t0
    packed = torch.stack([loss_sum, correct.double(), count.double()])
    dist.all_reduce_sum(packed)
    loss_sum, correct_n, n = packed.tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": 100.0 * correct_n / n, "n": int(n), "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("nan")}


def with_normalization(data, mean, std):
    """`data` whose DatasetInfo normalises with (mean, std) (the loader reads them from the info)."""
    import dataclasses

    from ..data import ImageData

    if tuple(mean) == tuple(data.info.mean) and tuple(std) == tuple(data.info.std):
        return data
    return ImageData(data.images, data.labels, dataclasses.replace(data.info, mean=tuple(mean), std=tuple(std)))


# ---------------------------------------------------------------------------------------------
class Trainer:
    """One training run. `Trainer(cfg).fit()`; `resume=True` continues from `cfg.out`'s latest checkpoint."""

    def __init__(self, cfg: TrainConfig, dist: DistContext | None = None, resume: bool = False,
                 log: Callable[[str], None] | None = None, train_data=None, test_data=None):
        self.cfg = cfg.validate()
        self.dist = dist or DistContext(device=resolve_device(cfg.device))
        self.device = self.dist.device
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp='fp16' is not allowed on CPU: use bf16 or off (fp16 with GradScaler needs CUDA)")
        self.model_cfg = cfg.resolved_model_config()
        self.resume = resume
        self._log = log or print
        self.run_dir = Path(cfg.out or cfg.default_out())
        self.cfg.out = str(self.run_dir)
        if not resume and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise RunDirError(f"run directory {self.run_dir} already holds a run; resume it with "
                              f"--resume {self.run_dir} or choose another --out")
        self._train_data, self._test_data = train_data, test_data

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, dist, device = self.cfg, self.dist, self.device
        seed_everything(cfg.seed, cfg.deterministic, device)
        from ..data import DeviceLoader, load_dataset

        train_data = self._train_data if self._train_data is not None else load_dataset(cfg.dataset, "train", cfg.data_dir)
        test_data = self._test_data if self._test_data is not None else load_dataset(cfg.dataset, "test", cfg.data_dir)
        mean, std = cfg.normalization()
        train_data, test_data = with_normalization(train_data, mean, std), with_normalization(test_data, mean, std)
        self.train_loader = DeviceLoader(train_data, cfg.batch_size, device, train=True, seed=cfg.seed,
                                         rank=dist.rank, world_size=dist.world_size, augment=cfg.augment,
                                         augment_policy=cfg.augment_policy if cfg.augment else "none")
        self.test_loader = DeviceLoader(test_data, cfg.eval_batch_size or cfg.batch_size, device, train=False,
                                        seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, augment=False)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else int(round(cfg.warmup_epochs * self.steps_per_epoch)))

        # Built whole and alike on every rank (same seed); expert parallelism then keeps this
        # rank's slice, so shared-init experts stay identical copies and independent ones distinct.
        self.model = VisionTransformer(self.model_cfg).to(device)
        self.ep = None
        check_ep_size(cfg.ep_size, dist.world_size)
        if cfg.ep_size > 1:
            self.ep = moe_parallel.init_expert_parallel(cfg.ep_size)
            moe_parallel.shard_experts(self.model, self.ep)
        self.route_generators = moe_parallel.seed_random_routers(self.model, cfg.seed, device)
        self.info = model_info(self.model_cfg)
        self.optimizer = build_optimizer(cfg, self.model)
        min_ratio = cfg.min_lr / cfg.lr
        # With a time budget the cosine also follows the budget fraction used (0 without one).
        self.budget_used_s = 0.0
        self.stopped_by_budget = False
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, self.total_steps, self.warmup_steps, cfg.schedule, min_ratio,
                                min_progress=self._budget_fraction()))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.train_module: torch.nn.Module = self.model
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Every parameter gets a gradient each step (expert weights are stacked tensors; a random
            # route's index_select back-propagates a zero-filled gradient to the other experts).
            # Sharded experts differ per rank: their gradients are reduced over their replicas
            # (moe_parallel.reduce_expert_grads), not by DDP. Buffers are per-rank usage counters.
            if self.ep is not None:
                DDP._set_params_and_buffers_to_ignore_for_model(self.model, moe_parallel.expert_param_names(self.model))
            with warnings.catch_warnings():  # its own advice: keep False for rank-local buffers
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.train_module = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
        self.forward = torch.compile(self.train_module) if cfg.compile else self.train_module

        self.epoch, self.step = 0, 0
        self.best_acc, self.best_epoch = -1.0, None
        self.history: list[dict[str, Any]] = []
        self.last_good: Path | None = None
        if self.resume:
            self._restore()
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / CONFIG_FILE)
            self._rewrite_metrics()
        self.tb = self._tensorboard()
        self.budget_used_s = sum(r["epoch_time_s"] for r in self.history)
        extras = []
        if cfg.consistency_weight > 0:
            extras.append(f"consistency weight {cfg.consistency_weight:g} (2 forwards/step"
                          f"{', stop-gradient' if cfg.consistency_stopgrad else ''})")
        if cfg.augment and cfg.augment_policy != "none":
            extras.append(f"augment {cfg.augment_policy}")
        if cfg.time_budget_s is not None:
            extras.append(f"time budget {cfg.time_budget_s:g}s of training")
        self.log(f"{cfg.run_label()} ({cfg.model}) on {cfg.dataset}: {self.info.total_params:,} parameters "
                 f"({self.info.active_params_per_token:,} active per token), {len(train_data):,} train / "
                 f"{len(test_data):,} test images, {self.steps_per_epoch} steps/epoch, batch {cfg.batch_size}, "
                 f"device {device}, run dir {self.run_dir}" + "".join(f"; {e}" for e in extras))

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.log("tensorboard: not installed (pip install tensorboard); logging to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _restore(self) -> None:
        ck = ckpt.latest_checkpoint(self.run_dir)
        if ck is None:
            self.log(f"resume: {self.run_dir} has no checkpoint yet; starting from epoch 1")
            return
        # Checkpoints hold every expert: slice this rank's share, whatever world size wrote them.
        weights = ckpt.read_weights(ck, self.device)
        self.model.load_state_dict(moe_parallel.local_state_dict(self.model, weights), strict=True)
        state = ckpt.load_state(ck, self.device)
        self.optimizer.load_state_dict(moe_parallel.local_optimizer_state(state["optimizer"], self.optimizer, self.model))
        for name, g in self.route_generators.items():
            if name in state.get("route_rng", {}):
                g.set_state(state["route_rng"][name].cpu())
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_acc, self.best_epoch = float(state["best_acc"]), state["best_epoch"]
        self.history = list(state.get("history", []))
        for name, m in self.model.moe_modules():
            if name in state.get("usage", {}):
                m.usage.copy_(state["usage"][name].to(self.device))
        ckpt.set_rng_state(state["rng"])
        self.last_good = ck
        self.log(f"resumed {self.run_dir} from {ck.name} (epoch {self.epoch}, step {self.step})")

    def _rewrite_metrics(self) -> None:
        path = self.run_dir / METRICS_FILE
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.history))

    # -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.setup()
        cfg = self.cfg
        try:
            if self.epoch >= cfg.epochs:
                self.log(f"run already has {self.epoch} of {cfg.epochs} epochs; nothing to do")
            while self.epoch < cfg.epochs:
                if self._budget_exhausted():
                    self.stopped_by_budget = True
                    self.log(f"time budget {cfg.time_budget_s:g}s used ({self.budget_used_s:.1f}s of training); "
                             f"stopping after epoch {self.epoch}")
                    break
                self.train_epoch(self.epoch + 1)
        finally:
            if self.tb is not None:
                self.tb.close()
        summary = self.summary()
        if self.dist.is_main:
            _write_json(self.run_dir / SUMMARY_FILE, summary)
            self.log(f"done: best test accuracy {summary['best_acc']:.2f}% at epoch {summary['best_epoch']}; "
                     f"run dir {self.run_dir}")
        return TrainResult(self.run_dir, summary, self.history)

    def _budget_fraction(self) -> float:
        budget = self.cfg.time_budget_s
        return min(1.0, self.budget_used_s / budget) if budget else 0.0

    def _budget_step_over(self, t0: float, budget_before: float) -> bool:
        """After a step: is the time budget used up? Host clock only (no device sync; on a GPU the
        host may be a few queued steps ahead). Several ranks must stop at the same step, so they
        compare their mean clock, at log points only (every `log_every` steps; 0: at epoch ends)."""
        elapsed = time.perf_counter() - t0
        if self.dist.distributed:
            if not (self.cfg.log_every and self.step % self.cfg.log_every == 0):
                return False
            elapsed = self._mean_over_ranks(elapsed)
        self.budget_used_s = budget_before + elapsed
        return self.budget_used_s >= self.cfg.time_budget_s

    def _mean_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self.dist.all_reduce_sum(t)) / self.dist.world_size

    def _budget_exhausted(self) -> bool:
        return self.cfg.time_budget_s is not None and self.budget_used_s >= self.cfg.time_budget_s

    def _forward_losses(self, x: torch.Tensor, y: torch.Tensor, scale: float, moe: bool):
        """One pass (or two, with consistency) of the batch: (logits of pass 1, cross-entropy, aux
        total, consistency or None, [(aux, stats) of each pass]). Losses are sums times `scale`."""
        cfg, device, model = self.cfg, self.device, self.model
        passes, logits_all = [], []
        for _ in range(cfg.forwards_per_step):  # the second pass draws fresh random routes
            with autocast_context(cfg.amp, device):
                logits_all.append(self.forward(x))
            # Read now: the next forward resets the layers' records (the tensors stay in the graph).
            passes.append((model.aux_loss(), model.moe_stats() if moe else {}))
        ce = [F.cross_entropy(lg.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum") * scale
              for lg in logits_all]
        if len(logits_all) == 1:
            return logits_all[0], ce[0], passes[0][0].total, None, passes
        loss = 0.5 * (ce[0] + ce[1])  # the cross-entropy of both passes, averaged (THOR)
        aux_total = 0.5 * (passes[0][0].total + passes[1][0].total)
        cons = symmetric_kl(logits_all[0], logits_all[1], stopgrad=cfg.consistency_stopgrad, reduction="sum") * scale
        return logits_all[0], loss, aux_total, cons, passes

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, device, model = self.cfg, self.device, self.model
        model.train()
        loader = self.train_loader
        moe_names = [name for name, _ in model.moe_modules()]
        nf = cfg.forwards_per_step
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        cons_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = torch.zeros((), device=device, dtype=torch.int64)
        aux_terms: dict[str, torch.Tensor] = {}
        loads: dict[str, torch.Tensor] = {}
        dropped: dict[str, torch.Tensor] = {}
        entropy: dict[str, torch.Tensor] = {}
        step_dev = torch.full((), self.step, device=device, dtype=torch.int64)
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        n_steps = 0
        bar = _Progress(cfg.progress and self.dist.is_main, self.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
        budget_before = self.budget_used_s
        partial = False
        _sync(device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader.iter_epoch(epoch)):
            # Mean over the GLOBAL batch: ranks may hold unequal shares of the last batch, and DDP
            # averages gradients over ranks, hence the factor world_size / global count.
            global_n = loader.global_batch_size(i)
            logits, loss, aux_total, cons, passes = self._forward_losses(
                x, y, self.dist.world_size / global_n, bool(moe_names))
            total = loss + cfg.aux_loss_weight * aux_total if moe_names else loss
            if cons is not None:
                total = total + cfg.consistency_weight * cons
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self._reduce_expert_grads()
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    self._clip(cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self._reduce_expert_grads()
                if cfg.grad_clip:
                    self._clip(cfg.grad_clip)
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n_steps += 1

            # --- device-side bookkeeping (no host sync) ---
            with torch.no_grad():
                step_dev += 1
                bad = ~torch.isfinite(total.detach())
                first_bad = torch.where(bad & (first_bad < 0), step_dev, first_bad)
                loss_sum += loss.detach() * (global_n / self.dist.world_size)
                aux_sum += aux_total.detach() * y.numel()
                if cons is not None:
                    cons_sum += cons.detach() * (global_n / self.dist.world_size)
                correct += (logits.detach().argmax(-1) == y).sum()
                seen += y.numel()
                for aux, stats in passes:  # loads sum over both passes (work done); rates average
                    for k, v in aux.terms.items():
                        aux_terms[k] = aux_terms.get(k, 0) + v
                    for name, st in stats.items():
                        loads[name] = loads.get(name, 0) + st["load"]
                        dropped[name] = dropped.get(name, 0) + st["dropped_frac"]
                        if "entropy" in st:
                            entropy[name] = entropy.get(name, 0) + st["entropy"]
            bar.update()
            if cfg.log_every and self.step % cfg.log_every == 0:
                self._check_finite(first_bad, epoch, checked="every %d steps" % cfg.log_every)
                cur = float(loss.detach())
                bar.postfix(loss=f"{cur:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.tb is not None:
                    self.tb.add_scalar("train/loss_step", cur, self.step)
                    self.tb.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            if cfg.time_budget_s is not None and i + 1 < self.steps_per_epoch and self._budget_step_over(t0, budget_before):
                partial = True
                break
        _sync(device)
        train_time = time.perf_counter() - t0
        bar.close()
        self._check_finite(first_bad, epoch, checked="at the end of the epoch")
        self.budget_used_s = budget_before + (self._mean_over_ranks(train_time) if self.dist.distributed else train_time)
        if cfg.time_budget_s is not None and self.budget_used_s >= cfg.time_budget_s:
            self.stopped_by_budget = True

        packed = torch.stack([loss_sum.double(), aux_sum.double(), cons_sum.double(), correct.double(),
                              seen.double()])
        self.dist.all_reduce_sum(packed)
        loss_total, aux_total, cons_total, correct_n, seen_n = packed.tolist()
        ev = evaluate(model, self.test_loader, device, cfg.amp, self.dist)
        n = max(seen_n, 1.0)
        row = {
            "epoch": epoch,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_total / n,
            "train_acc": 100.0 * correct_n / n,
            "test_loss": ev["loss"],
            "test_acc": ev["acc"],
            "epoch_time_s": train_time,
            "images_per_s": seen_n / train_time if train_time > 0 else None,
            "eval_time_s": ev["seconds"],
            "eval_images_per_s": ev["images_per_s"],
            "aux_loss": aux_total / n,
            "aux_terms": {k: float(v) / max(n_steps * nf, 1) for k, v in aux_terms.items()},
            "expert_load": {k: [float(c) for c in self.dist.all_reduce_sum(v.clone()).tolist()] for k, v in loads.items()},
            "dropped_frac": {k: float(v) / max(n_steps * nf, 1) for k, v in dropped.items()},
            "router_entropy": {k: float(v) / max(n_steps * nf, 1) for k, v in entropy.items()},
            "forwards_per_step": nf,
            "consistency_loss": cons_total / n if nf > 1 else None,
            "steps_in_epoch": n_steps,
            "partial_epoch": partial,
        }
        if self.dist.distributed:  # per-rank means of fractions -> mean over ranks
            for key in ("aux_terms", "dropped_frac", "router_entropy"):
                for k, v in row[key].items():
                    t = torch.tensor(v, device=device, dtype=torch.float64)
                    row[key][k] = float(self.dist.all_reduce_sum(t)) / self.dist.world_size
        self.epoch = epoch
        is_best = row["test_acc"] > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = row["test_acc"], epoch
        self.history.append(row)
        # Gathering sharded experts is collective: every rank takes part, rank 0 writes.
        state = self._state()
        model_state = moe_parallel.full_state_dict(model) if self.ep is not None else None
        if self.dist.is_main:
            self.last_good = ckpt.save_checkpoint(
                self.run_dir, epoch, model, state, keep=self.cfg.keep_checkpoints, is_best=is_best,
                model_state=model_state,
                metadata={"dataset": cfg.dataset, "epoch": epoch, "test_acc": row["test_acc"],
                          "name": cfg.run_label(), **self._norm_metadata()})
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            _write_json(self.run_dir / SUMMARY_FILE, self.summary())
            if self.tb is not None:
                for k in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "aux_loss",
                          "consistency_loss"):
                    if row[k] is not None:
                        self.tb.add_scalar(f"epoch/{k}", row[k], epoch)
        self.dist.barrier()
        budget = (f"  [{'partial epoch: ' + str(n_steps) + ' steps, ' if partial else ''}time budget "
                  f"{self.budget_used_s:.1f}/{cfg.time_budget_s:g}s]" if cfg.time_budget_s is not None else "")
        self.log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                 f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  lr {row['lr']:.3g}  "
                 f"{row['images_per_s']:.0f} img/s  {train_time:.1f}s"
                 + (f"  aux {row['aux_loss']:.4f}" if moe_names else "")
                 + (f"  consistency {row['consistency_loss']:.4f} (2 forwards/step)" if nf > 1 else "")
                 + budget)
        return row

    def _norm_metadata(self) -> dict[str, Any]:
        """The normalisation, recorded in checkpoints when it is not the dataset's (for `vitmoe eval`)."""
        if self.cfg.norm_mean is None and self.cfg.norm_std is None:
            return {}
        mean, std = self.cfg.normalization()
        return {"normalization": {"mean": list(mean), "std": list(std)}}

    def _reduce_expert_grads(self) -> None:
        if self.ep is not None:
            moe_parallel.reduce_expert_grads(self.model, self.dist.world_size)

    def _clip(self, max_norm: float) -> None:
        if self.ep is not None:
            moe_parallel.clip_grad_norm_(self.model, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _check_finite(self, first_bad: torch.Tensor, epoch: int, checked: str) -> None:
        bad_step = int(first_bad)  # host sync: only at log points and epoch end
        if bad_step < 0:
            return
        where = (f"the last good checkpoint is {self.last_good} (loadable; resume with --resume {self.run_dir})"
                 if self.last_good is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss (NaN/inf) at epoch {epoch}, step {bad_step} (loss checked {checked}); "
            f"stopped without saving this state; {where}. Lower --lr or enable grad_clip.")

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "optimizer": moe_parallel.full_optimizer_state(self.optimizer, self.model),
            "route_rng": {name: g.get_state() for name, g in self.route_generators.items()},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "history": self.history,
            "usage": {name: m.usage.detach().cpu() for name, m in self.model.moe_modules()},
            "config": self.cfg.to_dict(),
        }

    # -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        cfg, h = self.cfg, self.history
        threshold = cfg.threshold
        reached = next((r["epoch"] for r in h if r["test_acc"] >= threshold - 1e-9), None)
        times = [r["epoch_time_s"] for r in h]
        ips = [r["images_per_s"] for r in h if r.get("images_per_s")]
        eips = [r["eval_images_per_s"] for r in h if r.get("eval_images_per_s") and math.isfinite(r["eval_images_per_s"])]
        best = max(h, key=lambda r: r["test_acc"]) if h else None
        return {
            "name": cfg.run_label(),
            "model": cfg.model,
            "experts": experts_of(self.model_cfg),
            "params": self.info.total_params,
            "active_params": self.info.active_params_per_token,
            "merged_params": self.info.merged_params,
            "best_acc": best["test_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_acc": h[-1]["test_acc"] if h else None,
            "threshold": threshold,
            "epochs_to_threshold": reached,
            "train_time_s": sum(times),
            "time_per_epoch_s": sum(times) / len(times) if times else None,
            "train_time_60k_s": IMAGES_60K / statistics.median(ips) if ips else None,
            "inference_time_60k_s": IMAGES_60K / statistics.median(eips) if eips else None,
            "epochs": len(h),
            "epochs_planned": cfg.epochs,
            "dataset": cfg.dataset,
            "batch_size": cfg.batch_size,
            "eval_mode": self.model_cfg.eval_mode if self.model_cfg.moe_block_indices() else None,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "forwards_per_step": cfg.forwards_per_step,
            "consistency_weight": cfg.consistency_weight,
            "augment_policy": cfg.augment_policy if cfg.augment else None,
            "time_budget_s": cfg.time_budget_s,
            "stopped_by_budget": bool(getattr(self, "stopped_by_budget", False)),
            "steps": self.step,
            "wall_time_s": sum(times) + sum(r.get("eval_time_s") or 0.0 for r in h),
        }


def train(cfg: TrainConfig, dist: DistContext | None = None, resume: bool = False,
          log: Callable[[str], None] | None = None, train_data=None, test_data=None) -> TrainResult:
    """Train one run described by `cfg` (its `out` is the run directory)."""
    return Trainer(cfg, dist, resume=resume, log=log, train_data=train_data, test_data=test_data).fit()
