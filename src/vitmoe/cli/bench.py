"""`vitmoe bench`: which expert computation is fastest for a run's MoE layers on this machine.

Builds the run's model (the same config, --set overrides and precision as `vitmoe train`), and
for each distinct MoE layer shape times one layer's forward + backward on a batch of the run's
size with the grouped matmul and with the capacity-padded batched matmul, interleaved round by
round (median). The winner of each shape goes into this machine's table
(`vitmoe.moe.kernel_table`), which `dispatch: auto` reads in every later run; padded wins only
when it is faster by more than --margin, since the two compute the same thing and grouped needs
no host read of the largest queue.
"""
from __future__ import annotations

import argparse
import statistics
import time

from .common import CLIError, HelpFormatter, echo
from .options import add_device_option


def add_parser(sub) -> None:
    from ..training.config.train_config import AMP_MODES

    p = sub.add_parser(
        "bench", help="measure the fastest expert computation for a run's shapes (dispatch: auto uses it)",
        formatter_class=HelpFormatter, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", metavar="FILE", default=None, help="the run's YAML config (as vitmoe train --config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, as vitmoe train --set (repeatable), e.g. --set model.num_experts=64")
    add_device_option(p, default=None, help="device (default: the config's)")
    p.add_argument("--amp", choices=list(AMP_MODES), default=None, help="precision (default: the config's)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per path (after 2 warm-up rounds)")
    p.add_argument("--margin", type=float, default=0.05,
                   help="padded is recorded only when faster than grouped by more than this fraction (default 0.05)")
    p.add_argument("--dry-run", action="store_true", help="print the measurements, leave the table as it is")
    p.set_defaults(func=run)


def _time_step(layer, x, g, amp: str, device) -> float:
    from ..training.distributed.context import synchronize
    from ..training.evaluation.precision import autocast_context

    layer.zero_grad(set_to_none=True)
    synchronize(device)
    t0 = time.perf_counter()
    with autocast_context(amp, device):
        y = layer(x)
    y.float().backward(g)
    synchronize(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from ..models import VisionTransformer
    from ..moe import find_moe_layers
    from ..moe.kernel_table import record
    from ..training.config import parse_set
    from ..training.config.spec import load_config, resolve
    from ..training.distributed.context import resolve_device
    from ..training.evaluation.precision import autocast_context, resolve_amp

    if args.repeats < 1 or not 0 <= args.margin < 1:
        raise CLIError("--repeats must be >= 1 and --margin in [0, 1)")
    overrides = parse_set(args.set)
    if args.device:
        overrides["device"] = args.device
    if args.amp:
        overrides["amp"] = args.amp
    spec = resolve(load_config(args.config, overrides))
    cfg, device = spec.config, resolve_device(spec.config.device)
    amp = resolve_amp(cfg.amp, device)
    model = VisionTransformer(spec.model).to(device).train()
    batch = max(1, cfg.batch_size // max(1, cfg.nproc))
    tokens = spec.model.num_tokens
    shapes: dict[str, tuple[str, object]] = {}
    for name, layer in find_moe_layers(model):
        experts = getattr(layer, "experts", None)
        if experts is None or not hasattr(experts, "_uses_grouped"):
            continue  # a layer without stacked experts: nothing to choose
        # this model is bench's own: its layers run "auto" once to name their table keys
        experts.dispatch_path = "auto"
        with torch.no_grad(), autocast_context(amp, device):
            layer(torch.randn(batch, tokens, experts.w1.shape[1], device=device))
        key = experts.last_shape_key
        if key is not None and key not in shapes:
            shapes[key] = (name, layer)
    if not shapes:
        raise CLIError(f"model {cfg.model} has no routed expert layer whose computation can be chosen "
                       f"(dense, Soft MoE, or a dtype grouped_mm does not run: {amp} on {device.type})")
    echo(f"# {cfg.model}: {len(shapes)} expert shape(s), batch {batch} x {tokens} tokens, {device}, amp {amp}, "
         f"median of {args.repeats} interleaved rounds")
    echo("| layer | shape | grouped ms | padded ms | padded / grouped | choice |")
    echo("|---|---|---:|---:|---:|---|")
    choices = {}
    for key, (name, layer) in shapes.items():
        width = layer.experts.w1.shape[1]
        x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
        g = torch.randn_like(x)
        paths = {"grouped": layer, "padded": copy.deepcopy(layer)}
        for path, m in paths.items():
            m.experts.dispatch_path = path
        times = {path: [] for path in paths}
        for r in range(2 + args.repeats):
            for path, m in paths.items():
                t = _time_step(m, x, g, amp, device)
                if r >= 2:
                    times[path].append(t)
        grouped, padded = (statistics.median(times[p]) for p in ("grouped", "padded"))
        choice = "padded" if padded < (1 - args.margin) * grouped else "grouped"
        choices[key] = choice
        echo(f"| {name} | {key} | {grouped * 1e3:.1f} | {padded * 1e3:.1f} | {padded / grouped:.2f} | {choice} |")
    if args.dry_run:
        echo("--dry-run: the table is unchanged")
    else:
        path = record(choices)
        echo(f"wrote {path} ({len(choices)} shape(s)); `dispatch: auto` uses it in every run on this machine")
    return 0

