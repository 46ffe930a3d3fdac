"""`vitmoe info PRESET|HF_DIR`: parameter and FLOP accounting of a model."""
from __future__ import annotations

import argparse
import json
import os

from .common import CLIError, HelpFormatter, echo, warn
from .options import add_dataset_option


def add_parser(sub) -> None:
    from ..models import list_models

    p = sub.add_parser(
        "info", help="parameters and FLOPs of a model preset", formatter_class=HelpFormatter,
        description="Print total parameters, active parameters per token, parameters after merging the experts, "
                    "and forward FLOPs per image (2 x multiply-adds of matmuls and convolutions).")
    p.add_argument("preset", metavar="PRESET", nargs="?", default=None,
                   help=f"model preset ({', '.join(list_models())}) or a transformers ViT directory (config.json), "
                        "as vitmoe.load_pretrained imports it")
    p.add_argument("--model", metavar="PRESET", default=None,
                   help="the preset, spelled as vitmoe train takes it (instead of PRESET)")
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="model field override (repeatable), spelled as in vitmoe train, e.g. "
                        "--set model.num_experts=64 --set model.embed_dim=256 --set model.moe.top_k=2")
    add_dataset_option(p, help="take image size, channels and classes from a dataset (default: the preset's, CIFAR-10 shape)")
    p.add_argument("--dense-twin", action="store_true",
                   help="also print the model's dense twin: no MoE layers, the MLP width that gives the same "
                        "forward FLOPs per image as the MoE's active path (what `vitmoe sweep --vs-dense` trains)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def model_overrides(items: list[str], preset: str) -> dict:
    """`--set` items -> the model_config mapping, spelled as `vitmoe train` takes them (model.FIELD,
    model.moe.FIELD). The old bare spelling (num_experts=64) still works, with a warning."""
    from ..training.config import TrainConfig, parse_set

    keyed = {}
    for key, value in parse_set(items).items():
        if not key.startswith(("model.", "model_config.")):
            warn(f"--set {key}=...: write --set model.{key}=... (the spelling vitmoe train takes); "
                 f"the bare field name is deprecated")
            key = f"model.{key}"
        keyed[key] = value
    return TrainConfig(model=preset).updated(keyed).model_config


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..models import dense_twin, list_models, model_config, model_info, twin_overrides
    from ..models.hf import config_from_hf, is_hf_dir, read_hf_config
    from ..training.config import TrainConfig, resolve

    if (args.preset is None) == (args.model is None):
        raise CLIError("give the model once: vitmoe info PRESET or vitmoe info --model PRESET")
    args.preset = name = args.preset if args.preset is not None else args.model
    if is_hf_dir(args.preset):
        if args.set or args.dataset:
            raise CLIError(f"--set and --dataset apply to presets, not to the transformers directory {args.preset}")
        cfg = config_from_hf(read_hf_config(args.preset), f"{args.preset}/config.json")
    elif os.path.isdir(args.preset):
        raise CLIError(f"{args.preset} is a directory without a transformers config.json; give a preset "
                       f"({', '.join(list_models())}) or a transformers ViT directory")
    elif args.preset not in list_models() and os.path.isfile(args.preset):
        raise CLIError(f"{args.preset} is a file: vitmoe info takes a preset name or a transformers ViT directory")
    elif args.preset not in list_models() and ("/" in args.preset or os.sep in args.preset):
        raise CLIError(f"{args.preset} does not exist: give a transformers ViT directory that does, or a preset "
                       f"({', '.join(list_models())})")
    elif args.preset not in list_models():
        raise CLIError(f"unknown model preset {args.preset!r} (and no directory of that name here); choose one of: "
                       f"{', '.join(list_models())}, or give a transformers ViT directory")
    elif args.dataset:
        overrides = model_overrides(args.set, args.preset)
        cfg = resolve(TrainConfig(model=args.preset, dataset=args.dataset, model_config=overrides)).model
    else:
        cfg = model_config(args.preset, **model_overrides(args.set, args.preset))
    info = model_info(cfg)
    twin = None
    if args.dense_twin:
        twin_cfg = dense_twin(cfg)
        twin = {"set": twin_overrides(cfg), **asdict(model_info(twin_cfg))}
    if args.json:
        echo(json.dumps({"model": name, **asdict(info), **({"dense_twin": twin} if twin else {})}))
        return 0
    experts = cfg.experts_per_moe_block()
    desc = (f"{len(experts)} MoE layers, {experts[0] if len(set(experts)) == 1 else experts} experts, router {getattr(cfg, 'moe', cfg).router}"
            if experts else "dense")
    tokens = (f"{cfg.conv_layers} conv {cfg.conv_kernel}x{cfg.conv_kernel} layers" if cfg.tokenizer == "conv"
              else f"patch {cfg.patch_size}")
    echo(f"model {name}: d {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, MLP {cfg.mlp_hidden}, "
         f"{tokens} ({cfg.num_tokens} tokens, pool {cfg.pool}), {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, "
         f"{cfg.num_classes} classes; {desc}")
    rows = [("total parameters", info.total_params), ("active parameters per token", info.active_params_per_token),
            ("parameters after merging", info.merged_params), ("forward FLOPs per image", info.forward_flops_per_image)]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        echo(f"  {name:<{width}}  {value:>16,}")
    if experts:
        echo(f"  {'share of FLOPs in experts':<{width}}  {info.expert_flops_share:>16.1%}")
    if twin:
        sets = " ".join(f"--set {k}={v}" for k, v in twin["set"].items())
        echo(f"dense twin ({sets}): {twin['total_params']:,} parameters, "
             f"{twin['forward_flops_per_image']:,} forward FLOPs per image")
    return 0
