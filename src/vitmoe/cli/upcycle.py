"""`vitmoe upcycle SRC OUT`: sparse upcycling of a dense model file into an MoE model file."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, HelpFormatter, echo
from .options import seed_arg

DESCRIPTION = """\
Write an MoE model initialised from a dense one (sparse upcycling, Komatsuzaki et al. 2022): the
dense model's config with MoE settings applied, every non-MLP weight copied, every expert of an
MoE block a copy of that block's MLP, routers at zero (every expert equally likely: a balanced
start).

  vitmoe upcycle runs/vit OUT.safetensors                       # top-2, 8 experts, every other block
  vitmoe upcycle runs/vit OUT.safetensors --model switch_vit --experts 8 --set model.moe.top_k=2 --router topk
  vitmoe upcycle vit.safetensors OUT.safetensors --drop-upcycling 0.5 --seed 1

SRC: a vitmoe model file, run or checkpoint directory, or a transformers ViT directory. MoE
settings: the --model preset's (its moe_layers, num_experts and moe fields; without --model:
every other block, 8 experts, top-2) < --layers/--experts/--router/--top-k < --set
model.FIELD=VALUE / model.moe.FIELD=VALUE. Width, depth, heads, MLP width, image size and
classes stay the dense model's (change image size or classes when training: vitmoe train --init).

At initialisation a top-k model with k >= 2 and a randomly routed model compute exactly what the
dense model computes (dropless capacity); a switch (top-1) model's MLP branch is scaled by its
gate, 1/E with the zero router. --drop-upcycling R (Drop-Upcycling, Nakamura et al. 2025)
re-initialises round(R * H) random hidden units of each expert from the dense weights' mean and
std; --noise-std adds Gaussian noise to every expert weight; both seeded by --seed.
"""


def add_parser(sub) -> None:
    from ..models import list_models
    from ..moe import LAYER_ROUTERS

    p = sub.add_parser("upcycle", help="turn a dense model into an MoE model (sparse upcycling)",
                       description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("src", metavar="SRC", help="dense vitmoe model file, run directory, or transformers ViT directory")
    p.add_argument("out", metavar="OUT", help="output .safetensors file (a vitmoe model)")
    p.add_argument("--model", choices=list_models(), default=None,
                   help="take the MoE settings (moe_layers, num_experts, moe) of this MoE preset")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE block (model field num_experts)")
    p.add_argument("--layers", default=None, metavar="SPEC",
                   help="which blocks become MoE: all, every_other, last:K or a YAML list such as [1,3] "
                        "(model field moe_layers; default every_other)")
    p.add_argument("--router", choices=list(LAYER_ROUTERS), default=None, help="router (model field moe.router)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (model field moe.top_k)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model override, model.FIELD=VALUE or model.moe.FIELD=VALUE (repeatable; values are YAML)")
    p.add_argument("--drop-upcycling", type=float, default=0.0, metavar="R",
                   help="Drop-Upcycling: re-initialise this fraction of each expert's hidden units (default 0)")
    p.add_argument("--noise-std", type=float, default=0.0, metavar="S",
                   help="add N(0, S^2) noise to every expert weight (default 0)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of --drop-upcycling and --noise-std (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never a run's own files)")
    p.set_defaults(func=run)


def model_overrides(args: argparse.Namespace) -> dict:
    """The upcycle() overrides of a command line: preset < flags < --set."""
    from ..models import model_config
    from ..readers import parse_yaml
    from ..validation import show
    from ..moe import router_class
    from ..training.config import parse_set

    o: dict = {}
    if args.model is not None:
        preset = model_config(args.model)
        if not preset.is_moe:
            raise CLIError(f"--model {args.model} is dense: name an MoE preset (e.g. switch_vit) or leave --model out")
        o.update(moe_layers=preset.moe_layers, num_experts=preset.num_experts, moe=preset.moe)
    if args.layers is not None:
        try:
            o["moe_layers"] = parse_yaml(args.layers, "--layers")
        except ValueError:  # PathError: not YAML, or aliases past the bound
            raise CLIError(f"--layers {show(args.layers)}: all, every_other, last:K or a list such as [1,3]") from None
    if args.experts is not None:
        o["num_experts"] = args.experts
    if args.router is not None:
        o["moe.router"] = args.router
    if args.top_k is not None:
        o["moe.top_k"] = args.top_k
    for key, value in parse_set(args.set).items():
        name = key.split(".", 1)[1] if key.startswith(("model.", "model_config.")) else key
        o.pop(name, None)
        o[name] = value
    top_k = o.get("moe.top_k", o.get("moe", {}).get("top_k") if isinstance(o.get("moe"), dict) else None)
    preset_router = getattr(o.get("moe"), "router", None)
    if args.model is not None and isinstance(top_k, int) and "moe.router" not in o and preset_router is not None:
        # A top-1-only preset router (switch) asked for k > 1 experts per token becomes one that allows it (topk).
        o["moe.router"] = router_class(preset_router).router_for_top_k(preset_router, top_k)
    return o


def source_file(src: str) -> tuple[Path, bool]:
    """SRC's model file (a run's newest verified checkpoint) or transformers directory; whether it is the latter."""
    from ..training import resolve_model_file

    try:
        from ..models import hf
    except ImportError:  # the transformers layout is not there: vitmoe sources only
        hf = None
    if hf is not None and hf.is_hf_dir(src):
        return Path(src), True
    return resolve_model_file(src, log=lambda m: echo(f"note: {m}")), False


def load_dense(path: Path, is_hf: bool):
    """SRC's model and its file's metadata (dataset, normalisation, ...: kept in OUT)."""
    from ..models import load_model, read_metadata

    if is_hf:  # its class names and image-processor config, so predict and export read the file as the directory
        from ..inference.sources import ModelSource, class_names, preprocessing_of_source
        from ..models import hf

        model, src = hf.load_pretrained(path), ModelSource(str(path), path, "transformers", hf.read_hf_config(path))
        names = class_names(src, model.config.num_classes)
        meta = {"preprocessing": preprocessing_of_source(src, model).to_dict()}
        return model, meta | ({"classes": names} if names else {})
    meta = read_metadata(path)
    return load_model(path), {k: v for k, v in meta.items() if k not in ("format", "config")}


def run(args: argparse.Namespace) -> int:
    import math

    from ..models import save_model, upcycle
    from ..moe import router_class
    from ..outputs import check_output_file

    if not 0.0 <= args.drop_upcycling <= 1.0:
        raise CLIError(f"--drop-upcycling {args.drop_upcycling}: a fraction in [0, 1]")
    if not (math.isfinite(args.noise_std) and args.noise_std >= 0.0):
        raise CLIError(f"--noise-std {args.noise_std}: a finite number >= 0")
    if not Path(args.src).exists():
        raise CLIError(f"SRC {args.src} does not exist")
    overrides = model_overrides(args)
    path, is_hf = source_file(args.src)
    check_output_file(args.out, "OUT", force=args.force, inputs=[path])
    dense, meta = load_dense(path, is_hf)
    if dense.config.is_moe:
        raise CLIError(f"SRC {args.src} is already an MoE model (MoE blocks {dense.config.moe_block_indices()}); "
                       "upcycle a dense model (vitmoe merge gives one)")
    model = upcycle(dense, noise_std=args.noise_std, drop_upcycling=args.drop_upcycling, seed=args.seed, **overrides)
    cfg = model.config
    meta.update({"upcycled_from": str(path), "upcycle": {"drop_upcycling": args.drop_upcycling,
                                                         "noise_std": args.noise_std, "seed": args.seed}})
    save_model(model, args.out, metadata=meta)
    n_before = sum(p.numel() for p in dense.parameters())
    n_after = sum(p.numel() for p in model.parameters())
    router = router_class(cfg.moe.router).describe(cfg.moe)
    echo(f"upcycled {len(cfg.moe_block_indices())} block(s) {cfg.moe_block_indices()} into {router} with "
         f"{cfg.experts_per_moe_block()[0] if len(set(cfg.experts_per_moe_block())) == 1 else cfg.experts_per_moe_block()} "
         f"experts: {n_before:,} -> {n_after:,} parameters; wrote {args.out}")
    return 0
