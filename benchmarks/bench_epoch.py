"""Per-epoch training time and inference time of MoE ViTs relative to the dense ViT at equal width.

All models are built in one process and timed interleaved (round-robin, `--repeats` rounds, the
median is reported), on synthetic CIFAR-shaped uint8 data held on the device, with the trainer's
loss (cross-entropy + MoE aux loss), the trainer's AdamW (`fastest_adam`: fused where torch has
the kernel; `--optimizer default` times `torch.optim.AdamW`'s own default instead) and the
device-resident loader. The source size is
d 300 / MLP 1024 / depth 12 on 50,000 images; on a small CPU pick a subset, e.g.

    python benchmarks/bench_epoch.py --images 1024 --dmodel 192 --depth 6 --experts 4 16 64

Prints a markdown table: seconds per epoch (train) and per pass over the images (inference,
eval mode: random_vit merged), and both as ratios to the first model in the first --amp mode (`--amp off bf16`, the
default on CPU, times every model in both; bf16 is autocast over fp32 weights, as `--amp bf16`
trains). Nothing process-wide is changed: the library's own allocator choice (vitmoe.runtime)
is part of what is measured; start it under `LD_PRELOAD=<libtcmalloc_minimal.so.4>` to time what
`vitmoe train` runs on when tcmalloc is installed (it re-executes itself on it). `--consistency` adds random_vit with
AdaMix consistency regularisation (two forward passes per step + symmetric KL, as the trainer's
`consistency_weight`); `--augment-policy` times the loader's AutoAugment / RandAugment too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitmoe import create_model, model_info
from vitmoe.data import DATASETS, DeviceLoader, ImageData
from vitmoe.training.loop.losses import symmetric_kl
from vitmoe.training.evaluation.precision import autocast_context
from vitmoe.training.loop.optim import fastest_adam, param_groups


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, opt, loader, device, amp, consistency=0.0):
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        with autocast_context(amp, device):
            out = model(x, return_aux=True)
        logits = out.logits
        loss = F.cross_entropy(logits.float(), y) + out.aux_loss
        if consistency:  # a second pass with fresh random routes (trainer: consistency_weight)
            with autocast_context(amp, device):
                logits2 = model(x)
            loss = 0.5 * (loss + F.cross_entropy(logits2.float(), y)) + consistency * symmetric_kl(logits, logits2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def infer(model, loader, device, amp):
    model.eval()
    sync(device)
    t0 = time.perf_counter()
    for x, _ in loader:
        with autocast_context(amp, device):
            model(x)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="images per epoch (CIFAR-10 has 50,000)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dmodel", type=int, default=300)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="switch_vit expert counts")
    p.add_argument("--random-experts", type=int, default=4, help="random_vit expert count")
    p.add_argument("--consistency", type=float, default=0.0, metavar="W",
                   help="also time random_vit with consistency regularisation of weight W (AdaMix: 1)")
    p.add_argument("--augment-policy", choices=["none", "autoaugment", "randaugment"], default="none",
                   help="training loader augmentation policy (after crop and flip)")
    p.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                   help="time these presets as they are (e.g. cct_2_3x2 cct_2_3x2_switch) instead of vit / "
                        "switch_vit / random_vit at --dmodel/--depth/--heads/--mlp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", nargs="+", choices=["off", "bf16", "fp16"], default=["off", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--optimizer", choices=["trainer", "default"], default="trainer",
                   help="trainer: vitmoe train's AdamW (fastest_adam); default: torch.optim.AdamW(params)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    info = DATASETS["cifar10"]
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (args.images,), generator=g), info)
    train_loader = DeviceLoader(data, args.batch, device, train=True, seed=0, augment_policy=args.augment_policy)
    test_loader = DeviceLoader(data, max(args.batch, 500), device, train=False)

    width = dict(embed_dim=args.dmodel, depth=args.depth, num_heads=args.heads, mlp_hidden=args.mlp)
    specs = [("vit", "vit", {}, 0.0)]
    if args.presets:
        width, specs = {}, [(name, name, {}, 0.0) for name in args.presets]
    else:
        specs += [(f"switch_vit E={e}", "switch_vit", {"num_experts": e}, 0.0) for e in args.experts]
        specs += [(f"random_vit E={args.random_experts}", "random_vit", {"num_experts": args.random_experts}, 0.0)]
    if args.consistency:
        specs += [(f"random_vit E={args.random_experts} +consistency (2 fwd/step)", "random_vit",
                   {"num_experts": args.random_experts}, args.consistency)]

    runs = []
    for (label, preset, extra, cw), amp in ((spec, amp) for spec in specs for amp in args.amp):
        model = create_model(preset, **width, **extra).to(device)
        groups = param_groups(model, 0.05, True)
        opt = (fastest_adam(groups, lr=1e-4) if args.optimizer == "trainer" else torch.optim.AdamW(groups, lr=1e-4))
        fwd = torch.compile(model) if args.compile else model
        # Warm-up: one batch of training and inference (allocations, compilation).
        x, y = next(iter(train_loader))
        with autocast_context(amp, device):
            out = fwd(x, return_aux=True)
            (F.cross_entropy(out.logits.float(), y) + out.aux_loss).backward()
        opt.zero_grad(set_to_none=True)
        runs.append(dict(label=label, amp=amp, model=fwd, opt=opt, params=model_info(model.config).total_params,
                         consistency=cw, train=[], infer=[]))

    for r in range(args.repeats):
        train_loader.set_epoch(r)
        for run in runs:  # interleaved: every round times every model once
            run["train"].append(train_epoch(run["model"], run["opt"], train_loader, device, run["amp"],
                                            run["consistency"]))
            run["infer"].append(infer(run["model"], test_loader, device, run["amp"]))

    base_t = statistics.median(runs[0]["train"])  # the first model in the first --amp mode
    base_i = statistics.median(runs[0]["infer"])
    print(f"\n{args.images} images/epoch, batch {args.batch}, d {args.dmodel}, depth {args.depth}, MLP {args.mlp}, "
          f"augment policy {args.augment_policy}, device {device}, compile {args.compile}, median of {args.repeats} interleaved rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print(f"| model | amp | params | train s/epoch | train vs {runs[0]['label']} {runs[0]['amp']} | inference s | "
          f"inference vs it | train img/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        t, i = statistics.median(run["train"]), statistics.median(run["infer"])
        print(f"| {run['label']} | {run['amp']} | {run['params']:,} | {t:.3f} | {t / base_t:.2f}x | {i:.3f} | {i / base_i:.2f}x | "
              f"{args.images / t:,.0f} |")


if __name__ == "__main__":
    main()
