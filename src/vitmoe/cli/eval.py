"""`vitmoe eval CHECKPOINT`: accuracy and loss of a model file or a run's latest checkpoint on the test
split (or the training split, unaugmented)."""
from __future__ import annotations

import argparse
import json

from .common import CLIError, HelpFormatter, echo, model_file
from .options import add_checkpoint_options, add_data_dir_option, add_dataset_option, add_device_option, seed_arg


def add_parser(sub) -> None:
    from ..training.config.train_config import EVAL_MODES

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on the test set (or the training split)", formatter_class=HelpFormatter,
        description="Evaluate a model .safetensors file, or a run directory (its latest or best checkpoint, the "
                    "trained weights or their EMA), on the "
                    "test split (or the training split, unaugmented). The dataset defaults to the one the checkpoint "
                    "was trained on.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model .safetensors file or run directory")
    add_checkpoint_options(p)
    p.add_argument("--mode", choices=list(EVAL_MODES), default=None,
                   help="eval mode of randomly routed layers (default: the checkpoint's, normally merged)")
    add_dataset_option(p, help="test set (default: the checkpoint's training dataset; a folder:PATH run's folder is read "
                        "with the run's img_size / folder_test_fraction / skip_bad_images / folder_resize from its config.yaml)")
    add_data_dir_option(p, help="dataset directory (default: the run's own data_dir from its config.yaml, then $DATA, "
                        "then ./data)")
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="which split to evaluate: test, or train (its images without augmentation)")
    p.add_argument("--batch", type=int, default=500, help="evaluation batch size")
    from ..training.config.train_config import AMP_MODES

    p.add_argument("--amp", choices=list(AMP_MODES), default=None,
                   help="precision of the forward: off (float32), bf16 or fp16 autocast, or auto (bf16 where the device "
                        "computes it natively) (default: the run's amp from "
                        "its config.yaml, as its training log's test accuracy was measured; off for a bare model file)")
    add_device_option(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random draws in --mode random")
    p.add_argument("--per-class", action="store_true",
                   help="also the accuracy of each class, by name (always shown for folder:PATH datasets)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--superclasses", type=int, default=None, metavar="E",
                   help="group the classes this model confuses into E super-classes (Mobile V-MoE), from the "
                        "confusion matrix on --split (use --split train to keep the test set out of the design), "
                        "and print the model.moe.superclasses setting that guides a per-image router with E experts")
    p.add_argument("--capacity-factors", type=float, nargs="+", default=None, metavar="F",
                   help="capacity-accuracy curve (V-MoE): evaluate at each eval capacity factor, with position "
                        "priority and with Batch Prioritized Routing, and write capacity.json/.md/.png (accuracy "
                        "against the factor and against the MoE FLOPs spent) to --out")
    from ..moe.routers.topk import PRIORITIES

    p.add_argument("--priorities", nargs="+", choices=list(PRIORITIES), default=list(PRIORITIES),
                   help="with --capacity-factors: which copies an overflowing expert keeps (default both)")
    p.add_argument("--out", default=None,
                   help="with --capacity-factors: output folder (default RUN/analysis for a run or its model "
                        "files, else next to the model file)")
    p.add_argument("--force", action="store_true", help="with --capacity-factors: replace an earlier curve's files")
    p.set_defaults(func=run)


def _run_dirs(checkpoint, model_file) -> list:
    """The folders that may be the run `checkpoint` / `model_file` belong to."""
    from pathlib import Path

    from ..rundir import CHECKPOINT_DIR

    model_file = Path(model_file)
    candidates = [Path(checkpoint)] if Path(checkpoint).is_dir() else []
    if model_file.parent.parent.name == CHECKPOINT_DIR:  # RUN/checkpoints/epoch-NNNN/model.safetensors
        candidates.append(model_file.parent.parent.parent)
    return candidates


def saved_config(checkpoint, model_file) -> dict:
    """The config.yaml of the run that `checkpoint` belongs to ({} when there is none or it is unreadable)."""
    from pathlib import Path

    from ..readers import load_yaml

    for d in _run_dirs(checkpoint, model_file):
        cfg_file = d / "config.yaml"
        if cfg_file.exists():
            # The run's data settings: a damaged config.yaml (binary, not YAML, a FIFO) is one error
            # naming it, not a traceback and not a silent fallback to other data.
            saved = load_yaml(cfg_file, "run config") or {}
            if not isinstance(saved, dict):
                raise CLIError(f"run config {cfg_file} is not a mapping of settings: the run's data settings "
                               "cannot be read (pass --dataset and --data-dir)")
            return saved
    return {}


def prepare_eval(checkpoint, mode=None, dataset=None, data_dir=None, batch=500, device="auto", seed=0,
                 which="latest", ema=False, split="test"):
    """(model file, model, loader of `split`, dataset name, class names, device), read as in training
    (the training split without augmentation)."""
    import torch

    from ..data import DeviceLoader, is_folder, load_dataset
    from ..models import load_model, read_metadata
    from ..training import resolve_device

    if batch < 1:
        raise CLIError(f"--batch {batch}: must be a positive integer")
    path = model_file(checkpoint, which, ema)
    try:
        meta = read_metadata(path)
    except ValueError as e:
        raise CLIError(str(e)) from None
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise CLIError(f"{path} does not record its dataset; pass --dataset")
    # The run's config.yaml is read only for what it is needed for: where the data is, how a folder is read.
    saved = saved_config(checkpoint, path) if data_dir is None or is_folder(dataset) else {}
    if data_dir is None:  # where the run found its data (an explicit --data-dir wins)
        data_dir = str(saved["data_dir"]) if saved.get("data_dir") else None
    dev = resolve_device(device)
    overrides = {"moe": {"eval_mode": mode}} if mode else {}
    model = load_model(path, map_location=dev, **overrides)
    cfg = model.config
    options = {}
    if is_folder(dataset):  # read as in training: the run's settings, else the model's image size
        from ..training.config.data import saved_folder_options

        options = saved_folder_options(saved, cfg.img_size)
    data = load_dataset(dataset, split, data_dir, **options)
    if (data.info.in_chans, data.info.num_classes) != (cfg.in_chans, cfg.num_classes):
        raise CLIError(f"{path} was built for {cfg.in_chans}-channel images and {cfg.num_classes} classes; "
                       f"dataset {dataset} ({data.info.in_chans} channels, {data.info.num_classes} classes) "
                       f"does not fit")
    classes = list(data.info.classes)
    if meta.get("classes") is not None and list(meta["classes"]) != classes:
        raise CLIError(f"{path} was trained on classes {', '.join(map(str, meta['classes']))}, but {dataset} now "
                       f"holds {', '.join(classes)}: labels would not match")
    norm = meta.get("normalization")
    mean = std = None
    if norm and dataset == meta.get("dataset"):  # trained with a normalisation other than the dataset's
        mean, std = norm["mean"], norm["std"]
    torch.manual_seed(seed)
    loader = DeviceLoader(data, batch, dev, train=False, mean=mean, std=std, resize_to=cfg.img_size)
    return path, model, loader, dataset, classes, dev


def run_amp(checkpoint, model_file) -> str:
    """The amp mode of the run `model_file` belongs to (its config.yaml), "off" without one. For
    "auto", the precision the run recorded it trained in (summary.json's amp): a bf16 run evaluated
    on a CPU without native bf16 is still measured as it trained."""
    from ..readers import load_json
    from ..training.config.train_config import AMP_MODES

    amp = saved_config(checkpoint, model_file).get("amp")
    if amp == "auto":
        for d in _run_dirs(checkpoint, model_file):
            try:
                trained = load_json(d / "summary.json", "run summary").get("amp")
            except (OSError, ValueError, AttributeError):  # none yet (a run still in its first epoch), or damaged
                continue
            if trained in AMP_MODES and trained != "auto":
                return trained
    return amp if amp in AMP_MODES else "off"


def evaluate_checkpoint(checkpoint, mode=None, dataset=None, data_dir=None, batch=500, device="auto", seed=0,
                        per_class=False, which="latest", ema=False, amp=None, split="test",
                        superclasses: int | None = None) -> dict:
    """`amp`: "off", "bf16", "fp16" or "auto"; None: the run's (`run_amp`), as its training log measured.
    `superclasses`: also the confusion matrix and the class -> expert map of that many super-classes."""
    import torch

    from ..data import is_folder
    from ..inference.classifier import has_random_routes
    from ..training import evaluate
    from ..training.evaluation.precision import resolve_amp

    if superclasses is not None and superclasses < 1:
        raise CLIError(f"--superclasses {superclasses}: a positive number of experts")
    path, model, loader, dataset, classes, dev = prepare_eval(checkpoint, mode, dataset, data_dir, batch, device, seed,
                                                              which, ema, split)
    if superclasses is not None and superclasses > len(classes):
        raise CLIError(f"--superclasses {superclasses}: at most the number of classes ({len(classes)} in {dataset})")
    amp_source = "given" if amp is not None else ("the run's" if saved_config(checkpoint, path) else "default")
    amp = resolve_amp(amp if amp is not None else run_amp(checkpoint, path), dev)  # "auto": what it is here
    cfg = model.config
    per_class = per_class or is_folder(dataset)
    keep = per_class or superclasses is not None
    preds, labels = [], []
    hook = model.register_forward_hook(lambda m, i, out: preds.append(out.argmax(-1))) if keep else None
    res = evaluate(model, _Shown(loader, labels if keep else None), dev, amp=amp)
    if hook is not None:
        hook.remove()
    # Keys named for the split measured: test_acc, or with --split train train_acc (an eval-mode pass
    # over the unaugmented images, not the running training accuracy that metrics.jsonl logs).
    r = {"checkpoint": str(path), "dataset": dataset, "split": split, "classes": classes, "images": res["n"],
         f"{split}_acc": res["acc"], f"{split}_loss": res["loss"],
         "mode": cfg.moe.eval_mode if has_random_routes(model) else None, "amp": amp, "amp_source": amp_source,
         "params": sum(p.numel() for p in model.parameters()), "images_per_s": res["images_per_s"]}
    if per_class:  # {class name: [accuracy %, images]}, from the same pass (same random routes)
        p, y = torch.cat(preds).cpu(), torch.cat(labels).cpu()
        n = torch.bincount(y, minlength=len(classes))
        hit = torch.bincount(y[p == y], minlength=len(classes))
        r["per_class"] = {c: [100.0 * hit[i].item() / max(n[i].item(), 1), n[i].item()] for i, c in enumerate(classes)}
    if superclasses is not None:
        from ..report.superclasses import confusion_matrix, superclasses_from_confusion

        confusion = confusion_matrix(torch.cat(labels).cpu(), torch.cat(preds).cpu(), len(classes))
        r["confusion"] = confusion.tolist()
        r["superclasses"] = superclasses_from_confusion(confusion, superclasses)
    return r


class _Shown:
    """The test loader with a progress bar on stderr (only when it is a terminal: tqdm's disable=None),
    keeping the labels it yields in `labels` when given (for per-class accuracy)."""

    def __init__(self, loader, labels: list | None = None):
        self.loader, self.labels = loader, labels

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import sys

        from tqdm import tqdm

        with tqdm(total=len(self.loader), desc="evaluating", unit="batch", file=sys.stderr, leave=False,
                  disable=None, dynamic_ncols=True) as bar:
            for x, y in self.loader:
                if self.labels is not None:
                    self.labels.append(y)
                yield x, y
                bar.update(1)


def run(args: argparse.Namespace) -> int:
    if args.capacity_factors is not None:
        return run_capacity_curve(args)
    r = evaluate_checkpoint(args.checkpoint, args.mode, args.dataset, args.data_dir, args.batch, args.device, args.seed,
                            args.per_class, args.which, args.ema, args.amp, args.split, args.superclasses)
    if args.json:
        echo(json.dumps(r))
    else:
        mode = f", eval mode {r['mode']}" if r["mode"] else ""
        precision = {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[r["amp"]]
        precision += {"given": "", "the run's": " as the run trained (--amp to change)", "default": ""}[r["amp_source"]]
        split = r["split"]
        echo(f"{r['checkpoint']}: {split} accuracy {r[split + '_acc']:.2f}%  {split} loss {r[split + '_loss']:.4f}  "
             f"({r['images']:,} {r['dataset']} {r['split']} images{mode}, {precision}, {r['params']:,} parameters)")
        for name, (acc, n) in r.get("per_class", {}).items():
            echo(f"  {name}: {acc:.2f}% of {n:,}")
        if "superclasses" in r:
            echo(superclass_text(r["superclasses"], r["classes"], r["split"]))
    return 0


def superclass_text(expert_of_class: list[int], classes: list[str], split: str) -> str:
    """The super-classes, one line per expert, and the setting that guides a per-image router with them."""
    experts = max(expert_of_class) + 1
    lines = [f"{experts} super-classes from the confusion matrix on the {split} split:"]
    for e in range(experts):
        lines.append(f"  expert {e}: " + ", ".join(c for c, x in zip(classes, expert_of_class) if x == e))
    value = "[" + ",".join(map(str, expert_of_class)) + "]"
    lines.append(f"guide a per-image router with {experts} experts: --set model.moe.router=image "
                 f"--set model.num_experts={experts} --set model.moe.superclasses={value}")
    return "\n".join(lines)


def run_capacity_curve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..outputs import check_output_folder
    from ..report.capacity import capacity_curve, curve_files, curve_table, write_curve
    from .common import analysis_dir

    bad = [f for f in args.capacity_factors if not f > 0 or f != f or f == float("inf")]
    if bad:
        raise CLIError(f"--capacity-factors {bad[0]}: each factor must be a finite number > 0")
    for flag, given in (("--superclasses", args.superclasses is not None), ("--per-class", args.per_class)):
        if given:
            raise CLIError(f"{flag} and --capacity-factors are separate evaluations: run `vitmoe eval` once for each")
    if args.amp is not None:
        raise CLIError(f"--amp {args.amp}: --capacity-factors evaluates in float32; leave --amp out")
    names = curve_files(args.split)
    if args.out is not None:  # a folder that can never be written fails before the model and data load
        check_output_folder(args.out, "--out", names=names, force=args.force)
    path, model, loader, dataset, _, dev = prepare_eval(args.checkpoint, args.mode, args.dataset, args.data_dir,
                                                         args.batch, args.device, args.seed, args.which, args.ema,
                                                         args.split)
    out = args.out or (analysis_dir(args.checkpoint, path) if Path(args.checkpoint).is_dir() or
                       (Path(path).parent.parent.name == "checkpoints") else Path(path).parent)
    check_output_folder(out, "--out", names=names, force=args.force)
    try:
        curve = capacity_curve(model, _Shown(loader), dev, sorted(set(args.capacity_factors)), args.priorities)
    except ValueError as e:
        raise CLIError(f"--capacity-factors: {path}: {e}") from None
    curve["split"] = args.split
    written = write_curve(curve, out, title=f"{Path(path).name} on {dataset}")
    if args.json:
        echo(json.dumps(curve))
    else:
        echo(curve_table(curve))
        echo(f"written: {', '.join(str(p) for p in written)}")
    return 0
