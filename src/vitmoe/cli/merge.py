"""`vitmoe merge CHECKPOINT OUT`: average each MoE layer's experts into one MLP (a plain dense ViT)."""
from __future__ import annotations

import argparse
import warnings

from .common import CLIError, HelpFormatter, echo, model_file, warn
from .options import add_checkpoint_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge experts into a dense ViT checkpoint", formatter_class=HelpFormatter,
        description="Write a dense checkpoint whose MLPs are the averages of each MoE layer's experts. The result "
                    "loads with vitmoe.load_model(OUT), vitmoe.create_model('vit', checkpoint=OUT, <same width>) "
                    "and `vitmoe eval OUT`. For randomly routed models with uniform weighting it computes exactly "
                    "what the MoE model computes in merged eval mode.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="MoE model .safetensors file or run directory")
    p.add_argument("out", metavar="OUT", help="output .safetensors file")
    add_checkpoint_options(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never a run's own files)")
    p.add_argument("--weighting", choices=["uniform", "usage"], default="uniform",
                   help="uniform average, or weighted by the tokens each expert received in training "
                        "(recorded in the run's checkpoint state)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..models import load_model, merge_experts, read_metadata, save_model
    from ..outputs import check_output_file
    from ..training.checkpoints.checkpoint import STATE_FILE, load_state, verify_checkpoint

    path = model_file(args.checkpoint, args.which, args.ema)
    check_output_file(args.out, "OUT", force=args.force, inputs=[path])
    try:
        meta = read_metadata(path)
    except ValueError as e:
        raise CLIError(str(e)) from None
    model = load_model(path)
    moe = dict(model.moe_modules())
    if not moe:
        raise CLIError(f"{path} is a dense model (no MoE layers): nothing to merge")
    if args.weighting == "usage":
        state_path = path.parent / STATE_FILE
        if state_path.is_file():  # verified against the checkpoint's manifest, loaded as plain data
            verify_checkpoint(path.parent, files=(STATE_FILE,), load_legacy_state=False)
        usage = load_state(path.parent).get("usage", {}) if state_path.is_file() else {}
        if not usage or not isinstance(usage, dict):
            raise CLIError(f"--weighting usage needs the expert usage saved with a training checkpoint "
                           f"({state_path} not found); use --weighting uniform")
        wrong = [name for name, m in moe.items()
                 if not isinstance(usage.get(name), torch.Tensor) or usage[name].shape != m.usage.shape]
        if wrong:
            raise CLIError(f"{state_path} holds no expert usage of the shape {path.name} needs for "
                           f"{', '.join(wrong[:3])}; use --weighting uniform")
        for name, m in moe.items():
            m.usage.copy_(usage[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = merge_experts(model, weighting=args.weighting)
    for w in caught:
        warn(str(w.message))
    out = Path(args.out)
    metadata = {k: v for k, v in meta.items() if k not in ("format", "config")}
    metadata.update({"merged_from": str(path), "weighting": args.weighting})
    save_model(dense, out, metadata=metadata)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in dense.parameters())
    echo(f"merged {len(moe)} MoE layer(s) ({args.weighting}): {n_before:,} -> {n_after:,} parameters; wrote {out}")
    return 0

