"""TrainConfig: every training knob, loaded from YAML, overridden by flags and `--set key=value`,
validated in one place (`TrainConfig.validate`) with messages that name the field and what is allowed.

Precedence (lowest first): TrainConfig defaults (the source project's recipe, REFERENCE.md s.1)
< config file < explicit command-line flags < `--set` overrides.

Model fields live in `model_config` (a mapping of ViTConfig overrides on top of the `model`
preset). The dataset fixes `img_size`, `in_chans` and `num_classes`; when `patch_size` is not
given, a dataset default applies (digits: 2, so 8x8 images give 4x4 patches), and if the
preset's patch does not divide the image size the largest divisor below it is used.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..models import ConfigError, ViTConfig, model_config
from ..models.registry import list_models

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("off", "bf16", "fp16")
EVAL_MODES = ("merged", "random", "ensemble")
DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist", "digits")
# Patch size used for a dataset when the user does not choose one (None: keep the preset's).
DATASET_PATCH: dict[str, int] = {}
# Fields that may differ when resuming a run (they do not change what is being trained).
RESUMABLE_FIELDS = frozenset({
    "epochs", "log_every", "tensorboard", "compile", "amp", "device", "nproc", "keep_checkpoints",
    "data_dir", "eval_mode", "threshold", "out", "progress", "ep_size", "dist_timeout_s", "time_budget_s",
})
# Augmentation policies applied after the random crop (see vitmoe.data.autoaugment.POLICIES).
AUGMENT_POLICIES = ("none", "autoaugment", "randaugment")


def check_ep_size(ep_size: int, world_size: int) -> None:
    """Expert-parallel groups must tile the world."""
    if world_size % ep_size:
        raise ConfigError(f"ep_size={ep_size} is not allowed: it must divide the number of processes ({world_size}); "
                          f"resuming on fewer processes? pass --ep-size with a divisor of {world_size} (checkpoints "
                          f"hold every expert, so any world size and ep_size can continue a run)")


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = "switch_vit"
    """Model preset (see `vitmoe.list_models()`); the source trains switch_vit unless --noswitch."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """ViTConfig overrides on top of the preset, e.g. {embed_dim: 300, num_experts: 64}."""
    dataset: str = "cifar10"
    data_dir: str | None = None
    augment: bool = True
    """Random crop (+ horizontal flip where it preserves the label) on the device, per the dataset."""
    augment_policy: str = "none"
    """"none", "autoaugment" (the CIFAR-10 AutoAugment policy, as in the ColossalAI recipe) or
    "randaugment" (2 ops, magnitude 9), applied between the crop and the flip; needs augment=true."""
    norm_mean: list[float] | None = None
    """Per-channel normalisation mean on the 0..1 scale; None: the dataset's statistics."""
    norm_std: list[float] | None = None
    """Per-channel normalisation std; None: the dataset's. The recipes set what the reference used
    (REFERENCE.md: the source project (0.5, 0.5); ColossalAI std (0.2023, 0.1994, 0.2010), where
    vitmoe's CIFAR-10 statistics use the exact (0.2470, 0.2435, 0.2616))."""

    # --- optimisation (source recipe: Adam, lr 2.5e-4, wd 1e-4, cosine) ---
    epochs: int = 350
    batch_size: int = 256
    """Global (effective) batch size, split over processes."""
    eval_batch_size: int | None = None
    optimizer: str = "adam"
    lr: float = 2.5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_1d: bool = True
    """No weight decay on biases, norms, positional embedding and class token."""
    schedule: str = "cosine"
    """"cosine" (stepped per iteration, after linear warm-up) or "constant"."""
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    """Overrides warmup_epochs when set."""
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    """Max global gradient norm; None or 0 turns clipping off."""
    aux_loss_weight: float = 1.0
    """Multiplies model.aux_loss().total (the per-term weights are already inside the model)."""
    consistency_weight: float = 0.0
    """AdaMix / THOR consistency regularisation of randomly routed models (0: off; AdaMix uses 1).
    Each step runs a second forward pass of the same batch with fresh random routes and adds
    weight * 0.5 * (KL(p1 || p2) + KL(p2 || p1)) of the two softmax predictions (fp32, mean over
    images); the cross-entropy is then the mean of both passes' cross-entropies (THOR's choice).
    A step costs two forwards (metrics: forwards_per_step 2). Needs router 'random'."""
    consistency_stopgrad: bool = True
    """Detach the target side of each KL direction (AdaMix): KL(p1 || p2) trains pass 2 towards
    p1 and KL(p2 || p1) trains pass 1 towards p2. False back-propagates through both sides."""

    # --- execution ---
    amp: str = "off"
    compile: bool = False
    device: str = "auto"
    nproc: int = 1
    """Processes on this machine (the source's --gpu): 1 trains in this process. Under torchrun the
    world comes from the environment instead."""
    ep_size: int = 1
    """Expert-parallel group size: each MoE layer's experts are split over this many ranks
    (must divide the world size and every layer's expert count)."""
    dist_timeout_s: float = 300.0
    """Seconds a rank waits in a collective before failing (a dead peer ends the job, not a hang)."""
    seed: int = 0
    deterministic: bool = True
    eval_mode: str | None = None
    """Eval mode of randomly routed layers (merged/random/ensemble); None keeps the model config's."""

    # --- bookkeeping ---
    threshold: float = 75.0
    out: str | None = None
    log_every: int = 50
    """Steps between finite-loss checks, progress-bar updates and TensorBoard points (0: per epoch)."""
    tensorboard: bool = False
    keep_checkpoints: int = 1
    """Epoch checkpoints kept besides the best one."""
    progress: bool = True
    """tqdm bar per epoch (only shown when stdout is a terminal)."""
    time_budget_s: float | None = None
    """Training-time budget in seconds (None: none). Checked after every step: once the training
    time (the steps' wall clock, summed over epochs and resumes; evaluation and checkpointing not
    counted) reaches it, the epoch ends early, is evaluated and checkpointed, and the run stops
    (summary: stopped_by_budget). With the cosine schedule the decay then follows
    max(step progress, budget fraction used), so the lr reaches min_lr when the budget runs out."""

    # ------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        cfg = base if base is not None else cls()
        return cfg.updated(data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, base: "TrainConfig | None" = None) -> "TrainConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in _DERIVED_KEYS}
        return cls.from_dict(data, base)

    def updated(self, data: Mapping[str, Any]) -> "TrainConfig":
        """A copy with `data` applied: TrainConfig fields, `model_config` (merged, not replaced),
        and dotted model keys (`model.depth`, `model_config.depth`)."""
        new = dataclasses.replace(self, model_config=dict(self.model_config))
        names = set(self.field_names())
        for key, value in data.items():
            key = str(key).replace("-", "_") if not str(key).startswith(("model.", "model_config.")) else str(key)
            if key.startswith(("model.", "model_config.")):
                sub = key.split(".", 1)[1]
                if sub not in ViTConfig.field_names():
                    raise ConfigError(f"unknown model field {sub!r} (in {key!r}); allowed: {', '.join(ViTConfig.field_names())}")
                new.model_config[sub] = value
            elif key == "model_config":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"model_config must be a mapping of model fields, got {value!r}")
                for sub, v in value.items():
                    if sub not in ViTConfig.field_names():
                        raise ConfigError(f"unknown model field {sub!r} in model_config; allowed: {', '.join(ViTConfig.field_names())}")
                    new.model_config[sub] = v
            elif key in names:
                setattr(new, key, value)
            else:
                raise ConfigError(f"unknown training field {key!r}; allowed: {', '.join(sorted(names))} "
                                  f"(model fields as model.<field>)")
        return new

    # ------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Coerce types and check every field; raises ConfigError naming the field. Also builds
        the model config (`resolved_model_config`) so bad model fields fail here too."""
        def fail(name: str, allowed: str) -> None:
            raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        def as_int(name: str, lo: int | None = None, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str):
                try:
                    v = int(v)
                except ValueError:
                    pass
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
                fail(name, f"an integer >= {lo}" if lo is not None else "an integer")
            setattr(self, name, v)

        def as_float(name: str, lo: float | None = None, hi: float | None = None, strict_lo: bool = False,
                     optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                fail(name, _range_text(lo, hi, strict_lo))
            v = float(v)
            if (lo is not None and (v <= lo if strict_lo else v < lo)) or (hi is not None and v > hi):
                fail(name, _range_text(lo, hi, strict_lo))
            setattr(self, name, v)

        def as_bool(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                v = v.lower() in ("true", "yes", "on", "1")
            if not isinstance(v, bool):
                fail(name, "true or false")
            setattr(self, name, v)

        def choice(name: str, options, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str):
                v = v.strip().lower()
                setattr(self, name, v)
            if v not in options:
                fail(name, f"one of {', '.join(map(str, options))}")

        if not isinstance(self.model, str) or self.model not in list_models():
            fail("model", f"one of {', '.join(list_models())}")
        if isinstance(self.dataset, str):
            self.dataset = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
                            "cifar-100": "cifar100"}.get(self.dataset.strip().lower(), self.dataset.strip().lower())
        choice("dataset", DATASET_NAMES)
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)
        as_bool("augment")
        choice("augment_policy", AUGMENT_POLICIES)
        if self.augment_policy != "none" and not self.augment:
            fail("augment_policy", f"'none' when augment=false (augment=false turns all training augmentation off; "
                                   f"set augment=true to use {self.augment_policy!r})")
        info = self.dataset_info()
        for name, positive in (("norm_mean", False), ("norm_std", True)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, str):
                try:
                    v = yaml.safe_load(v)
                except yaml.YAMLError:
                    pass
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v]
            ok = isinstance(v, (list, tuple)) and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                     for c in v)
            if ok:
                v = [float(c) for c in v]
                if len(v) == 1 and info.in_chans > 1:
                    v = v * info.in_chans
                ok = len(v) == info.in_chans and all(c == c and (c > 0 if positive else True) for c in v)
            if not ok:
                fail(name, f"null (the dataset's) or {info.in_chans} {'positive ' if positive else ''}number(s), one "
                           f"per channel of {self.dataset} (or one for all channels)")
            setattr(self, name, v)
        as_int("epochs", 1)
        as_int("batch_size", 1)
        as_int("eval_batch_size", 1, optional=True)
        choice("optimizer", OPTIMIZERS)
        as_float("lr", 0.0, strict_lo=True)
        as_float("weight_decay", 0.0)
        betas = self.betas
        try:
            betas = tuple(float(b) for b in (betas if not isinstance(betas, str) else yaml.safe_load(betas)))
        except (TypeError, ValueError):
            betas = None
        if not betas or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            fail("betas", "two numbers in [0, 1), e.g. [0.9, 0.999]")
        self.betas = betas
        as_bool("no_decay_1d")
        choice("schedule", SCHEDULES)
        as_float("warmup_epochs", 0.0)
        as_int("warmup_steps", 0, optional=True)
        as_float("min_lr", 0.0)
        if self.min_lr > self.lr:
            fail("min_lr", f"a number in [0, lr={self.lr}]")
        as_float("label_smoothing", 0.0, 1.0)
        if self.label_smoothing >= 1.0:
            fail("label_smoothing", "a number in [0, 1)")
        as_float("grad_clip", 0.0, optional=True)
        if self.grad_clip == 0.0:
            self.grad_clip = None
        as_float("aux_loss_weight", 0.0)
        as_float("consistency_weight", 0.0)
        as_bool("consistency_stopgrad")
        choice("amp", AMP_MODES)
        as_bool("compile")
        choice("device", DEVICES)
        as_int("nproc", 1)
        as_int("ep_size", 1)
        as_float("dist_timeout_s", 1.0)
        if self.ep_size > 1:
            experts = self.resolved_model_config().experts_per_moe_block()
            if not experts:
                fail("ep_size", "1 for a dense model (expert parallelism needs MoE layers)")
            bad = [e for e in experts if e % self.ep_size]
            if bad:
                fail("ep_size", f"a divisor of every MoE layer's expert count {experts}")
        as_int("seed", 0)
        as_bool("deterministic")
        choice("eval_mode", EVAL_MODES, optional=True)
        as_float("threshold", 0.0, 100.0)
        if self.out is not None:
            self.out = str(self.out)
        as_int("log_every", 0)
        as_bool("tensorboard")
        as_int("keep_checkpoints", 1)
        as_bool("progress")
        as_float("time_budget_s", 0.0, strict_lo=True, optional=True)
        if not isinstance(self.model_config, dict):
            fail("model_config", "a mapping of model fields")
        mc = self.resolved_model_config()
        if self.consistency_weight > 0 and not (mc.router == "random" and mc.moe_block_indices()):
            what = "is dense" if not mc.moe_block_indices() else f"routes with router {mc.router!r}"
            fail("consistency_weight", f"0 for model {self.model!r}, which {what}: consistency regularisation "
                                       f"compares two passes with different random routes, so it needs randomly "
                                       f"routed MoE layers (router 'random', e.g. model random_vit or "
                                       f"model.router=random)")
        return self

    @property
    def forwards_per_step(self) -> int:
        """2 with consistency regularisation (a second pass with fresh routes), else 1."""
        return 2 if self.consistency_weight > 0 else 1

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the loader normalises with: the overrides, else the dataset's statistics."""
        info = self.dataset_info()
        return (tuple(self.norm_mean) if self.norm_mean is not None else tuple(info.mean),
                tuple(self.norm_std) if self.norm_std is not None else tuple(info.std))

    def dataset_info(self):
        from ..data import DATASETS

        return DATASETS[self.dataset]

    def resolved_model_config(self) -> ViTConfig:
        """The model's ViTConfig: preset < dataset shape < model_config overrides (patch chosen to fit)."""
        info = self.dataset_info()
        overrides = {k: _coerce_model_value(k, v) for k, v in self.model_config.items()}
        for key, value in (("img_size", info.img_size), ("in_chans", info.in_chans), ("num_classes", info.num_classes)):
            if key in overrides and overrides[key] != value:
                raise ConfigError(f"model field {key}={overrides[key]!r} conflicts with dataset {self.dataset} "
                                  f"({key} {value}); leave it out, the dataset sets it")
            overrides[key] = value
        if "patch_size" not in overrides:
            try:
                preset_patch = model_config(self.model).patch_size
            except ConfigError as e:
                raise ConfigError(f"model={self.model!r}: {e}") from None
            patch = DATASET_PATCH.get(self.dataset, preset_patch)
            while info.img_size % patch:
                patch -= 1
            overrides["patch_size"] = patch
        if self.eval_mode is not None:
            overrides["eval_mode"] = self.eval_mode
        try:
            return model_config(self.model, **overrides)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(("model field", "unknown model")) else f"model_config: {msg}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model_config: {e}") from None

    # ------------------------------------------------------------------------------------
    def run_label(self) -> str:
        """Display name: vit, switch-vit, top2-vit, random-vit, ... (from the resolved model);
        "+cr" marks consistency regularisation."""
        cfg = self.resolved_model_config()
        return model_label(cfg) + ("+cr" if self.consistency_weight > 0 else "")

    def default_out(self) -> str:
        return os.path.join("runs", f"{self.model}-{self.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")

    def save_yaml(self, path: str | os.PathLike) -> None:
        from ..fileio import atomic_write_text

        data = self.to_dict()
        data["resolved_model_config"] = self.resolved_model_config().to_dict()
        data["name"] = self.run_label()
        text = yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text)

    def structural_diff(self, other: "TrainConfig") -> list[str]:
        """Fields of `other` that differ from self and may not change on resume."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if k not in RESUMABLE_FIELDS and a[k] != b[k])


_DERIVED_KEYS = ("resolved_model_config", "name")


def model_label(cfg: ViTConfig) -> str:
    """vit, switch-vit, topK-vit, random-vit, ec-vit (expert choice), soft-moe-vit; "pr-" for a
    residual (PR-MoE) layer, "widenet-" for blocks sharing one layer (WideNet)."""
    if not cfg.moe_block_indices():
        return "vit"
    if cfg.router == "random":
        label = "random-vit"
    elif cfg.router == "switch":
        label = "switch-vit"
    elif cfg.router == "expert_choice":
        label = "ec-vit"
    elif cfg.router == "soft":
        label = "soft-moe-vit"
    else:
        label = f"top{cfg.top_k}-vit"
    if cfg.moe_residual:
        label = "pr-" + label
    if cfg.share_blocks:
        label = "widenet-" + label
    return label


def experts_of(cfg: ViTConfig) -> int | list[int] | None:
    experts = cfg.experts_per_moe_block()
    if not experts:
        return None
    return experts[0] if len(set(experts)) == 1 else experts


def _range_text(lo, hi, strict_lo) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if strict_lo else '['}{lo}, {hi}]"
    if lo is not None:
        return f"a number {'>' if strict_lo else '>='} {lo}"
    return "a number"


_VIT_DEFAULTS = ViTConfig()


def _coerce_model_value(name: str, value: Any) -> Any:
    """YAML 1.1 reads '1e-3' as a string; turn strings into the default's numeric type when they parse."""
    default = getattr(_VIT_DEFAULTS, name, None)
    if isinstance(value, str):
        if isinstance(default, bool) or name in ("qkv_bias",):
            low = value.lower()
            if low in ("true", "false"):
                return low == "true"
        elif isinstance(default, int) or name in ("min_capacity", "pos_embed_rows"):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"model field {name}={value!r} is not allowed: an integer") from None
        elif isinstance(default, float) or name in ("capacity_factor_train", "capacity_factor_eval"):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"model field {name}={value!r} is not allowed: a number") from None
    if isinstance(value, float) and value.is_integer() and isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, float):
        return float(value)
    return value


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["lr=1e-3", "model.depth=6"]` -> {"lr": 0.001, "model.depth": 6} (YAML-parsed values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out
