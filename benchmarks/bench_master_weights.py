"""Two ways to train bf16 experts, and torch.compile of the MoE layer, measured against today's path.

    python benchmarks/bench_master_weights.py                  # 16 and 64 experts, d 300, 64x65 tokens
    python benchmarks/bench_master_weights.py --experts 16 --no-compile-layer

One training step of an MoE MLP layer (switch router, dropless) = forward + backward under bf16
autocast + the optimizer step, timed in parts, variants interleaved in one process (median of
`--repeats` rounds after `--warmup`), with the dense MLP of the same active FLOPs as the baseline:

  dense        Mlp(D, H), fp32 weights, bf16 autocast, vitmoe's optimizer (fastest_adam: fused AdamW)
  moe          MoEMlp, fp32 weights under bf16 autocast (every step casts the expert weights to
               bf16 and their bf16 gradients back), fused AdamW: what `vitmoe train --amp bf16` does
  master       the experts' weights kept in bf16 (no casts in forward and backward), fp32 master
               copies in the optimizer; the AdamW update reads the bf16 gradient and writes the
               master, both moments and the bf16 weight in one torch.compile'd loop per tensor
               (torch has no fused CPU kernel for a mixed-precision update)
  master-eager the same update in eager torch ops (several passes over memory per tensor)
  moe-compiled the moe variant with the layer's forward under torch.compile (router, sort,
               gathers and combine fused where inductor can)

The question each answers is in BENCHMARKS.md s.0: whether removing the per-step casts, or
compiling the dispatch, pays on this CPU (the issue "An MoE training step that costs what a dense
one does"). Compilation happens in the warm-up rounds and is not timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from vitmoe.models import Mlp
from vitmoe.moe import MoEMlp
from vitmoe.training.loop.optim import fastest_adam

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.05


def master_adamw(p: torch.Tensor, g: torch.Tensor, master: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 step: torch.Tensor) -> None:
    """torch.optim.AdamW's update of an fp32 master from a bf16 gradient, the bf16 weight rewritten."""
    b1, b2 = BETAS
    gf = g.float()
    m_new = m.lerp(gf, 1 - b1)
    v_new = v * b2 + gf * gf * (1 - b2)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    new = master * (1 - LR * WD) - (LR / bc1) * m_new / ((v_new / bc2).sqrt() + EPS)
    m.copy_(m_new)
    v.copy_(v_new)
    master.copy_(new)
    p.copy_(new)


class MasterAdamW:
    """AdamW over bf16 params with fp32 masters (the update `fn`: compiled or eager)."""

    def __init__(self, params: list[nn.Parameter], fn):
        self.params, self.fn = params, fn
        self.master = [p.detach().float().clone() for p in params]
        self.m = [torch.zeros_like(q) for q in self.master]
        self.v = [torch.zeros_like(q) for q in self.master]
        self.step_t = torch.zeros(())

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.step_t += 1
        for p, q, m, v in zip(self.params, self.master, self.m, self.v):
            self.fn(p.data, p.grad, q, m, v, self.step_t)


def build(kind: str, args) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    D, H, E = args.dim, args.hidden, args.E
    if kind == "dense":
        layer = Mlp(D, H)
        return layer, [fastest_adam(list(layer.parameters()), lr=LR, weight_decay=WD)]
    layer = MoEMlp(D, H, num_experts=E, router="switch", expert_init="independent")
    if kind in ("moe", "moe-compiled"):
        opt = [fastest_adam(list(layer.parameters()), lr=LR, weight_decay=WD)]
        return (torch.compile(layer) if kind == "moe-compiled" else layer), opt
    ex = layer.experts
    experts = [ex.w1, ex.b1, ex.w2, ex.b2]
    for p in experts:
        p.data = p.data.bfloat16()
    rest = [p for p in layer.parameters() if all(p is not q for q in experts)]
    fn = torch.compile(master_adamw, dynamic=False, fullgraph=True) if kind == "master" else master_adamw
    return layer, [fastest_adam(rest, lr=LR, weight_decay=WD), MasterAdamW(experts, fn)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile-layer", action="store_true", help="leave out moe-compiled")
    args = ap.parse_args()
    x = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    g = torch.randn_like(x)
    print(f"# one bf16-autocast training step of an MoE MLP layer, D={args.dim} H={args.hidden} "
          f"tokens={args.batch}x{args.tokens}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# median of {args.repeats} interleaved rounds; x dense: the same rounds' dense layer\n")
    print("| experts | variant | fwd+bwd ms | x dense | optimizer ms | step ms | x dense | x moe |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    kinds = ["dense", "moe", "master", "master-eager"] + ([] if args.no_compile_layer else ["moe-compiled"])
    for E in args.experts:
        args.E = E
        variants = {k: build(k, args) for k in kinds}
        times = {k: ([], []) for k in kinds}
        for r in range(args.warmup + args.repeats):
            for k, (layer, opts) in list(variants.items()):
                for o in opts:
                    o.zero_grad()
                x.grad = None
                t0 = time.perf_counter()
                try:
                    with torch.autocast("cpu", torch.bfloat16):
                        y = layer(x)
                except Exception as e:  # noqa: BLE001 - torch.compile failing here is a result to report
                    if r >= args.warmup:
                        raise
                    first = next((ln for ln in str(e).splitlines() if "error" in ln.lower()), str(e).splitlines()[0])
                    print(f"# {k}, {E} experts: fails in its first call ({type(e).__name__}: {first.strip()[:200]})")
                    del variants[k], times[k]
                    continue
                y.float().backward(g)
                t1 = time.perf_counter()
                for o in opts:
                    o.step()
                t2 = time.perf_counter()
                if r >= args.warmup:
                    times[k][0].append(t1 - t0)
                    times[k][1].append(t2 - t1)
        step = {k: statistics.median(a + b for a, b in zip(*times[k])) for k in times}
        fb_dense = statistics.median(times["dense"][0])
        for k in times:
            fb, op = statistics.median(times[k][0]), statistics.median(times[k][1])
            print(f"| {E} | {k} | {fb * 1e3:.1f} | {fb / fb_dense:.2f} | {op * 1e3:.1f} | {step[k] * 1e3:.1f} | "
                  f"{step[k] / step['dense']:.2f} | {step[k] / step['moe']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
