"""`vitmoe predict MODEL IMAGES...`: the top-k classes of image files, as a table or a CSV/JSON file."""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from .common import CLIError, HelpFormatter, echo, warn
from .options import add_checkpoint_options, add_device_option

OUT_FORMATS = (".csv", ".json")


def add_parser(sub) -> None:
    from ..moe import EVAL_MODES

    p = sub.add_parser(
        "predict", help="classify image files with a trained model", formatter_class=HelpFormatter,
        description="The top-k classes of image files, with their names and probabilities, from a run directory "
                    "(its latest or best checkpoint, the trained weights or their EMA), a checkpoint directory or "
                    "its checkpoints/latest pointer, a model .safetensors file, or a transformers ViT directory. "
                    "Images are prepared exactly as the model's test images were: the preprocessing recorded in "
                    "the model file (decode with Pillow, resize the whole image to the training side, normalise "
                    "with the run's statistics).\n\n"
                    "  vitmoe predict runs/mine new_images/\n"
                    "  vitmoe predict runs/mine 'photos/**/*.jpg' --top-k 3 --out predictions.csv")
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint, model .safetensors file or "
                                                  "transformers ViT directory")
    p.add_argument("images", metavar="IMAGES", nargs="+",
                   help="image files, folders (searched recursively) or glob patterns (quote them: 'dir/**/*.png')")
    add_checkpoint_options(p)
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default 5, at most the "
                                                                      "class count)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the predictions to FILE.csv (one row per image: image, class_1, probability_1, ...) "
                        "or FILE.json instead of printing a table")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--mode", choices=list(EVAL_MODES), default=None,
                   help="eval mode of randomly routed MoE layers (default: the model's, normally merged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routes drawn in --mode random")
    p.add_argument("--batch", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out files that cannot be read as images (a warning names them) instead of failing")
    add_device_option(p)
    p.set_defaults(func=run)


def check_out(out: str | None, force: bool) -> Path | None:
    """--out: a .csv or .json file whose folder exists; an existing file only with --force (and never
    what `vitmoe.outputs` protects)."""
    from ..fileio import file_in_the_way
    from ..outputs import check_output_file

    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUT_FORMATS:
        raise CLIError(f"--out {out}: give a file ending in {' or '.join(OUT_FORMATS)} (the format is taken from it)")
    if path.is_dir():
        raise CLIError(f"--out {out} is a folder: give a file name ending in {' or '.join(OUT_FORMATS)}")
    if not path.parent.is_dir() and str(path.parent) != "" and file_in_the_way(path) is None:
        raise CLIError(f"--out {out}: the folder {path.parent} does not exist")
    return check_output_file(path, "--out", force=force)  # vitmoe.outputs: never a run's files, a link, a device


def to_csv(predictions, k: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image"] + [f"{what}_{r}" for r in range(1, k + 1) for what in ("class", "probability")])
    for p in predictions:
        w.writerow([p.image] + [v for c, pr in zip(p.classes, p.probs) for v in (c, repr(pr))])
    return buf.getvalue()


def to_json(predictions, clf, k: int) -> str:
    src = clf.source
    data = {"model": src.given if src else None, "model_file": str(src.path) if src else None,
            "mode": clf.mode, "classes": clf.classes, "top_k": k, "preprocessing": clf.preprocessing.to_dict(),
            "predictions": [p.to_dict() for p in predictions]}
    return json.dumps(data, indent=1) + "\n"


def table(predictions, k: int) -> str:
    """One row per image: its path, then each of the top-k classes with its probability in percent."""
    rows = [["image"] + [f"top-{r}" for r in range(1, k + 1)]]
    rows += [[p.image] + [f"{c} {100 * pr:.1f}%" for c, pr in zip(p.classes, p.probs)] for p in predictions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_text
    from ..inference import load_classifier

    if args.top_k < 1:
        raise CLIError(f"--top-k {args.top_k}: must be a positive integer")
    if args.batch < 1:
        raise CLIError(f"--batch {args.batch}: must be a positive integer")
    out = check_out(args.out, args.force)
    try:
        clf = load_classifier(args.model, args.which, args.ema, args.mode, args.device, args.seed, log=warn)
    except ValueError as e:
        if type(e) is not ValueError:  # ModelFileError, CheckpointError, ...: shown as they are
            raise
        raise CLIError(f"--mode: {e}" if args.mode else str(e)) from None
    skipped: list[str] = []
    preds = clf.predict(args.images, top_k=args.top_k, batch_size=args.batch, progress=None,
                        skip_bad_images=args.skip_bad_images, on_skip=lambda p, why: skipped.append(f"{p} ({why})"))
    if skipped:
        warn(f"skipped {len(skipped)} unreadable image(s) (--skip-bad-images): {'; '.join(skipped[:3])}"
             f"{' ...' if len(skipped) > 3 else ''}")
    k = min(args.top_k, len(clf.classes))
    pre = clf.preprocessing
    mode = f", eval mode {clf.mode}" if clf.mode else ""
    what = (f"{clf.source.path}: {len(clf.classes)} classes, {pre.input_size}x{pre.input_size} "
            f"{'gray' if pre.channels == 1 else 'RGB'} inputs{mode}")
    if out is None:
        echo(what)
        echo(table(preds, k))
        return 0
    text = to_csv(preds, k) if out.suffix.lower() == ".csv" else to_json(preds, clf, k)
    atomic_write_text(out, text)
    echo(f"{what}\nwrote {len(preds)} prediction(s) (top {k}) to {out}")
    return 0
