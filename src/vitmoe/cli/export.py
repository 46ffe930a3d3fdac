"""`vitmoe export RUN_OR_FILE OUT --format hf`: a dense model in the `transformers` ViT layout."""
from __future__ import annotations

import argparse
import warnings

from .common import CLIError, HelpFormatter, echo, model_file, warn
from .options import add_checkpoint_options

FORMATS = ("hf",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model in another library's layout (transformers ViT)", formatter_class=HelpFormatter,
        description="Write OUT/config.json and OUT/model.safetensors that "
                    "transformers.ViTForImageClassification.from_pretrained(OUT) loads with the same logits. "
                    "Dense models with class-token pooling (model.pool=cls), a linear head (model.head=linear) and "
                    "one positional row per token (model.pos_embed_rows unset) export; MoE models export after "
                    "merging their experts (--merge, or `vitmoe merge` first). Class names go into id2label when "
                    "the checkpoint records its dataset. `vitmoe.load_pretrained(OUT)` reads the result back.")
    p.add_argument("checkpoint", metavar="RUN_OR_FILE", help="model .safetensors file or run directory")
    add_checkpoint_options(p)
    p.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="hf: the transformers ViT layout (default)")
    p.add_argument("--merge", action="store_true",
                   help="merge an MoE model's experts first (uniform average, as `vitmoe merge`): exact for randomly "
                        "routed models evaluated in merged mode")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT")
    p.set_defaults(func=run)


def class_names(meta: dict, num_classes: int) -> list[str] | None:
    """The class names a checkpoint's metadata records (a `classes` list, else its dataset's), if
    there is one per output."""
    from ..data import DATASETS, canonical_name

    names = meta.get("classes")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = None
        dataset = meta.get("dataset")
        if isinstance(dataset, str):
            try:
                names = list(DATASETS[canonical_name(dataset)].classes)
            except (ValueError, KeyError):  # DatasetError is a ValueError: an unknown or custom dataset
                names = None
    return names if names and len(names) == num_classes and len(set(names)) == len(names) else None


def check_output(out, force: bool) -> None:
    from pathlib import Path

    from ..models.hf import CONFIG_FILE, SAFETENSORS_FILE

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"OUT {out} is a file: give a directory for config.json and model.safetensors")
    present = [n for n in (CONFIG_FILE, SAFETENSORS_FILE) if (out / n).exists()]
    if present and not force:
        raise CLIError(f"OUT {out} already holds {' and '.join(present)}: choose another directory or pass --force")


def run(args: argparse.Namespace) -> int:
    from ..models import load_model, merge_experts, read_metadata
    from ..models.hf import export_hf, hf_export_problem

    path = model_file(args.checkpoint, args.which, args.ema)
    check_output(args.out, args.force)
    meta = read_metadata(path)
    model = load_model(path)
    cfg = model.config
    if cfg.is_moe and args.merge:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = merge_experts(model)
        except ValueError as e:
            raise CLIError(f"{path}: --merge: {e}") from None
        for w in caught:
            warn(str(w.message))
    elif cfg.is_moe:
        raise CLIError(f"{path}: cannot export to the transformers ViT layout: model field moe_layers={cfg.moe_layers!r} "
                       "(an MoE model); pass --merge to export its experts' average, or run `vitmoe merge` first")
    problem = hf_export_problem(model.config)
    if problem:
        raise CLIError(f"{path}: cannot export to the transformers ViT layout: {problem}")
    names = class_names(meta, model.config.num_classes)
    out = export_hf(model, args.out, class_names=names)
    labels = "labels LABEL_0 ..."
    if names:
        labels = "recorded class names" if meta.get("classes") else f"class names of {meta.get('dataset')}"
    echo(f"wrote {out} (config.json, model.safetensors): ViTForImageClassification, "
         f"{model.config.num_classes} classes ({labels}), {model.config.img_size}x{model.config.img_size} images")
    return 0
