"""`vitmoe demo`: vit, switch_vit and random_vit at a small width on digits, then the report."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .common import CLIError, HelpFormatter, echo

MODELS = ("vit", "switch_vit", "random_vit")
# Small enough that the three runs take a few minutes on a 2-core CPU (8x8 digits, patch 4: 2x2 patches).
DEMO_MODEL = dict(embed_dim=64, depth=4, num_heads=4, mlp_hidden=128, head_hidden=128, pool="mean")
DEMO_EXPERTS = {"switch_vit": 8, "random_vit": 4}
DEMO_RECIPE = dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=2, batch_size=32, augment=False,
                   label_smoothing=0.0, grad_clip=1.0, log_every=0, keep_checkpoints=1)


def add_parser(sub) -> None:
    from ..training.config import DATASET_NAMES

    p = sub.add_parser(
        "demo", help="train vit, switch_vit and random_vit briefly and report", formatter_class=HelpFormatter,
        description="Train the three source models at a small width (d 64, depth 4, 4 heads, MLP 128, mean pooling; "
                    "switch_vit with 8 experts, random_vit with 4, evaluated merged) with AdamW, then write the "
                    "report (results.md, accuracy.png, expert-load plots) into OUT/report and print the table. "
                    "On the offline digits set this takes a few minutes on a 2-core CPU.")
    p.add_argument("--dataset", choices=list(DATASET_NAMES), default="digits", help="dataset")
    p.add_argument("--data-dir", default=None, help="dataset directory (default $DATA, then ./data)")
    p.add_argument("--out", default="demo_runs", help="directory of the three runs and the report")
    p.add_argument("--epochs", type=int, default=20, help="epochs per model")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to train")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threshold", type=float, default=75.0, help="accuracy for the 'epochs to' column")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device")
    p.add_argument("--force", action="store_true", help="replace existing demo runs in OUT")
    p.set_defaults(func=run)


def demo_config(model: str, dataset: str, out: Path, epochs: int, seed: int = 0, device: str = "auto",
                data_dir: str | None = None, threshold: float = 75.0):
    from ..training import TrainConfig

    mc = dict(DEMO_MODEL)
    if model in DEMO_EXPERTS:
        mc["num_experts"] = DEMO_EXPERTS[model]
    return TrainConfig(model=model, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed, device=device,
                       out=str(out / model), model_config=mc, threshold=threshold, **DEMO_RECIPE).validate()


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.checkpoint import latest_checkpoint

    out = Path(args.out)
    configs = [demo_config(m, args.dataset, out, args.epochs, args.seed, args.device, args.data_dir, args.threshold)
               for m in args.models]
    for cfg in configs:
        run_dir = Path(cfg.out)
        if run_dir.exists() and (latest_checkpoint(run_dir) is not None or (run_dir / "metrics.jsonl").exists()):
            if not args.force:
                raise CLIError(f"{run_dir} already holds a run; pass --force to replace it or choose another --out")
            shutil.rmtree(run_dir)
    for cfg in configs:
        echo(f"=== {cfg.model} ===")
        train(cfg, log=echo)
    from .report import run as report_run

    return report_run(argparse.Namespace(runs=[c.out for c in configs], out=str(out / "report"), threshold=args.threshold))
