"""The CCT conv tokenizer's memory layout: a bare training step (forward, backward, AdamW; no
clipping, data or evaluation) of the Fashion-MNIST recipe's model (cct_2_3x2, bf16 autocast, batch
128) with the tokenizer as shipped (channels-last after each
convolution) against the same network kept in NCHW, and the two layouts' max pooling alone
(BENCHMARKS.md s.8).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_tokenizer.py

A user's own loop: fused AdamW as the trainer builds it (`fastest_adam`), default `zero_grad()`,
random images; the two models (same weights) alternate round by round; the table gives the
median ms/step over the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitmoe import create_model
from vitmoe.runtime import tcmalloc_loaded
from vitmoe.training.loop.optim import fastest_adam, param_groups


def nchw_forward(tokenizer):
    """The tokenizer's network run as plain NCHW layers (what it was before the channels-last change)."""
    def forward(x_BCHW):
        return tokenizer.layers(x_BCHW).flatten(2).transpose(1, 2)
    return forward


def timed(f, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per model per round")
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    runs = {}
    for name in ("channels-last (shipped)", "NCHW"):
        torch.manual_seed(0)
        model = create_model("cct_2_3x2", img_size=28, in_chans=1).train()
        if name == "NCHW":
            model.tokenizer.forward = nchw_forward(model.tokenizer)
        opt = fastest_adam(param_groups(model, 0.05, True), lr=1e-4)

        def step(model=model, opt=opt):
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step(), step()  # oneDNN builds its kernels for the shapes on first use
        runs[name] = (step, [])
    pools = {}
    for name, fmt in (("channels-last (shipped)", torch.channels_last), ("NCHW", torch.contiguous_format)):
        a = torch.randn(args.batch, 64, 28, 28).bfloat16().contiguous(memory_format=fmt)
        pools[name] = (lambda a=a: F.max_pool2d(a, 3, 2, 1), [])
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # neither layout always goes first
        for name in order:
            runs[name][1].append(timed(runs[name][0], args.steps))
            pools[name][1].append(timed(pools[name][0], args.steps))
    print(f"\ncct_2_3x2, batch {args.batch}, bf16 autocast, {torch.get_num_threads()} threads, allocator "
          f"{'tcmalloc' if tcmalloc_loaded() else 'glibc'}, median over {args.rounds} interleaved rounds "
          f"of {args.steps}\n")
    print(f"| tokenizer layout | training step, ms | x channels-last | max pool {args.batch}x64x28x28 bf16, ms |")
    print("|---|---:|---:|---:|")
    base = statistics.median(runs["channels-last (shipped)"][1])
    for name, (_, times) in runs.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {statistics.median(pools[name][1]) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
