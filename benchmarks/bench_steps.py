"""Training steps of a switch ViT against the dense ViT in one process, long enough to reach a
steady state: time, page faults and resident memory per step (what the allocator and the
per-shape matmul compilation cost; see BENCHMARKS.md s.0).

    python benchmarks/bench_steps.py                       # Fashion-MNIST shapes, d 300, depth 2, bf16
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_steps.py

A user's own loop: fused AdamW as the trainer builds it (`fastest_adam`), autocast bf16, batch
256 of random images; the two models alternate step by step. The table gives the median over
the last `--last` steps (the heap and oneDNN's shape cache need a few steps to settle), and the
process's RSS at the end. Run it under LD_PRELOAD to time tcmalloc, as `vitmoe train` does.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from vitmoe import create_model
from vitmoe.runtime import tcmalloc_loaded
from vitmoe.training.loop.optim import fastest_adam, param_groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["fashion-mnist", "cifar"], default="fashion-mnist")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--last", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--exact-rows", action="store_true",
                   help="turn off the experts' row rounding (GroupedExperts.bucket_rows=False): the cost it removes")
    args = p.parse_args()
    side, chans = (28, 1) if args.shape == "fashion-mnist" else (32, 3)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, chans, side, side), torch.randint(0, 10, (args.batch,))
    width = dict(img_size=side, in_chans=chans, patch_size=4, embed_dim=300, depth=2, num_heads=12, mlp_hidden=1024)
    runs = {}
    for name, preset, extra in (("vit", "vit", {}), (f"switch_vit E={args.experts}", "switch_vit",
                                                     {"num_experts": args.experts})):
        model = create_model(preset, **width, **extra).train()
        for m in model.modules():
            if args.exact_rows and hasattr(m, "bucket_rows"):
                m.bucket_rows = False
        runs[name] = (model, fastest_adam(param_groups(model, 0.05, True), lr=1e-4), [], [])
    for _ in range(args.steps):
        for model, opt, times, faults in runs.values():
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16):
                out = model(x, return_aux=True)
            loss = F.cross_entropy(out.logits.float(), y) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2**20
    print(f"\n{args.shape} shapes, batch {args.batch}, d 300, depth 2, bf16, allocator "
          f"{'tcmalloc' if tcmalloc_loaded() else 'glibc'}, median of steps {args.steps - args.last + 1}-{args.steps}, "
          f"RSS at the end {rss:,} MB{', rows not rounded' if args.exact_rows else ''}\n")
    print("| model | ms/step | vs vit | page faults/step |")
    print("|---|---:|---:|---:|")
    base = statistics.median(runs["vit"][2][-args.last:])
    for name, (_, _, times, faults) in runs.items():
        t = statistics.median(times[-args.last:])
        print(f"| {name} | {t * 1e3:.0f} | {t / base:.2f} | {statistics.median(faults[-args.last:]):,.0f} |")


if __name__ == "__main__":
    main()
