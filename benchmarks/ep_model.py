"""The step-time model of expert parallelism in docs/scaling.md: the tables there are this script's output.

    python benchmarks/ep_model.py                      # markdown tables
    python benchmarks/ep_model.py --alpha-us 80 --beta-ib 45 --beta-nvl 153

No training and no GPU: parameter counts and FLOPs come from vitmoe's own accounting
(`vitmoe.models.model_info`, what `vitmoe info` prints), bandwidths and latencies are inputs
(defaults: the published measurements docs/scaling.md cites). Per training step and per rank:

* the all-to-all volume: every MoE layer sends its token copies to the ranks of their experts and
  gets the results back, forward and backward: 4 exchanges of b*N*k rows of D values (bf16: 2 bytes),
  of which (K-1)/K leave the rank in an expert-parallel group of K (routing balanced);
* its time: 4 * L_moe * (alpha(K) + bytes / beta(K)), NVLink inside a node (K <= 8), InfiniBand past it;
  the exchange sits between compute steps (no overlap assumed);
* what replicating the experts costs instead: their gradients all-reduced over all ranks every step
  (ring: 2 (R-1)/R of the bytes leave each rank), fp32 as vitmoe keeps them, and their weights, fp32
  gradients and Adam moments (16 bytes a parameter) on every GPU; with EP over K ranks each GPU holds
  1/K of that and reduces it over P/K replicas only;
* the compute it is set against: 3x the forward FLOPs of the GPU's images at an assumed MFU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from vitmoe.models import model_info
from vitmoe.models.registry import model_config

GPUS = (8, 16, 32, 64, 128, 256, 512)
EXPERTS = (8, 16, 32, 64)
NODE = 8  # GPUs per node (NVLink domain)
# All-to-all latency by EP size: DeepEP V1's low-latency dispatch (128 tokens, one message per peer) on
# H800 + CX7 400 Gb/s; 8 is inside a node. Sizes between are interpolated on log2.
ALPHA_US = {8: 77, 16: 118, 32: 155, 64: 173, 128: 192, 256: 194}


@dataclass(frozen=True)
class Model:
    name: str
    preset: str
    overrides: dict
    top_k: int

    def config(self, experts: int):
        moe = {"router": "topk", "top_k": self.top_k} if self.top_k > 1 else {}
        return model_config(self.preset, num_experts=experts, **self.overrides, **({"moe": moe} if moe else {}))


MODELS = (
    Model("source switch_vit (d 300, 12 MoE blocks, 65 tokens)", "switch_vit", {}, 1),
    Model("V-MoE-B/16 (ViT-B, 224 px, MoE every other block, top-2)", "switch_vit",
          dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12, depth=12, mlp_hidden=3072, head="linear",
               moe_layers="every_other", num_classes=1000), 2),
    Model("V-MoE-L/16 (ViT-L, 224 px, MoE every other block, top-2)", "switch_vit",
          dict(img_size=224, patch_size=16, embed_dim=1024, num_heads=16, depth=24, mlp_hidden=4096, head="linear",
               moe_layers="every_other", num_classes=1000), 2),
)


def alpha_s(k: int, alpha_us: float | None) -> float:
    if alpha_us is not None:
        return alpha_us * 1e-6
    import math

    keys = sorted(ALPHA_US)
    k = min(max(k, keys[0]), keys[-1])
    lo = max(x for x in keys if x <= k)
    hi = min(x for x in keys if x >= k)
    if lo == hi:
        return ALPHA_US[lo] * 1e-6
    f = (math.log2(k) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return (ALPHA_US[lo] + f * (ALPHA_US[hi] - ALPHA_US[lo])) * 1e-6


@dataclass
class Step:
    a2a_bytes: float     # leaving one rank per step
    a2a_s: float
    allreduce_s: float   # the experts' gradients, over their replicas
    expert_gb: float     # expert weights + grads + Adam moments on one GPU
    compute_s: float


def step(model: Model, experts: int, gpus: int, ep: int, args) -> Step:
    cfg = model.config(experts)
    info = model_info(cfg)
    n, d, layers = cfg.num_tokens, cfg.embed_dim, len(cfg.moe_block_indices())
    expert_params = layers * experts * (2 * d * cfg.mlp_hidden + cfg.mlp_hidden + d)
    rows = args.images * n * model.top_k
    off = (ep - 1) / ep
    per_exchange = rows * d * 2 * off
    beta = args.beta_nvl if ep <= NODE else args.beta_ib
    a2a = 4 * layers * (alpha_s(ep, args.alpha_us) + per_exchange / (beta * 1e9)) if ep > 1 else 0.0
    replicas = gpus // ep
    grads = expert_params / ep * 4
    ar_beta = args.beta_nvl if gpus <= NODE else args.beta_ib  # replicas span nodes once the job does
    allreduce = 2 * (replicas - 1) / replicas * grads / (ar_beta * 1e9) if replicas > 1 else 0.0
    compute = 3 * info.forward_flops_per_image * args.images / (args.peak_tflops * 1e12 * args.mfu)
    return Step(4 * layers * per_exchange, a2a, allreduce, expert_params / ep * 16 / 1e9, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="images per GPU per step (weak scaling)")
    p.add_argument("--beta-nvl", type=float, default=153.0, help="all-to-all GB/s per GPU inside a node")
    p.add_argument("--beta-ib", type=float, default=45.0, help="all-to-all and all-reduce GB/s per GPU across nodes")
    p.add_argument("--alpha-us", type=float, default=None, help="one latency for every EP size (default: by size)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4)
    args = p.parse_args()

    print(f"### All-to-all bytes per step leaving one rank ({args.images} images per GPU, bf16 rows, balanced routing)\n")
    print("| model | k | " + " | ".join(f"E={e}, K=8 / K=E" for e in EXPERTS) + " |")
    print("|---|---:|" + "---:|" * len(EXPERTS))
    for m in MODELS:
        cells = []
        for e in EXPERTS:
            a, b = step(m, e, 512, min(e, NODE), args), step(m, e, 512, e, args)
            cells.append(f"{a.a2a_bytes / 1e6:,.0f} / {b.a2a_bytes / 1e6:,.0f} MB")
        print(f"| {m.name} | {m.top_k} | " + " | ".join(cells) + " |")

    for m in MODELS:
        print(f"\n### {m.name}: step time per GPU (ms) against the GPU count\n")
        print(f"compute {step(m, 8, 8, 1, args).compute_s * 1e3:.1f} ms/step at E=8 "
              f"({args.images} images, {args.mfu:.0%} of {args.peak_tflops:g} TFLOPS; the same at every E for k fixed)\n")
        print("| E | layout | expert memory / GPU | " + " | ".join(f"{g} GPUs" for g in GPUS) + " |")
        print("|---:|---|---:|" + "---:|" * len(GPUS))
        for e in EXPERTS:
            layouts = [("replicated (K=1)", 1), ("EP K=8 (in a node)", min(e, NODE))]
            if e > NODE:
                layouts.append((f"EP K={e} (across nodes)", e))
            for name, k in layouts:
                cells = []
                for g in GPUS:
                    if k > g:
                        cells.append("-")
                        continue
                    s = step(m, e, g, k, args)
                    cells.append(f"{s.a2a_s * 1e3:.1f} + {s.allreduce_s * 1e3:.1f}")
                mem = step(m, e, max(GPUS), k, args).expert_gb
                print(f"| {e} | {name} | {mem:.1f} GB | " + " | ".join(cells) + " |")
    print("\nEach cell: all-to-all time + the experts' gradient all-reduce (ms per step, no overlap).")


if __name__ == "__main__":
    main()
