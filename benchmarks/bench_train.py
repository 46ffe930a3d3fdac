"""Training throughput of whole `vitmoe train` runs, MoE against dense, as a user starts them.

    python benchmarks/bench_train.py --data-dir ../shared/datasets          # the issue's setting
    python benchmarks/bench_train.py --data-dir ../shared/datasets --allocators tcmalloc glibc

Each variant is the `vitmoe` command itself in a fresh process (its own allocator choice,
vitmoe.runtime, included: `glibc` runs it with VITMOE_MALLOC=default), on Fashion-MNIST with
`--time-budget` seconds of training, rounds interleaved (every variant once per round); the
table gives the median training images/s of the last epoch each run finished or stopped in,
and its ratio to the dense model's on the same allocator.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MODELS = {
    "vit": ["--noswitch"],
    "switch_vit E=16": ["--experts", "16"],
}


def run(args, model_flags: list[str], allocator: str, out: str) -> float:
    env = dict(os.environ)
    if allocator == "glibc":
        env["VITMOE_MALLOC"] = "default"
    cmd = [sys.executable, "-m", "vitmoe", "train", "--dataset", "fashion-mnist", "--data-dir", args.data_dir,
           "--dmodel", str(args.dmodel), "--heads", str(args.heads), "--set", f"model.depth={args.depth}",
           "--set", f"model.mlp_hidden={args.mlp}", "--amp", args.amp, "--batch", str(args.batch),
           "--epochs", "1000", "--time-budget", str(args.budget), "--set", "progress=false", "--device", "cpu",
           "--out", out, *model_flags]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return rows[-1]["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding fashion-mnist/")
    p.add_argument("--dmodel", type=int, default=300)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--mlp", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--amp", default="bf16", choices=["off", "bf16"])
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--allocators", nargs="+", default=["tcmalloc"], choices=["tcmalloc", "glibc"],
                   help="tcmalloc: as `vitmoe` starts (tcmalloc when installed); glibc: VITMOE_MALLOC=default")
    args = p.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for allocator in args.allocators:
                for name, flags in MODELS.items():
                    out = os.path.join(tmp, f"{r}-{allocator}-{name.replace(' ', '_')}")
                    results.setdefault((allocator, name), []).append(run(args, flags, allocator, out))
                    print(f"round {r}: {allocator} {name}: {results[(allocator, name)][-1]:.1f} img/s", flush=True)
    print(f"\nd {args.dmodel}, depth {args.depth}, MLP {args.mlp}, batch {args.batch}, amp {args.amp}, "
          f"{args.budget:.0f} s per run, median of {args.rounds} interleaved rounds\n")
    print("| allocator | model | train img/s | vs vit |")
    print("|---|---|---:|---:|")
    for (allocator, name), v in results.items():
        base = statistics.median(results[(allocator, "vit")])
        print(f"| {allocator} | {name} | {statistics.median(v):.1f} | {statistics.median(v) / base:.2f} |")


if __name__ == "__main__":
    main()
