"""All-to-all on gloo here: the latency and bandwidth docs/scaling.md's step-time model is anchored on.

    python benchmarks/bench_alltoall.py                 # 2 processes, sizes 4 KB .. 64 MB per rank
    python benchmarks/bench_alltoall.py --json a2a.json

Three measurements, each the median over --repeats of the slowest rank's time (after a barrier):

1. `all_to_all_single` with equal splits, per-rank message sizes from 4 KB to 64 MB: the
   latency alpha (the 4 KB time) and bandwidth beta (the slope of time against bytes leaving a rank
   from 1 MB up) of t = alpha + bytes / beta, the model's formula.
2. vitmoe's expert-parallel exchange as `moe.parallel.expert_parallel_apply` does it, forward only:
   the counts all-to-all, the host read of the split sizes, the rows out and the results back; its
   time against two plain all-to-alls of the same rows says what the variable split costs.
3. The model's prediction for a training step against a measured one: forward, backward and AdamW
   steps of a small switch ViT (d --dim, 2 MoE blocks of 8 experts, 8x8 inputs: 5 tokens) on a
   fixed batch, on 2 processes data parallel (experts replicated, DDP) and expert parallel (ep 2);
   the difference per step set beside the model's 4 exchanges per MoE layer at the measured alpha
   and beta, less the replicated experts' gradient all-reduce that EP does not need. The time
   spent inside `expert_parallel_apply` (forward: exchanges plus the experts' own work) is shown
   too, and of it the split-size exchange that opens each layer's exchange: 8 bytes a peer, so
   beyond alpha it is time spent waiting for the other rank to arrive.

On this machine the "network" is loopback TCP between processes sharing 2 cores, so beta is a
memory-copy bandwidth and alpha a scheduling latency: the point is the formula, checked where it
can be, with the cluster's bandwidths put in from published measurements (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._functional_collectives import all_to_all_single_autograd

SIZES = [2 ** p for p in range(12, 27, 2)]  # bytes per rank: 4 KB .. 64 MB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, repeats: int) -> float:
    """Median over repeats of the slowest rank's seconds for fn()."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, repeats: int, dim: int, batch: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = {}
    for size in SIZES:
        x = torch.randn(size // 4)
        out = torch.empty_like(x)
        rows[size] = _timed(lambda: dist.all_to_all_single(out, x), repeats)
    exchange = {}
    for tokens in (256, 1024, 4096, 16384):  # token copies per rank, `dim` wide, spread evenly over ranks
        x = torch.randn(tokens, dim)
        counts = torch.full((world,), tokens // world, dtype=torch.int64)

        def vitmoe_exchange():
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts)
            send, recv = counts.tolist(), recv_counts.tolist()  # the host read of the split sizes
            y = torch.empty(sum(recv), dim)
            dist.all_to_all_single(y, x, recv, send)
            back = torch.empty_like(x)
            dist.all_to_all_single(back, y, send, recv)

        def plain_pair():
            y = torch.empty_like(x)
            dist.all_to_all_single(y, x)
            dist.all_to_all_single(x, y)

        exchange[tokens] = (_timed(vitmoe_exchange, repeats), _timed(plain_pair, repeats))
    autograd = {}
    for tokens in (256, 4096):  # the wrapper the exchange uses, so that gradients flow back to the tokens
        x = torch.randn(tokens, dim, requires_grad=True)
        split = [tokens // world] * world

        def plain():
            dist.all_to_all_single(torch.empty_like(x), x.detach(), split, split)

        def forward():
            (all_to_all_single_autograd(x, split, split, dist.group.WORLD) * 1.0).sum()

        def both():
            (all_to_all_single_autograd(x, split, split, dist.group.WORLD) * 1.0).sum().backward()

        autograd[tokens] = [_timed(f, repeats) for f in (plain, forward, both)]
    steps = {ep: _train_steps(ep, dim, batch, repeats) for ep in (1, world)}
    if rank == 0:
        Path(result_path).write_text(json.dumps({"all_to_all": rows, "exchange": exchange, "autograd": autograd,
                                                 "steps": steps}))
    dist.destroy_process_group()


def _train_steps(ep: int, dim: int, batch: int, repeats: int) -> dict:
    """Median ms of a training step (forward, backward, AdamW) on a fixed global batch, and of the part
    of the forward inside expert_parallel_apply, with the experts replicated (ep 1, DDP) or split."""
    import vitmoe.moe.layer as layer
    from vitmoe.models import VisionTransformer
    from vitmoe.models.registry import model_config
    from vitmoe.moe.parallel import expert_parallel_apply, init_expert_parallel
    from vitmoe.training.distributed import expert_parallel
    from vitmoe.training.distributed.context import wrap_ddp

    cfg = model_config("switch_vit", img_size=8, in_chans=1, num_classes=10, embed_dim=dim, depth=2, num_heads=4,
                       mlp_hidden=2 * dim, head_hidden=64, num_experts=8)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    ignore = []
    if ep > 1:
        expert_parallel.shard_experts(model, init_expert_parallel(ep))
        ignore = expert_parallel.expert_param_names(model)
    forward = wrap_ddp(model, torch.device("cpu"), ignore)
    opt = torch.optim.AdamW(model.parameters())
    inside, waited = [0.0], [0.0]
    plain_a2a = dist.all_to_all_single

    def timed(*a, **k):
        t0 = time.perf_counter()
        y = expert_parallel_apply(*a, **k)
        inside[0] += time.perf_counter() - t0
        return y

    def counts_a2a(out, inp, *a, **k):  # the split-size exchange opens each layer's exchange: a rendezvous
        t0 = time.perf_counter()
        r = plain_a2a(out, inp, *a, **k)
        if inp.dtype == torch.int64:
            waited[0] += time.perf_counter() - t0
        return r

    layer.expert_parallel_apply = timed  # the name the MoE layer calls
    dist.all_to_all_single = counts_a2a
    gen = torch.Generator().manual_seed(dist.get_rank())
    n = batch // dist.get_world_size()
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    total, spent, waits = [], [], []
    for i in range(repeats + 5):
        inside[0] = waited[0] = 0.0
        dist.barrier()
        t0 = time.perf_counter()
        out = forward(x, return_aux=True)
        (torch.nn.functional.cross_entropy(out.logits, y) + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        if i >= 5:
            total.append(time.perf_counter() - t0)
            spent.append(inside[0])
            waits.append(waited[0])
    layer.expert_parallel_apply, dist.all_to_all_single = expert_parallel_apply, plain_a2a
    return {"step_ms": 1e3 * statistics.median(total), "inside_ms": 1e3 * statistics.median(spent),
            "counts_ms": 1e3 * statistics.median(waits)}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = alpha + x / beta over (x bytes, t seconds); returns (alpha s, beta bytes/s)."""
    n = len(points)
    mx, mt = sum(x for x, _ in points) / n, sum(t for _, t in points) / n
    slope = sum((x - mx) * (t - mt) for x, t in points) / sum((x - mx) ** 2 for x, _ in points)
    return max(mt - slope * mx, 0.0), 1.0 / slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dim", type=int, default=64, help="token width of the exchange and the training check")
    p.add_argument("--batch", type=int, default=128, help="global batch of the training check")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        mp.spawn(_worker, args=(args.world, _free_port(), args.repeats, args.dim, args.batch, str(result)),
                 nprocs=args.world)
        r = json.loads(result.read_text())
    step = {int(k): v for k, v in r["steps"].items()}
    off = (args.world - 1) / args.world  # the share of a rank's message that leaves it
    a2a = {int(k): v for k, v in r["all_to_all"].items()}
    # Small messages are latency and scheduling noise, large ones bandwidth: the slope from 1 MB up, the
    # intercept from the smallest message.
    _, beta = fit([(s * off, t) for s, t in a2a.items() if s >= 2 ** 20])
    alpha = a2a[min(a2a)]
    print(f"gloo all_to_all_single, {args.world} processes on this machine ({os.cpu_count()} CPUs), 1 thread each\n")
    print("| bytes per rank | leaving the rank | time (ms) | GB/s leaving |\n|---:|---:|---:|---:|")
    for s, t in a2a.items():
        print(f"| {s:,} | {int(s * off):,} | {t * 1e3:.3f} | {s * off / t / 1e9:.2f} |")
    print(f"\nt = alpha + bytes_leaving / beta: alpha = {alpha * 1e6:.0f} us (the 4 KB time), beta = {beta / 1e9:.2f} GB/s "
          f"(slope from 1 MB up)\n")
    print(f"vitmoe's exchange (counts, host read of the splits, rows out, results back) of d={args.dim} fp32 rows "
          f"against two plain all-to-alls\n")
    print("| token copies per rank | vitmoe exchange (ms) | two plain all-to-alls (ms) | extra |\n|---:|---:|---:|---:|")
    for tokens, (ex, plain) in r["exchange"].items():
        print(f"| {int(tokens):,} | {ex * 1e3:.3f} | {plain * 1e3:.3f} | {ex / plain:.2f}x |")
    print(f"\none all-to-all of d={args.dim} fp32 rows: plain, and through the autograd wrapper the exchange uses\n")
    print("| token copies per rank | all_to_all_single (ms) | all_to_all_single_autograd (ms) | with its backward (ms) |\n"
          "|---:|---:|---:|---:|")
    for tokens, (plain, fwd, both) in r["autograd"].items():
        print(f"| {int(tokens):,} | {plain * 1e3:.3f} | {fwd * 1e3:.3f} | {both * 1e3:.3f} |")
    report = {"world": args.world, "all_to_all_s": a2a, "alpha_s": alpha, "beta_Bps": beta, "exchange_s": r["exchange"]}
    # The model: per step, every MoE layer exchanges its token copies 4 times (rows out and results back,
    # forward and backward), (W-1)/W of them leaving each rank; 8x8 images in patches of 4: 4 tokens and
    # the class token; switch (k=1) in both blocks; fp32. Replicated, the experts' gradients are
    # all-reduced instead (ring: 2 (W-1)/W of them leave each rank); with ep = W each expert has one
    # replica and nothing is reduced.
    tokens = args.batch // args.world * 5
    per_exchange = tokens * args.dim * 4 * off
    exchanges = 2 * 4 * (alpha + per_exchange / beta) * 1e3
    d, h = args.dim, 2 * args.dim
    expert_bytes = 2 * 8 * (d * h + h + h * d + d) * 4
    allreduce = (2 * alpha + 2 * off * expert_bytes / beta) * 1e3
    dp, ep = step[1], step[args.world]
    print(f"\ntraining step, switch ViT d {args.dim}, 2 MoE blocks of 8 experts, global batch {args.batch}, "
          f"{args.world} processes\n")
    print("| experts | ms / step | inside expert_parallel_apply (forward) | of which the split-size exchanges |\n"
          "|---|---:|---:|---:|")
    print(f"| replicated (data parallel) | {dp['step_ms']:.1f} | - | - |")
    print(f"| expert parallel (ep {args.world}) | {ep['step_ms']:.1f} | {ep['inside_ms']:.1f} | {ep['counts_ms']:.1f} |")
    print(f"\nmeasured difference {ep['step_ms'] - dp['step_ms']:+.1f} ms; the model: 8 exchanges of "
          f"{per_exchange / 1e3:.1f} KB leaving each rank, {exchanges:.1f} ms, less the replicated experts' gradient "
          f"all-reduce ({expert_bytes / 1e6:.2f} MB), {allreduce:.1f} ms: {exchanges - allreduce:+.1f} ms")
    report.update(train_steps=step, model_exchange_ms=exchanges, model_allreduce_ms=allreduce)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
