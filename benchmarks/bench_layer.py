"""MoE MLP forward+backward cost against the dense MLP with the same active FLOPs.

    python benchmarks/bench_layer.py                      # CPU, float32, the issue's sizes
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16

Variants, timed interleaved in one process (so machine noise hits all of them alike), the
median of `--repeats` rounds each:
  dense    Mlp(D, H): the FLOP-matched baseline (top-1 MoE does the same matmuls per token)
  moe      vitmoe MoEMlp, switch router, dropless, default dispatch path
  moe-cf   the same with capacity factor 1.25
  padded   MoEMlp with the padded-bmm fallback path
  random   MoEMlp with batch-granular random routing (one expert per forward)
  loop     the source project's approach: a Python loop over experts with boolean masks
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from vitmoe.models import Mlp
from vitmoe.moe import MoEMlp, grouped_mm_supported
from vitmoe.runtime import keep_freed_memory


class LoopSwitch(nn.Module):
    """Switch MLP as the source project wrote it: one nn.Linear pair per expert, looped."""

    def __init__(self, d: int, h: int, num_experts: int):
        super().__init__()
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(d, h) for _ in range(num_experts))

    def forward(self, x):
        B, N, D = x.shape
        x = x.reshape(-1, D)
        probs = self.router(x).softmax(-1)
        gate, route = probs.max(-1)
        out = x.new_zeros(x.shape)
        for i, expert in enumerate(self.experts):
            idx = torch.eq(route, i).nonzero(as_tuple=True)[0]
            out[idx] = expert(x[idx])
        return (out * gate.unsqueeze(-1)).view(B, N, D)


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    for p in layer.parameters():
        p.grad = None  # as an optimizer's zero_grad(set_to_none=True) does
    x.grad = None
    layer(x).backward(g)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop baseline")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory, as the vitmoe command sets (vitmoe.runtime); "
                         "default: the allocator returns large blocks to the OS after each use")
    args = ap.parse_args()
    kept = keep_freed_memory() if args.malloc == "keep" else False

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    D, H = args.dim, args.hidden
    x = torch.randn(args.batch, args.tokens, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    print(f"# MoE MLP forward+backward, D={D} H={H} tokens={args.batch}x{args.tokens}, {device} {args.dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, grouped_mm: {grouped_mm_supported(x)}, "
          f"malloc keeps freed memory: {kept}")
    print(f"# median of {args.repeats} interleaved rounds; ratio = time / dense time in the same rounds\n")
    print("| experts | variant | ms | x dense |")
    print("|---:|---|---:|---:|")
    for E in args.experts:
        variants = {
            "dense": Mlp(D, H),
            "moe": MoEMlp(D, H, num_experts=E, router="switch", expert_init="independent"),
            "moe-cf1.25": MoEMlp(D, H, num_experts=E, router="switch", capacity_factor_train=1.25, expert_init="independent"),
            "padded": MoEMlp(D, H, num_experts=E, router="switch", expert_init="independent", dispatch="padded"),
            "random": MoEMlp(D, H, num_experts=E, router="random"),
        }
        if not args.no_loop:
            variants["loop"] = LoopSwitch(D, H, E)
        variants = {k: v.to(device=device, dtype=dtype).train() for k, v in variants.items()}
        times = {k: [] for k in variants}
        for r in range(args.warmup + args.repeats):
            for name, layer in variants.items():
                sync(device)
                t0 = time.perf_counter()
                step(layer, x, g)
                sync(device)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        dense = statistics.median(times["dense"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {E} | {name} | {med * 1e3:.1f} | {med / dense:.2f} |", flush=True)


if __name__ == "__main__":
    main()
