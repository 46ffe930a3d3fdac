"""TrainConfig: every training knob, loaded from YAML, overridden by flags and `--set key=value`,
checked once (`TrainConfig.validate`, which returns a checked copy) with messages that name the
field and what is allowed (`vitmoe.validation.Fields`, as for the model's ViTConfig and MoEConfig).

Precedence (lowest first): TrainConfig defaults (the source project's recipe, switch-vit)
< config file < explicit command-line flags < `--set` overrides.

Model fields live in `model_config` (ViTConfig overrides on top of the `model` preset, MoE
settings nested under `moe`); `model.resolve_model_config` turns them into the model's
ViTConfig. The dataset fixes `in_chans` and `num_classes`, and `img_size` unless the field is set (see
`config.data`: folder datasets, on-device resize); when `patch_size` is not
given and the preset's patch does not divide the image size, the largest divisor below it is used.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ...data import DATASETS
from ...data.folder import RESIZE_POLICIES as FOLDER_RESIZE_POLICIES
from ...models import ViTConfig
from ...models.budget import check_buildable
from ...models.registry import list_models
from ...moe import EVAL_MODES
from ...readers import yaml_value
from ...rundir import DEFAULT_THRESHOLD
from ...validation import ConfigError, Fields, show
from .model import (check_ep_size, experts_of, fold_aux_loss_weight, model_label, resolve_model_config,
                    set_model_field)
from .data import check_data_fields
from .recipe import check_recipe_fields, check_recipe_model

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
# How the lr schedule follows a new `epochs` on --resume (see loop.schedule.extend_cycles).
RESUME_SCHEDULES = ("stretch", "restart")
# "auto": bf16 where the device computes it natively, else float32 (training.evaluation.precision).
AMP_MODES = ("off", "bf16", "fp16", "auto")
DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = tuple(DATASETS)
# Augmentation policies applied after the random crop (see vitmoe.data.autoaugment.POLICIES).
AUGMENT_POLICIES = ("none", "autoaugment", "randaugment")
# The allowed values of the fields that take one of a few names (the checks and the flags read them).
FIELD_CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES, "device": DEVICES,
                 "augment_policy": AUGMENT_POLICIES, "resume_schedule": RESUME_SCHEDULES, "eval_mode": EVAL_MODES,
                 "folder_resize": FOLDER_RESIZE_POLICIES}
# Fields that may differ when resuming a run (they do not change what is being trained).
RESUMABLE_FIELDS = frozenset({
    "epochs", "log_every", "tensorboard", "compile", "amp", "device", "nproc", "keep_checkpoints",
    "data_dir", "eval_mode", "threshold", "out", "progress", "ep_size", "dist_timeout_s", "max_restarts", "time_budget_s",
    "resume_schedule", "stream_above_mb", "ema_decay",
})
# A collective that waits longer than a week is a hang; torch's timedelta overflows far above it.
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
# Keys config.yaml holds besides the fields (written by save_yaml, ignored when loading).
_DERIVED_KEYS = ("resolved_model_config", "name")
# Files in one `base:` chain (a config that starts from another); past it the chain is a mistake.
MAX_BASE_DEPTH = 8

__all__ = ["TrainConfig", "parse_set", "model_label", "experts_of", "check_ep_size", "OPTIMIZERS", "SCHEDULES",
           "AMP_MODES", "DEVICES", "DATASET_NAMES", "EVAL_MODES", "AUGMENT_POLICIES", "RESUME_SCHEDULES",
           "RESUMABLE_FIELDS", "FIELD_CHOICES"]


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = "switch_vit"
    """Model preset (`vitmoe.list_models()`; the source trains switch_vit, or vit with --noswitch)."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """ViTConfig overrides on top of the preset, e.g. {embed_dim: 300, num_experts: 64, moe: {top_k: 2}}.
    Each auxiliary loss has one weight, set here: moe.balance_loss_weight, moe.z_loss_weight (an
    old config's `aux_loss_weight` is read with a FutureWarning and multiplied into both)."""
    init: str | None = None
    """Start a new run from SRC's weights: a vitmoe model file, run or checkpoint directory, or a
    transformers ViT directory. A dense SRC is upcycled when the run's model is MoE (experts copied
    from its MLPs, routers at zero); another image size or class count is adapted; optimizer and
    schedule start fresh; width, depth, heads, MLP width, patch and head type must match (see
    training.checkpoints.warm_start)."""
    dataset: str = "cifar10"
    """Dataset: a built-in name (digits works offline) or folder:PATH, your own images in
    PATH/train/CLASS/*.png|jpg|... and PATH/test/CLASS/... (or val/; without it a seeded split per
    class, folder_test_fraction), decoded once into PATH/.vitmoe-cache/."""
    data_dir: str | None = None
    """Where datasets are found or downloaded (None: $DATA, then ./data)."""
    augment: bool = True
    """Random crop (+ horizontal flip where it preserves the label) on the device, per the dataset."""
    augment_policy: str = "none"
    """"none", "autoaugment" (the CIFAR-10 AutoAugment policy, as in the ColossalAI recipe) or
    "randaugment" (2 ops, magnitude 9), applied between the crop and the flip; needs augment=true."""
    img_size: int | None = None
    """Image side the model sees: folder datasets are decoded at it, built-in ones resized on the device.
    folder:PATH datasets default to 32; for a built-in dataset None keeps its size and another value
    resizes each batch (bilinear, antialiased), e.g. 224 for a pretrained ViT on CIFAR (see
    training.config.data)."""
    folder_test_fraction: float = 0.2
    """folder:PATH without a test/ (or val/) folder: the fraction of each class split off (seeded) as test."""
    skip_bad_images: bool = False
    """folder:PATH: skip unreadable images (counted in a warning) instead of failing on the first."""
    folder_resize: str = "stretch"
    """folder:PATH: how files become img_size squares. "stretch": the whole image resized, aspect ratio not
    kept, padded random crops in training. "crop": the shorter side resized to img_size / 0.875 and
    random-resized crops of img_size in training, the centred img_size window in evaluation and
    prediction (the ImageNet recipe; for photos at pretrained sizes such as 224)."""
    stream_above_mb: float = 4096.0
    """A split larger than this (MB of uint8 pixels) stays in host memory (a folder's memory-mapped
    cache) and is streamed to the device batch by batch instead of being copied there whole."""
    norm_mean: list[float] | None = None
    """Per-channel normalisation mean on the 0..1 scale; None: the dataset's statistics."""
    norm_std: list[float] | None = None
    """Per-channel normalisation std; None: the dataset's. The recipes set what the reference used
    (the source project: (0.5, 0.5); ColossalAI's ViT-MoE example: std (0.2023, 0.1994, 0.2010), where
    vitmoe's CIFAR-10 statistics use the exact (0.2470, 0.2435, 0.2616))."""

    # --- optimisation (source recipe: Adam, lr 2.5e-4, wd 1e-4, cosine) ---
    epochs: int = 350
    """Number of epochs."""
    resume_schedule: str = "stretch"
    """How the lr schedule follows a new `epochs` on --resume (e.g. extending a finished run).
    "stretch": one warm-up + cosine over the new total (the lr continues from where that longer
    cosine is at the resume step: extending a run whose cosine had ended raises the lr again).
    "restart": the planned cosine runs to its end as planned, then the added epochs get a fresh
    warm-up (the same warmup_epochs / warmup_steps) and a cosine of their own down to min_lr
    (an SGDR-style warm restart). May be changed when resuming."""
    batch_size: int = 256
    """Global (effective) batch size, split over processes."""
    eval_batch_size: int | None = None
    """Evaluation batch size (None: batch_size)."""
    optimizer: str = "adam"
    """Adam (decay added to the gradient, as the source) or AdamW (decoupled weight decay)."""
    lr: float = 2.5e-4
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """Weight decay (not on 1-d parameters unless no_decay_1d is off)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas, e.g. [0.9, 0.999]."""
    no_decay_1d: bool = True
    """No weight decay on biases, norms, positional embedding and class token."""
    schedule: str = "cosine"
    """"cosine" (stepped per iteration, after linear warm-up) or "constant"."""
    warmup_epochs: float = 0.0
    """Linear lr warm-up, in epochs."""
    warmup_steps: int | None = None
    """Linear lr warm-up in optimizer steps; overrides warmup_epochs when set."""
    min_lr: float = 0.0
    """The lr the cosine decays to."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    grad_clip: float | None = None
    """Max global gradient norm; None or 0 turns clipping off."""
    consistency_weight: float = 0.0
    """AdaMix consistency regularisation of randomly routed models: W * symmetric KL of two passes with fresh routes (AdaMix: 1; 0: off).
    Each step runs a second forward pass of the same batch with fresh random routes and adds
    weight * 0.5 * (KL(p1 || p2) + KL(p2 || p1)) of the two softmax predictions (fp32, mean over
    images); the cross-entropy is then the mean of both passes' cross-entropies (THOR's choice).
    A step costs two forwards (metrics: forwards_per_step 2). Needs router 'random'."""
    consistency_stopgrad: bool = True
    """Detach the target side of each KL direction (AdaMix): KL(p1 || p2) trains pass 2 towards
    p1 and KL(p2 || p1) trains pass 1 towards p2. False back-propagates through both sides."""
    mixup_alpha: float = 0.0
    """mixup (Zhang et al. 2018): 0 off; else each mixed batch blends with itself reversed, one
    lambda ~ Beta(alpha, alpha), soft targets (see vitmoe.data.mix; train_acc counts the primary label)."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019): 0 off; else one box of the reversed batch is pasted in, lambda = kept area."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed (when mixup_alpha or cutmix_alpha is on)."""
    mix_switch_prob: float = 0.5
    """Probability of CutMix rather than mixup for a mixed batch when both are on."""
    ema_decay: float = 0.0
    """Keep an EMA of the weights (e.g. 0.999; 0: off), evaluated every epoch and saved as ema.safetensors.
    It is updated after every optimizer step; its test accuracy is logged as ema_test_acc and the
    checkpoints hold it (see training.recipe.ema)."""
    merge_every: int = 0
    """Randomly routed models: set each layer's experts (and their Adam moments) to their mean every N
    optimizer steps (0: off; see training.recipe.expert_averaging). Needs router 'random'."""
    freeze_unrouted: bool = False
    """Leave an expert that got no token in a step exactly as it was (weights and optimizer moments),
    instead of moving it by stale momentum and weight decay (see training.recipe.freeze)."""

    # --- execution ---
    amp: str = "off"
    """Mixed precision: bf16 autocast, fp16 with a GradScaler (CUDA only), or auto: bf16 where the
    device computes it natively (CUDA compute capability 8+, CPUs with AVX-512 BF16 or AMX), else off."""
    compile: bool = False
    """torch.compile the model."""
    device: str = "auto"
    """Device (auto: CUDA when available)."""
    nproc: int = 1
    """Processes on this machine (the source's --gpu): 1 trains in this process. Under torchrun the
    world comes from the environment instead."""
    ep_size: int = 1
    """Expert parallelism: each MoE layer's experts are split over this many ranks (a divisor of the
    number of processes and of every expert count; 1: every rank holds all experts)."""
    dist_timeout_s: float = 300.0
    """Seconds a rank waits for its peers before the job fails naming the rank that stalled (a dead peer ends the job, not a hang)."""
    max_restarts: int = 0
    """Times the workers of a --gpu N run are started again after one failed, each time continuing from the newest verified checkpoint (under torchrun, its own --max-restarts)."""
    seed: int = 0
    """Random seed: weights, data order, augmentation."""
    deterministic: bool = True
    """Deterministic algorithms (torch.use_deterministic_algorithms, warn only; on CPU without its NaN fill
    of new tensors, torch.utils.deterministic.fill_uninitialized_memory)."""
    eval_mode: str | None = None
    """How randomly routed layers are evaluated each epoch (merged/random/ensemble); None keeps the model's (merged)."""

    # --- bookkeeping ---
    threshold: float = DEFAULT_THRESHOLD
    """Test accuracy (percent) whose first epoch the summary reports (epochs_to_threshold)."""
    out: str | None = None
    """Run directory (None: runs/MODEL-DATASET-TIMESTAMP)."""
    log_every: int = 50
    """Steps between finite-loss checks, progress-bar updates and TensorBoard points (0: per epoch)."""
    tensorboard: bool = False
    """Write TensorBoard scalars to RUN/tensorboard/."""
    keep_checkpoints: int = 1
    """Epoch checkpoints kept besides the best one."""
    progress: bool = True
    """tqdm bar per epoch (only shown when stdout is a terminal)."""
    time_budget_s: float | None = None
    """Stop once this many seconds of training (steps, not evaluation) are used: the epoch ends early and is evaluated, and the cosine decay ends with the budget.
    None: no budget. Checked after every step: the training time is the steps' wall clock, summed
    over epochs and resumes (evaluation and checkpointing not counted); the last epoch is
    checkpointed and the run stops (summary: stopped_by_budget). With the cosine schedule the decay then follows
    max(step progress, budget fraction used), so the lr reaches min_lr when the budget runs out
    (after a "restart" resume, the decay of the last cycle does)."""

    _validated = False  # True on the copy validate() returns (a class default, not a field)
    _model = None  # the ViTConfig validate() built, on that copy only

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
        """`base` (default: the defaults) < the file. A file may start from another one with
        `base: OTHER.yaml` (a path relative to the file's folder): OTHER's settings apply first,
        then this file's, `model_config` merged key by key (as mmengine's `_base_`), so a
        variant of a recipe states only what it changes."""
        return cls._from_yaml(Path(path), base, ())

    @classmethod
    def _from_yaml(cls, path: Path, base: "TrainConfig | None", chain: tuple[Path, ...]) -> "TrainConfig":
        from ...readers import load_yaml

        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: give a YAML file (e.g. configs/switch_vit_cifar10.yaml)")
        try:  # bounded: size, alias expansion, regular files only (vitmoe.readers); one-line errors
            data = load_yaml(path, "config file") or {}
        except FileNotFoundError:
            where = f" (the base of config file {chain[-1]})" if chain else ""
            raise ConfigError(f"config file {path}{where} does not exist") from None
        except ValueError as e:  # PathError: not text, too large, not YAML, a FIFO, ...
            raise ConfigError(str(e)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in _DERIVED_KEYS}
        if "base" in data:
            parent = data.pop("base")
            if not isinstance(parent, str) or not parent.strip() or "\0" in parent:
                raise ConfigError(f"config file {path}: base must be the path of another config file (relative to "
                                  f"{path.parent}), got {show(parent)}")
            # `..` as written, not from where a symlinked folder points (configs/recipes is one)
            parent_path = Path(os.path.normpath(path.parent / parent))
            try:
                here, there = path.resolve(), parent_path.resolve()
            except (OSError, RuntimeError) as e:  # a symlink loop
                raise ConfigError(f"config file {path}: its base {parent} cannot be followed ({e})") from None
            chain = chain + (here,)
            if there in chain:
                names = " -> ".join(str(p) for p in chain + (there,))
                raise ConfigError(f"config file {path}: base {parent} makes a cycle ({names}); a base chain must end "
                                  f"in a file without base")
            if len(chain) >= MAX_BASE_DEPTH:  # this file's base would be one more
                raise ConfigError(f"config file {path}: more than {MAX_BASE_DEPTH} files in its base chain")
            try:
                base = cls._from_yaml(parent_path, base, chain)
            except ConfigError as e:
                if str(parent_path) in str(e):  # it names the file already
                    raise
                raise ConfigError(f"{e} (in config file {parent_path}, the base of {path})") from None
        return cls.from_dict(data, base)

    def updated(self, data: Mapping[str, Any]) -> "TrainConfig":
        """A copy (not validated) with `data` applied: TrainConfig fields, `model_config` (merged,
        not replaced) and dotted model keys (`model.depth`, `model.moe.top_k`, `model_config.depth`).
        The removed `aux_loss_weight` is still read (FutureWarning, see `fold_aux_loss_weight`)."""
        new = dataclasses.replace(self, model_config=copy.deepcopy(self.model_config))
        names = set(self.field_names())
        aux_loss_weight = None
        for key, value in data.items():
            key = str(key)
            if key.startswith(("model.", "model_config.")):
                set_model_field(new.model_config, key.split(".", 1)[1], value)
                continue
            key = key.replace("-", "_")
            if key == "model_config":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"model_config must be a mapping of model fields, got {show(value)}")
                for sub, v in value.items():
                    set_model_field(new.model_config, str(sub), v)
            elif key in names:
                setattr(new, key, value)
            elif key == "aux_loss_weight":
                aux_loss_weight = value
            else:
                raise ConfigError(f"unknown training field {show(key)}; allowed: {', '.join(sorted(names))} "
                                  f"(model fields as model.<field>)")
        if aux_loss_weight is not None:  # after the loop: the preset's weights need the final `model`
            fold_aux_loss_weight(new.model_config, new.model, aux_loss_weight)
        return new

    # ------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """A checked copy; `self` is left as it was. Values are coerced to the fields' types
        (YAML/CLI strings), model overrides put in today's nested spelling, and the model config
        is built (kept for `resolve`, which reads it as `RunSpec.model`) so bad model fields fail here too. Raises ConfigError
        naming the field. The Trainer takes a validated copy as it is (`validated`): change one
        through `updated()` (an unvalidated copy) and validate again rather than assigning fields."""
        new = copy.deepcopy(self)
        new._check(Fields(new))
        new._validated = True
        return new

    @property
    def validated(self) -> bool:
        """Whether this object is a copy returned by `validate()`."""
        return self._validated

    def _check(self, f: Fields) -> None:
        f.need(isinstance(self.model, str) and self.model in list_models(), "model", f"one of {', '.join(list_models())}")
        f.need(self.init is None or (isinstance(self.init, (str, os.PathLike)) and str(self.init)), "init", "null or a path")
        self.init = None if self.init is None else str(self.init)
        f.boolean("augment")
        f.choice("augment_policy", FIELD_CHOICES["augment_policy"])
        f.need(self.augment_policy == "none" or self.augment, "augment_policy",
               f"'none' when augment=false (augment=false turns all training augmentation off; "
               f"set augment=true to use {self.augment_policy!r})")
        check_data_fields(self, f)
        f.integer("epochs", 1)
        f.choice("resume_schedule", FIELD_CHOICES["resume_schedule"])
        f.integer("batch_size", 1)
        f.integer("eval_batch_size", 1, optional=True)
        f.choice("optimizer", FIELD_CHOICES["optimizer"])
        f.number("lr", 0.0, strict_lo=True)
        f.number("weight_decay", 0.0)
        try:
            betas = self.betas if not isinstance(self.betas, str) else yaml_value(self.betas, "betas")
            betas = tuple(float(b) for b in betas)
        except (TypeError, ValueError):  # PathError (a ValueError) included
            betas = ()
        f.need(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "betas", "two numbers in [0, 1), e.g. [0.9, 0.999]")
        self.betas = betas
        f.boolean("no_decay_1d")
        f.choice("schedule", FIELD_CHOICES["schedule"])
        f.number("warmup_epochs", 0.0)
        f.integer("warmup_steps", 0, optional=True)
        f.number("min_lr", 0.0)
        f.need(self.min_lr <= self.lr, "min_lr", f"a number in [0, lr={self.lr}]")
        f.number("label_smoothing", 0.0, 1.0, strict_hi=True)
        f.number("grad_clip", 0.0, optional=True)
        if self.grad_clip == 0.0:
            self.grad_clip = None
        check_recipe_fields(self, f)
        f.choice("amp", FIELD_CHOICES["amp"])
        f.boolean("compile")
        f.choice("device", FIELD_CHOICES["device"])
        f.integer("nproc", 1)
        f.integer("ep_size", 1)
        f.number("dist_timeout_s", 1.0, MAX_DIST_TIMEOUT_S)
        f.integer("max_restarts", 0, 1000)
        f.integer("seed", 0, 2**63 - 1)
        f.boolean("deterministic")
        if self.eval_mode is not None:
            f.choice("eval_mode", FIELD_CHOICES["eval_mode"])
        f.number("threshold", 0.0, 100.0)
        if self.out is not None:
            self.out = str(self.out)
        f.integer("log_every", 0)
        f.boolean("tensorboard")
        f.integer("keep_checkpoints", 1)
        f.boolean("progress")
        f.number("time_budget_s", 0.0, strict_lo=True, optional=True)
        f.need(isinstance(self.model_config, dict), "model_config", "a mapping of model fields")
        nested: dict[str, Any] = {}
        for key, value in self.model_config.items():
            set_model_field(nested, str(key), value)
        self.model_config = nested
        mc = self._model = resolve_model_config(self)  # the one build of the run's model config
        check_buildable(mc, "the model")  # a model too large for memory fails here, before any data loads
        if self.ep_size > 1:
            experts = mc.experts_per_moe_block()
            f.need(bool(experts), "ep_size", "1 for a dense model (expert parallelism needs MoE layers)")
            f.need(all(e % self.ep_size == 0 for e in experts), "ep_size",
                   f"a divisor of every MoE layer's expert count {experts}")
        check_recipe_model(self, f, mc)

    # ------------------------------------------------------------------------------------
    @property
    def forwards_per_step(self) -> int:
        """2 with consistency regularisation (a second pass with fresh routes), else 1."""
        return 2 if self.consistency_weight > 0 else 1

    @property
    def checked_model(self) -> ViTConfig:
        """The model config `validate()` built (read it through `resolve(cfg).model`)."""
        if not self._validated:
            raise ConfigError("the model config of an unchecked TrainConfig: validate() or resolve() it first")
        return self._model

    def with_run(self, out: str | None = None, nproc: int | None = None) -> "TrainConfig":
        """A checked copy naming its run directory and process count (set before `resolve`, never on a
        resolved run): neither changes the model or the data, so the copy keeps the checked model."""
        if not self._validated:
            raise ConfigError("with_run() takes a checked TrainConfig: validate() it first")
        new = copy.deepcopy(self)
        if out is not None:
            new.out = str(out)
        if nproc is not None:
            if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
                raise ConfigError(f"nproc={nproc!r} is not allowed: an integer >= 1")
            new.nproc = nproc
        return new

    def structural_diff(self, other: "TrainConfig") -> list[str]:
        """Fields of `other` that differ from self and may not change on resume."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if k not in RESUMABLE_FIELDS and a[k] != b[k])


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["lr=1e-3", "model.depth=6"]` -> {"lr": 0.001, "model.depth": 6} (YAML-parsed values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {show(item)}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {show(item)}: empty key")
        try:
            out[key] = yaml_value(raw, f"--set {key}") if raw.strip() else None
        except ValueError as e:  # PathError: a value whose aliases expand past the bound
            raise ConfigError(str(e)) from None
    return out
