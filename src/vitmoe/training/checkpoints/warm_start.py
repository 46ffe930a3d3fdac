"""`vitmoe train --init SRC`: a new run that starts from another model's weights.

SRC is a vitmoe model file, a checkpoint directory or a run directory (its newest checkpoint
that verifies), or a `transformers` ViT directory (`vitmoe.models.hf.load_pretrained`). The run
keeps its own model config; SRC's weights are brought to it:

* dense SRC, MoE run: sparse upcycling (`vitmoe.models.upcycle`: experts copied from the MLPs,
  routers at zero);
* MoE SRC, dense run: the experts are merged (`merge_experts`, uniform average);
* otherwise the tensors must match one to one.

Another image size (positional table, bicubic) or class count (a new zero-initialised head) is
adapted with `vitmoe.models.surgery.load_adapted`. Width, depth, heads, MLP width, patch, head
type and the MoE layout are not: they are one ConfigError naming `--init` and what differs,
raised by `check_init` before any data is loaded. The optimizer and lr schedule start fresh; the
run's config.yaml and summary.json record `init`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from ...models import ViTConfig, VisionTransformer, load_model, merge_experts, read_metadata
from ...models.io import ModelFileError
from ...models.surgery import load_adapted
from ...models.upcycle import ARCH_FIELDS, architecture_diff, load_upcycled
from ...moe import router_class
from ...rundir import has_checkpoint
from ...validation import ConfigError
from . import checkpoint as ckpt


def _hf():
    """vitmoe.models.hf when it is there (the transformers layout), else None."""
    try:
        from ...models import hf
    except ImportError:
        return None
    return hf


def _error(src: str, what: str) -> ConfigError:
    return ConfigError(f"--init {src}: {what}")


def source_config(src: str) -> ViTConfig:
    """SRC's model config, read without loading its weights (ConfigError naming --init if unusable)."""
    path = Path(src)
    if not path.exists():
        raise _error(src, "does not exist (give a vitmoe model file, run or checkpoint directory, "
                          "or a transformers ViT directory)")
    hf = _hf()
    try:
        if hf is not None and hf.is_hf_dir(path):
            return hf.config_from_hf(hf.read_hf_config(path), str(path / hf.CONFIG_FILE))
        return ViTConfig.from_dict(read_metadata(ckpt.resolve_model_file(path))["config"])
    except (ValueError, OSError, ckpt.CheckpointError) as e:  # ModelFileError and ConfigError are ValueErrors
        raise _error(src, str(e)) from None


ADOPTED_FIELDS = tuple(f for f in ARCH_FIELDS if f != "in_chans") + ("norm_eps",)
"""What a run started with --init takes from SRC unless set: the dataset decides the channels."""


def adopt_architecture(model_config: dict, src: str) -> dict:
    """`model_config` with SRC's value for every architecture field it does not set, so that
    `vitmoe train --init vit-b16-dir --model switch_vit` builds a ViT-B/16-shaped MoE without
    repeating the shape; fields set on the command line or in the config file win (and are then
    checked against SRC by `check_init`)."""
    source = source_config(src)
    return {**{name: getattr(source, name) for name in ADOPTED_FIELDS}, **model_config}


def init_problems(source: ViTConfig, target: ViTConfig) -> list[str]:
    """What keeps SRC's weights (config `source`) from starting a run of model `target`."""
    # An RGB SRC starts a gray run (load_adapted sums its first layer's channels); not the reverse.
    fields = tuple(f for f in ARCH_FIELDS if f != "in_chans") if (source.in_chans, target.in_chans) == (3, 1) \
        else ARCH_FIELDS
    problems = architecture_diff(source, target, fields, names=("SRC", "run"))
    if source.is_moe and target.is_moe:
        a = (source.moe_block_indices(), source.experts_per_moe_block())
        b = (target.moe_block_indices(), target.experts_per_moe_block())
        if a != b:
            problems.append(f"MoE blocks {a[0]} with experts {a[1]} (SRC) vs {b[0]} with {b[1]} (run); "
                            "merge SRC first (vitmoe merge) to upcycle its average")
        else:
            with torch.device("meta"):
                s, t = VisionTransformer(source).state_dict(), VisionTransformer(target).state_dict()
            keys = sorted(k for k in set(s) ^ set(t) if ".mlp." in k)
            if keys or source.moe.residual != target.moe.residual:
                problems.append(f"MoE layers of another kind (router {source.moe.router!r}, residual "
                                f"{source.moe.residual} in SRC; {target.moe.router!r}, "
                                f"{target.moe.residual} in the run: {keys[:2]} differ)")
    if (source.is_moe and not target.is_moe) and (source.moe.residual or not router_class(source.moe.router).mergeable):
        problems.append("a residual or Soft MoE source cannot be merged into the run's dense model")
    return problems


def check_init(src: str, target: ViTConfig) -> ViTConfig:
    """SRC exists, is a model, and fits the run's model `target`; its config. One ConfigError
    (`--init SRC: ...`) otherwise."""
    source = source_config(src)
    problems = init_problems(source, target)
    if problems:
        hint = "; set the run's model to match (e.g. --set model.FIELD=VALUE)" if not source.is_moe else ""
        raise _error(src, f"its model does not fit the run's: {'; '.join(problems)}{hint}")
    return source


def load_source(src: str, log: Callable[[str], None] | None = None) -> VisionTransformer:
    """SRC's model on the CPU, as it was saved (float32)."""
    path = Path(src)
    hf = _hf()
    try:
        if hf is not None and hf.is_hf_dir(path):
            return hf.load_pretrained(path)
        return load_model(ckpt.resolve_model_file(path, log=log))
    except (ValueError, OSError, ckpt.CheckpointError) as e:
        raise _error(src, str(e)) from None


@torch.no_grad()
def init_from(model: VisionTransformer, src: str, log: Callable[[str], None] = print) -> list[str]:
    """Load SRC's weights into `model` (the run's freshly built model, any device), upcycling,
    merging and adapting as the module docstring says; one line per step taken."""
    with torch.random.fork_rng(devices=[]):  # building models draws: the run's RNG stream stays as without --init
        return _init_from(model, src, log)


def _init_from(model: VisionTransformer, src: str, log: Callable[[str], None]) -> list[str]:
    target = model.config
    source = check_init(src, target)
    src_model = load_source(src, log)
    notes: list[str] = []
    if source.norm_eps != target.norm_eps:
        notes.append(f"norm_eps {source.norm_eps:g} in SRC, {target.norm_eps:g} in the run "
                     f"(--set model.norm_eps={source.norm_eps:g} keeps SRC's)")
    if source.is_moe and not target.is_moe:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            src_model = merge_experts(src_model)
        notes.append("merged SRC's experts (uniform average)" + "".join(f" ({w.message})" for w in caught))
    state = src_model.state_dict()
    try:
        if target.is_moe and not src_model.config.is_moe:
            twin = VisionTransformer(target.replace(moe_layers="none", num_experts=1, moe={"residual": False}))
            notes += load_adapted(twin, state, source=str(src))
            load_upcycled(model, {k: v.to(next(model.parameters()).device) for k, v in twin.state_dict().items()})
            notes.append(f"upcycled: MoE blocks {target.moe_block_indices()}, experts "
                         f"{target.experts_per_moe_block()} copied from the dense MLPs, routers at zero")
        else:
            notes += load_adapted(model, state, source=str(src))
    except (ModelFileError, ValueError) as e:
        raise _error(src, str(e)) from None
    return notes


def apply_init(model: VisionTransformer, src: str | None, resume: bool, run_dir: Path,
               log: Callable[[str], None]) -> None:
    """The run's init step: SRC's weights into its freshly built `model`, unless the run resumes
    from a checkpoint of its own in `run_dir` (then those weights win and SRC is not read)."""
    if not src or (resume and has_checkpoint(run_dir)):
        return
    notes = init_from(model, src, log=log)
    log(f"init from {src}" + "".join(f"; {n}" for n in notes))
