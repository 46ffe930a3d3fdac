"""Is bf16 worth it on this CPU? The Fashion-MNIST recipe's training step in float32 and under
bf16 autocast, side by side, and what `amp: auto` picks here (BENCHMARKS.md s.10).

    python benchmarks/bench_amp.py --data-dir ../shared/datasets

bf16 pays only where the CPU computes it (AVX-512 BF16 or AMX); elsewhere oneDNN converts, and a
step can take tens of times as long as in float32. Each variant is a Trainer built from
configs/recipes/fashion_mnist.yaml with `amp` set, set up as `vitmoe train` sets it up; the timed
call draws the loader's next augmented batch and runs its TrainStep. Variants alternate round by
round, the order reversed every other round; the table gives the median ms per step, and a bare
256 x 256 matmul the same way.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitmoe.data import load_dataset
from vitmoe.training.config.train_config import TrainConfig
from vitmoe.training.evaluation.precision import autocast_context, native_bf16, resolve_amp
from vitmoe.training.loop.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipes" / "fashion_mnist.yaml"
AMPS = ("off", "bf16")


def interleaved(calls: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each entry, rounds alternating (order reversed every other one)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for key in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            t0 = time.perf_counter()
            for _ in range(reps):
                calls[key]()
            times[key].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding fashion-mnist/")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = p.parse_args()
    cpu = torch.device("cpu")
    a = torch.randn(256, 256)

    def matmul(amp):
        def call():
            with autocast_context(amp, cpu):
                a @ a
        return call

    mm = interleaved({amp: matmul(amp) for amp in AMPS}, 5, 20)
    train, test = (load_dataset("fashion-mnist", s, args.data_dir) for s in ("train", "test"))
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for amp in AMPS:
            cfg = TrainConfig.from_yaml(RECIPE).updated(dict(amp=amp, data_dir=args.data_dir, progress=False,
                                                             device="cpu", out=str(Path(tmp) / amp)))
            tr = Trainer(cfg, log=lambda m: None, train_data=train, test_data=test)
            tr.setup()
            tr.model.train()
            batches = iter(tr.train_loader.iter_epoch(1))

            def step(tr=tr, batches=batches, scale=1.0 / cfg.batch_size):
                x, y = next(batches)
                tr.train_step(x, y, scale)

            step()  # oneDNN builds its kernels for the shapes on first use
            steps[amp] = step
        st = interleaved(steps, args.rounds, args.steps)
    print(f"\nCPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(cpu)}, "
          f"amp auto -> {resolve_amp('auto', cpu)}; {torch.get_num_threads()} threads, medians of interleaved rounds\n")
    print("| what | float32 ms | bf16 ms | bf16 / float32 |")
    print("|---|---:|---:|---:|")
    print(f"| 256 x 256 matmul | {mm['off'] * 1e3:.3f} | {mm['bf16'] * 1e3:.3f} | {mm['bf16'] / mm['off']:.1f} |")
    print(f"| recipe training step (batch 128) | {st['off'] * 1e3:.1f} | {st['bf16'] * 1e3:.1f} | "
          f"{st['bf16'] / st['off']:.1f} |")


if __name__ == "__main__":
    main()
