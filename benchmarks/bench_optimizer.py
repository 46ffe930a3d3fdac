"""The optimizer step of an MoE ViT against its dense twin: torch's AdamW implementations and
freeze_unrouted's snapshot, timed alone (gradients are fixed random tensors; no forward/backward).

    python benchmarks/bench_optimizer.py                       # d 300, depth 2, hidden 1024, 16 and 64 experts
    python benchmarks/bench_optimizer.py --experts 8 --repeats 30

Rows (every one on the same parameters and gradients, one optimizer per row):
  default       torch.optim.AdamW(params): what a plain user loop gets (the for-loop on a CPU)
  foreach       AdamW(foreach=True)
  fused         AdamW(fused=True): vitmoe.training.fastest_adam picks it where torch has the kernel
  fused+freeze old / new   the fused step inside freeze_unrouted: the full copy of every expert and
                its moments restored with torch.where (old, `snapshot()`), or only the unrouted
                experts' rows (new, `snapshot(passes)`); `1 routed` = one expert per layer got
                tokens (batch-granular random routing), `all routed` = every expert did (switch,
                dropless, a large batch: nothing to freeze)
Rounds are interleaved in one process (machine noise hits every row alike): the median of
`--repeats` rounds, and the ratio to the dense ViT's default AdamW step of the same rounds.
The script changes no process-wide setting.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from vitmoe import create_model
from vitmoe.training.recipe.freeze import UnroutedFreeze


def _fill_grads(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def _passes(freeze: UnroutedFreeze, routed: str) -> list:
    """Stand-ins for the step's forward outputs: only the per-layer loads are read."""
    stats = {}
    for name, layer in freeze.layers:
        load = torch.zeros(layer.num_experts)
        if routed == "all":
            load += 65.0
        else:
            load[0] = 64 * 65.0
        stats[name] = {"load": load}
    return [SimpleNamespace(moe_stats=stats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    width = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=args.dim, depth=args.depth,
                 num_heads=args.heads, mlp_hidden=args.hidden)
    models = {"vit": create_model("vit", **width)}
    models.update({f"switch E={e}": create_model("switch_vit", num_experts=e, **width) for e in args.experts})

    rows = {}  # (model, row) -> step function
    for label, model in models.items():
        _fill_grads(model)
        for row, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kw)
            rows[(label, row)] = opt.step
        if label == "vit":
            continue
        for routed in ("1", "all"):
            for version in ("old", "new"):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
                freeze = UnroutedFreeze(model, opt)
                passes = _passes(freeze, routed)

                def step(opt=opt, freeze=freeze, passes=passes, new=version == "new"):
                    saved = freeze.snapshot(passes) if new else freeze.snapshot()
                    opt.step()
                    freeze.restore(saved, passes)
                rows[(label, f"fused+freeze {version}, {routed} routed")] = step

    for fn in rows.values():  # warm-up: creates the moments (first-step allocations untimed)
        fn()
    times = {k: [] for k in rows}
    for _ in range(args.repeats):
        for key, fn in rows.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med[("vit", "default")]
    params = {label: sum(p.numel() for p in m.parameters()) / 1e6 for label, m in models.items()}
    print(f"AdamW step, d {args.dim}, depth {args.depth}, hidden {args.hidden}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} interleaved rounds\n")
    print("| model | params (M) | step | ms | / dense default | / this model's default |")
    print("|---|---:|---|---:|---:|---:|")
    for (label, row), ms in med.items():
        print(f"| {label} | {params[label]:.1f} | {row} | {ms:.1f} | {ms / base:.2f} | "
              f"{ms / med[(label, 'default')]:.2f} |")


if __name__ == "__main__":
    main()
