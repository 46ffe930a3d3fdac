"""MoE MLP forward+backward cost against the dense MLP with the same active FLOPs, in a plain loop.

    python benchmarks/bench_layer.py                                  # CPU, fp32 and bf16, d 300
    python benchmarks/bench_layer.py --dim 768 --hidden 3072 --experts 4 8 --batch 16 --tokens 197
    python benchmarks/bench_layer.py --device cuda --amp bf16

Each step is what a user's own training loop does: `optimizer.zero_grad()` with its default
(gradients set to None), forward, backward; bf16 is `torch.autocast` over fp32 modules, as
`--amp bf16` trains. The script changes no process-wide setting: whatever the library does
for itself (vitmoe.runtime) is what is measured; `--malloc-opt-out` measures without it.
Variants are timed interleaved in one process, so machine noise hits all alike; the table
gives the median of `--repeats` rounds and the ratio to the dense layer in the same rounds:
  dense       Mlp(D, H): the FLOP-matched baseline (top-1 MoE does the same matmuls per token)
  moe         vitmoe MoEMlp, switch router, dropless, default dispatch path
  moe-cf1.25  the same with capacity factor 1.25
  padded      MoEMlp with the padded-bmm path
  random      MoEMlp with batch-granular random routing (one expert per forward)
  image       MoEMlp with per-image top-1 routing (router "image": whole images per expert)
  labml       the source project's layer (labml.ai SwitchFeedForward): a loop over every expert
  hf          the transformers library's sparse-MoE loop: one nn.Linear pair per expert that
              received tokens, gathered with torch.where and added back with index_add_

After the table, the floor of each (experts, dtype) group: the fwd+bwd matmul FLOPs at the rate
this machine's matmul reaches at the dense layer's own shape, and the bytes the weights must move
at this machine's copy bandwidth (per parameter: fp32 reads it in forward and backward and writes
its gradient, 12 bytes; bf16 autocast also casts it to bf16 and the bf16 gradient back, 18 bytes),
both measured in the same process; the floor is the larger of the two (perfect overlap), so no
implementation of the layer on this machine can be faster. "floor x dense" is the moe floor over
the dense floor: the part of the measured "x dense" that no kernel work can remove.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitmoe.models import Mlp
from vitmoe.moe import MoEMlp, grouped_mm_supported


class LabmlSwitch(nn.Module):
    """Switch MLP as the source project used it (labml.ai's SwitchFeedForward, dropless)."""

    def __init__(self, d: int, h: int, num_experts: int):
        super().__init__()
        self.switch = nn.Linear(d, num_experts)
        self.experts = nn.ModuleList(Mlp(d, h) for _ in range(num_experts))

    def forward(self, x):
        B, N, D = x.shape
        x = x.reshape(-1, D)
        route_prob = torch.softmax(self.switch(x), dim=-1)
        route_prob_max, routes = torch.max(route_prob, dim=-1)
        indexes = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(len(self.experts))]
        out = x.new_zeros(x.shape)
        expert_out = [self.experts[i](x[indexes[i], :]) for i in range(len(self.experts))]
        for i in range(len(self.experts)):
            out[indexes[i], :] = expert_out[i].to(out.dtype)  # (bf16 under autocast)
        return (out * route_prob_max.view(-1, 1)).view(B, N, D)


class HFSwitch(nn.Module):
    """Top-1 sparse MoE block as transformers writes it (e.g. its Mixtral/Qwen-MoE blocks)."""

    def __init__(self, d: int, h: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(d, h) for _ in range(num_experts))

    def forward(self, x):
        B, N, D = x.shape
        x = x.reshape(-1, D)
        weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, 1, dim=-1)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            idx, top_x = torch.where(mask[e].squeeze(0))
            y = self.experts[e](x[top_x]) * weights[top_x, idx, None].to(x.dtype)
            out.index_add_(0, top_x, y.to(out.dtype))
        return out.view(B, N, D)


def step(layer: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor, amp: bool) -> None:
    opt.zero_grad()
    x.grad = None
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        y = layer(x)
    y.float().backward(g)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args, E: int, amp: bool, device: torch.device) -> None:
    torch.manual_seed(0)
    D, H = args.dim, args.hidden
    x = torch.randn(args.batch, args.tokens, D, device=device, requires_grad=True)
    g = torch.randn_like(x)
    variants = {
        "dense": Mlp(D, H),
        "moe": MoEMlp(D, H, num_experts=E, router="switch", expert_init="independent"),
        "moe-cf1.25": MoEMlp(D, H, num_experts=E, router="switch", capacity_factor_train=1.25, expert_init="independent"),
        "padded": MoEMlp(D, H, num_experts=E, router="switch", expert_init="independent", dispatch="padded"),
        "random": MoEMlp(D, H, num_experts=E, router="random"),
        "image": MoEMlp(D, H, num_experts=E, router="image", expert_init="independent"),
    }
    if not args.no_loops:
        variants |= {"labml": LabmlSwitch(D, H, E), "hf": HFSwitch(D, H, E)}
    variants = {k: v.to(device).train() for k, v in variants.items()}
    # An optimizer only for its zero_grad(), the user's way of clearing gradients.
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.0) for k, v in variants.items()}
    times = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        for name, layer in variants.items():
            sync(device)
            t0 = time.perf_counter()
            step(layer, opts[name], x, g, amp)
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    moe = statistics.median(times["moe"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {E} | {'bf16' if amp else 'fp32'} | {name} | {med * 1e3:.1f} | {med / dense:.2f} | {med / moe:.2f} |",
              flush=True)


def _median_time(fn, repeats: int = 7) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine_rates(args, device: torch.device) -> dict[str, float]:
    """FLOP/s of the dense layer's matmul shape in fp32 and bf16, and copy bandwidth (bytes/s)."""
    T, D, H = args.batch * args.tokens, args.dim, args.hidden
    rates = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(T, D, device=device, dtype=dt)
        w = torch.randn(D, H, device=device, dtype=dt)
        rates[name] = 2 * T * D * H / _median_time(lambda: (a @ w, sync(device)))
    src = torch.randn(64 * 2**20, device=device)  # 256 MB
    dst = torch.empty_like(src)
    rates["bandwidth"] = 2 * src.nbytes / _median_time(lambda: (dst.copy_(src), sync(device)))
    return rates


def floor_line(args, E: int, amp: bool, rates: dict[str, float]) -> str:
    T, D, H = args.batch * args.tokens, args.dim, args.hidden
    flops = 12 * T * D * H  # two matmuls, forward + two in backward; top-1 does the dense layer's FLOPs
    rate = rates["bf16" if amp else "fp32"]
    per_param = 18 if amp else 12
    floors = []
    for params in (2 * D * H, 2 * D * H * E):  # dense, then the experts (routing FLOPs left out: <1 %)
        compute, memory = flops / rate, params * per_param / rates["bandwidth"]
        floors.append((max(compute, memory), compute, memory))
    (dense, _, _), (moe, c, m) = floors
    return (f"floor, {E} experts {'bf16' if amp else 'fp32'}: matmuls {c * 1e3:.1f} ms at "
            f"{rate / 1e9:.0f} GFLOP/s, expert weights {m * 1e3:.1f} ms ({2 * D * H * E * per_param / 1e6:.0f} MB at "
            f"{rates['bandwidth'] / 1e9:.1f} GB/s): moe {moe * 1e3:.1f} ms, dense {dense * 1e3:.1f} ms, "
            f"floor x dense {moe / dense:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="fp32, and/or bf16 autocast over fp32 weights")
    ap.add_argument("--no-loops", action="store_true", help="skip the labml and HF per-expert loops")
    ap.add_argument("--malloc-opt-out", action="store_true",
                    help="set VITMOE_MALLOC=default: measure without the library's allocator setting")
    args = ap.parse_args()
    if args.malloc_opt_out:
        os.environ["VITMOE_MALLOC"] = "default"
    device = torch.device(args.device)
    x = torch.zeros(1, args.dim, device=device)
    print(f"# MoE MLP forward+backward, D={args.dim} H={args.hidden} tokens={args.batch}x{args.tokens}, {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, grouped_mm: {grouped_mm_supported(x)}, "
          f"VITMOE_MALLOC={os.environ.get('VITMOE_MALLOC', '(unset)')}")
    print(f"# median of {args.repeats} interleaved rounds; ratios to dense and to moe in the same rounds\n")
    print("| experts | dtype | variant | ms | x dense | x moe |")
    print("|---:|---|---|---:|---:|---:|")
    for amp in args.amp:
        for E in args.experts:
            bench(args, E, amp == "bf16", device)
    rates = machine_rates(args, device)
    print()
    for amp in args.amp:
        for E in args.experts:
            print(f"# {floor_line(args, E, amp == 'bf16', rates)}")


if __name__ == "__main__":
    main()
