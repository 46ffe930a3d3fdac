"""Does sparse upcycling pay at a fixed training time? Dense vs MoE from scratch vs dense-then-upcycled.

At one total training-time budget T on the same small width (d 64, depth 6, 4 heads, MLP 128,
the comparison width of `vitmoe demo --time-budget`):

  (a) dense   the dense vit for T seconds of training;
  (b) scratch the MoE (every other block, 8 experts, top-2: what `vitmoe.upcycle` builds by
              default) from a random initialisation for T seconds;
  (c) upcycle the dense vit for T/2, then `vitmoe train --init` of that run into the same MoE
              (each expert a copy of its block's MLP, zero routers) for the other T/2, with a
              fresh optimizer and schedule, as in sparse upcycling (Komatsuzaki et al. 2022).

    python benchmarks/upcycle_record.py --time-budget 120      # Fashion-MNIST, about 10 minutes

Each run is an ordinary run directory under --out; the table reads their summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from vitmoe.cli.main import main as vitmoe_main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
WIDTH = ["--dmodel", "64", "--heads", "4", "--set", "model.depth=6", "--set", "model.mlp_hidden=128",
         "--set", "model.head_hidden=128", "--set", "model.pool=mean"]
RECIPE = ["--epochs", "1000", "--batch", "128", "--lr", "2e-3", "--set", "optimizer=adamw",
          "--set", "weight_decay=0.05", "--set", "warmup_steps=50", "--set", "augment=false",
          "--set", "grad_clip=1.0", "--set", "log_every=0", "--set", "eval_batch_size=1000"]
MOE = ["--model", "switch_vit", "--set", "model.moe_layers=every_other", "--experts", "8",
       "--router", "topk", "--top-k", "2"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS",
                   help="total training time of each of the three (default 120)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: $DATA, ./data, then ../shared/datasets)")
    p.add_argument("--out", default="upcycle_runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None and not os.environ.get("DATA") and not Path("data").is_dir() and SHARED.is_dir():
        data_dir = str(SHARED)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    T = args.time_budget
    common = ["--dataset", args.dataset, "--seed", str(args.seed), *WIDTH, *RECIPE]
    if data_dir:
        common += ["--data-dir", data_dir]

    def train(name: str, budget: float, *extra: str) -> Path:
        run = out / name
        code = vitmoe_main(["train", *common, "--time-budget", str(budget), "--out", str(run), *extra])
        if code:
            raise SystemExit(f"run {name} failed with exit status {code}")
        return run

    runs = {
        "dense": [train("dense", T, "--model", "vit")],
        "scratch": [train("moe-scratch", T, *MOE)],
    }
    half = train("dense-half", T / 2, "--model", "vit")
    runs["upcycle"] = [half, train("moe-upcycled", T / 2, *MOE, "--init", str(half))]

    rows = ["| run | what | params | active/token | epochs | train s | best acc | final acc |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    what = {"dense": f"dense vit, {T:g} s", "scratch": f"MoE from scratch, {T:g} s",
            "upcycle": f"dense {T / 2:g} s, then upcycled MoE {T / 2:g} s"}
    for key, parts in runs.items():
        s = [summary(r) for r in parts]
        last = s[-1]
        rows.append(f"| {key} | {what[key]} | {last['params']:,} | {last['active_params']:,} | "
                    f"{' + '.join(str(x['epochs']) for x in s)} | {sum(x['train_time_s'] for x in s):.1f} | "
                    f"{last['best_acc']:.2f} | {last['final_acc']:.2f} |")
    table = "\n".join(rows)
    print(table)
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
