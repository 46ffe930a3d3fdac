"""The Fashion-MNIST recipe's training step as `vitmoe train` runs it, against the two overheads
it had before (BENCHMARKS.md s.9): deterministic mode's NaN fill of every new tensor
(torch.utils.deterministic.fill_uninitialized_memory, on by default with
torch.use_deterministic_algorithms) and the layout copy of the CCT tokenizer's first convolution
output (a 1-channel input left in NCHW strides).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
      python benchmarks/bench_recipe_step.py --data-dir ../shared/datasets

Each variant is a Trainer built from configs/recipes/fashion_mnist.yaml (plus --set overrides for
the MoE rows) and set up as `vitmoe train` sets it up (seeded, deterministic, fused AdamW, clipping,
label smoothing, bf16 autocast) on the CPU; the timed call draws the loader's next augmented
batch and runs its TrainStep on it. Variants alternate round by round, the order reversed every
other round; the table gives the median ms per step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from vitmoe.data import load_dataset
from vitmoe.models.tokenizer import ConvTokenizer
from vitmoe.runtime import tcmalloc_loaded
from vitmoe.training.config.train_config import TrainConfig, parse_set
from vitmoe.training.loop.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipes" / "fashion_mnist.yaml"
MODELS = {
    "recipe (dense)": [],
    "switch 8, every block": ["model.moe_layers=all", "model.num_experts=8", "model.moe.router=switch"],
}
VARIANTS = {  # name: (NaN fill, first conv output copied to NHWC)
    "shipped": (False, False),
    "+ NaN fill": (True, False),
    "+ first-conv copy": (False, True),
    "before (both)": (True, True),
}


def first_conv_copy_forward(tok: ConvTokenizer):
    """The tokenizer as it was: the input kept as given, each conv's output converted to NHWC."""
    def forward(x):
        for layer in tok.layers:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = x.contiguous(memory_format=torch.channels_last)
        return x.flatten(2).transpose(1, 2)
    return forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding fashion-mnist/")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    train, test = (load_dataset("fashion-mnist", s, args.data_dir) for s in ("train", "test"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for variant, (fill, copy) in VARIANTS.items():
                cfg = TrainConfig.from_yaml(RECIPE).updated(
                    dict(parse_set(MODELS[model]), data_dir=args.data_dir, progress=False, device="cpu",
                         out=str(Path(tmp) / f"{len(runs)}")))
                tr = Trainer(cfg, log=lambda m: None, train_data=train, test_data=test)
                tr.setup()
                tr.model.train()
                if copy:
                    tr.model.tokenizer.forward = first_conv_copy_forward(tr.model.tokenizer)
                batches = iter(tr.train_loader.iter_epoch(1))
                scale = 1.0 / cfg.batch_size

                def step(tr=tr, batches=batches, scale=scale):
                    x, y = next(batches)
                    tr.train_step(x, y, scale)

                runs[(model, variant)] = (step, fill, [])
        for step, fill, _ in runs.values():  # oneDNN builds its kernels for the shapes on first use
            torch.utils.deterministic.fill_uninitialized_memory = fill
            step(), step()
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for key in order:
                step, fill, times = runs[key]
                torch.utils.deterministic.fill_uninitialized_memory = fill
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times.append((time.perf_counter() - t0) / args.steps)
    print(f"\nFashion-MNIST recipe step (cct_2_3x2, batch 128, bf16), deterministic mode on, "
          f"{torch.get_num_threads()} threads, allocator {'tcmalloc' if tcmalloc_loaded() else 'glibc'}, "
          f"median over {args.rounds} interleaved rounds of {args.steps} steps\n")
    print("| model | variant | ms/step | x shipped |")
    print("|---|---|---:|---:|")
    for (model, variant), (_, _, times) in runs.items():
        base = statistics.median(runs[(model, "shipped")][2])
        t = statistics.median(times)
        print(f"| {model} | {variant} | {t * 1e3:.1f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
