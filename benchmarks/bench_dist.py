"""Training step time on 1 process vs 2 gloo processes (data parallel, and expert parallel).

    python benchmarks/bench_dist.py

On a CPU this checks the scaling path (DDP all-reduce, all-to-all expert dispatch) end to end,
not speed: the 2 processes share the same cores (each gets half the threads). Each setting runs
`vitmoe train` on digits with the same global batch; the step time is the median over epochs
2.. of epoch_time_s / steps in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, nproc: int, ep: int, args) -> float:
    cmd = [sys.executable, "-m", "vitmoe", "train", "--dataset", "digits", "--model", "switch_vit",
           "--experts", str(args.experts), "--epochs", str(args.epochs), "--batch", str(args.batch),
           "--gpu", str(nproc), "--ep-size", str(ep), "--out", str(out), "--device", "cpu",
           "--set", f"model.embed_dim={args.dmodel}", "--set", "model.depth=2", "--set", "model.num_heads=4",
           "--set", f"model.mlp_hidden={2 * args.dmodel}", "--set", "model.head_hidden=64"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = -(-1438 // args.batch)
    return statistics.median(r["epoch_time_s"] / steps for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dmodel", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = run(Path(tmp) / "p1", 1, 1, args)
        settings = [("1 process", base), ("2 processes, data parallel", run(Path(tmp) / "p2", 2, 1, args)),
                    ("2 processes, expert parallel (ep 2)", run(Path(tmp) / "p2ep", 2, 2, args))]
    print(f"switch_vit d {args.dmodel}, depth 2, {args.experts} experts, digits, global batch {args.batch}, "
          f"gloo on CPU\n")
    print("| setting | ms / step | vs 1 process |\n|---|---:|---:|")
    for name, t in settings:
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
