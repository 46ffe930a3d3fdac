"""`vitmoe export MODEL OUT --format hf|onnx`: a model in the `transformers` ViT layout or as an
ONNX graph, each with the image-processor config that feeds it as vitmoe does."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from .common import CLIError, HelpFormatter, echo, warn
from .options import add_checkpoint_options

FORMATS = ("hf", "onnx")
ONNX_FILE, LABELS_FILE = "model.onnx", "labels.json"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model for another runtime (transformers ViT, ONNX)", formatter_class=HelpFormatter,
        description="--format hf: OUT/config.json, OUT/model.safetensors and OUT/preprocessor_config.json, so that "
                    "transformers.ViTForImageClassification.from_pretrained(OUT) loads the model with the same logits "
                    "and transformers.pipeline('image-classification', model=OUT) classifies image files as "
                    "`vitmoe predict` does. Dense models with class-token pooling (model.pool=cls), a linear head "
                    "(model.head=linear), a patch tokenizer and one positional row per token export: the vit preset "
                    "trained with --set model.head=linear. `vitmoe.load_pretrained(OUT)` reads the result back.\n\n"
                    "--format onnx: OUT/model.onnx (input pixel_values [batch, C, H, W], output logits "
                    "[batch, classes], dynamic batch), OUT/preprocessor_config.json (how pixel_values are made) and "
                    "OUT/labels.json (id2label). Dense models of every preset and randomly routed MoE models in eval "
                    "mode merged or ensemble export.\n\n"
                    "Routed MoE models export after merging their experts (--merge, or `vitmoe merge` first). The "
                    "runtimes feed RGB images: a 1-channel (gray) model is written as a 3-channel one that takes "
                    "Pillow's luma of its input. Class names go into id2label when the model records them.")
    p.add_argument("checkpoint", metavar="MODEL", help="run directory, checkpoint, model .safetensors file or "
                                                       "transformers ViT directory")
    add_checkpoint_options(p)
    p.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: the transformers ViT layout (default); onnx: an ONNX graph for onnxruntime and others")
    p.add_argument("--merge", action="store_true",
                   help="merge an MoE model's experts first (uniform average, as `vitmoe merge`): exact for randomly "
                        "routed models evaluated in merged mode")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT (never a run's own files)")
    p.set_defaults(func=run)


def outputs(fmt: str) -> tuple[str, ...]:
    """The files an export of format `fmt` writes into OUT."""
    from ..models.hf import CONFIG_FILE, PREPROCESSOR_FILE, SAFETENSORS_FILE

    if fmt == "hf":
        return CONFIG_FILE, SAFETENSORS_FILE, PREPROCESSOR_FILE
    return ONNX_FILE, PREPROCESSOR_FILE, LABELS_FILE


def _merged(model, path):
    from ..models import merge_experts

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = merge_experts(model)
    except ValueError as e:
        raise CLIError(f"{path}: --merge: {e}") from None
    for w in caught:
        warn(str(w.message))
    return model


def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_text
    from ..inference.sources import class_names, load_source_model, preprocessing_of_source, resolve_source
    from ..models import ModelFileError
    from ..models.hf import PREPROCESSOR_FILE, export_hf, hf_export_problem, hf_preprocessor_config
    from ..models.onnx import export_onnx, onnx_export_problem
    from ..models.surgery import rgb_input
    from ..outputs import check_output_folder

    if args.format == "onnx":
        from ..models.onnx import require_onnx

        try:
            require_onnx()
        except ImportError as e:
            raise CLIError(f"--format onnx: {e}") from None
    src = resolve_source(args.checkpoint, args.which, args.ema, log=warn)
    path, fmt = src.path, args.format
    check_output_folder(args.out, "OUT", names=outputs(fmt), force=args.force, inputs=[path])
    model = load_source_model(src)
    if model.config.is_moe and args.merge:
        model = _merged(model, path)
    problem = hf_export_problem(model.config) if fmt == "hf" else onnx_export_problem(model.config)
    if problem:
        target = "the transformers ViT layout" if fmt == "hf" else "ONNX"
        raise CLIError(f"{path}: cannot export to {target}: {problem}")
    try:
        pre = preprocessing_of_source(src, model, log=warn)
    except ModelFileError as e:
        pre = None
        warn(f"{e}; writing no {PREPROCESSOR_FILE} (transformers' pipeline would use ViTImageProcessor's defaults)")
    if pre is not None and pre.side != pre.input_size:
        warn(f"the model was trained on {pre.side}x{pre.side} images resized to {pre.input_size}x{pre.input_size}; "
             f"{PREPROCESSOR_FILE} resizes files to {pre.input_size}x{pre.input_size} in one step, so probabilities "
             "can differ slightly from `vitmoe predict`'s")
    names = class_names(src, model.config.num_classes)
    gray = model.config.in_chans == 1 and pre is not None
    out = Path(args.out)
    if fmt == "hf":
        export_hf(model, out, class_names=names, preprocessing=pre)
        written, what = outputs("hf") if pre is not None else outputs("hf")[:2], "ViTForImageClassification"
    else:
        exported = rgb_input(model) if gray else model
        export_onnx(exported, out / ONNX_FILE)
        if pre is not None:
            atomic_write_text(out / PREPROCESSOR_FILE, json.dumps(
                hf_preprocessor_config(pre), indent=2) + "\n")
        labels = names or [f"LABEL_{i}" for i in range(model.config.num_classes)]
        atomic_write_text(out / LABELS_FILE, json.dumps({"id2label": dict(enumerate(labels))}, indent=2) + "\n")
        written = [n for n in outputs("onnx") if n != PREPROCESSOR_FILE or pre is not None]
        what = "ONNX graph pixel_values -> logits, dynamic batch"
    labels = f"class names ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "labels LABEL_0 ..."
    side = model.config.img_size
    echo(f"wrote {out} ({', '.join(written)}): {what}, {model.config.num_classes} classes, {labels}, "
         f"{side}x{side} {'RGB (gray model: luma of the input)' if gray else ('gray' if model.config.in_chans == 1 else 'RGB')} "
         "images")
    return 0
