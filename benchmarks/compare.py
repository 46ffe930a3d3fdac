"""Time-limited comparison of the model families: does MoE help here, and at what cost?

Every family (dense vit, switch_vit, random_vit merged, the dense ViT-Lite, its top-2 MoE and the
PR-MoE; optionally random_vit_cr = random_vit with AdaMix consistency regularisation) trains at one
small width (d 64, depth 6, 4 heads, MLP 128) for the same training-time budget; the report table
and a cost table (epochs and steps done in the budget, training images/s, accuracy) are printed and
written to OUT/report. This is `vitmoe demo --time-budget` with comparison defaults:

    python benchmarks/compare.py --time-budget 120                 # Fashion-MNIST, 6 families
    python benchmarks/compare.py --time-budget 60 --models vit random_vit random_vit_cr
    vitmoe demo --dataset fashion-mnist --data-dir ../shared/datasets --time-budget 120   # the same

Fashion-MNIST is looked for in --data-dir, $DATA, ./data, /usr/share/datasets/fashion-mnist and,
by default here, ../shared/datasets (this project's offline copy). The whole run takes about
(families x (budget + evaluation)).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vitmoe.cli.main import main as vitmoe_main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS",
                   help="training-time budget per family (default 120)")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset (default fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: $DATA, ./data, then ../shared/datasets)")
    p.add_argument("--out", default="compare_runs", help="directory of the runs and the report")
    p.add_argument("--models", nargs="+", default=None, help="families (see `vitmoe demo --help`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--force", action="store_true", help="replace existing runs in --out")
    args = p.parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None and not os.environ.get("DATA") and not Path("data").is_dir() and SHARED.is_dir():
        data_dir = str(SHARED)
    cmd = ["demo", "--dataset", args.dataset, "--time-budget", str(args.time_budget), "--out", args.out,
           "--seed", str(args.seed), "--device", args.device]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if args.models:
        cmd += ["--models", *args.models]
    if args.force:
        cmd.append("--force")
    return vitmoe_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
