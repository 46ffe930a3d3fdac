"""`vitmoe analyze RUN`: what the routers did, as PNGs and analysis.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, HelpFormatter, echo
from .options import add_checkpoint_options, add_data_dir_option, add_dataset_option, add_device_option, seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="what the experts did: routing maps, balance, dead experts", formatter_class=HelpFormatter,
        description="One pass over the test split with the MoE layers recording their routing (outputs "
                    "unchanged). Writes, per MoE layer, a class x expert heatmap of token shares, patch-position "
                    "maps per expert and a grid of test images tinted by expert, and analysis.json with load "
                    "balance, router entropy, the dropped fraction at the eval capacity and dead experts. For "
                    "randomly routed models also each expert's accuracy, merged / ensemble / random accuracy and "
                    "how far the experts drifted apart (what decides whether merging works).")
    p.add_argument("run", metavar="RUN", help="run directory (or a model .safetensors file)")
    add_checkpoint_options(p, default="best")
    add_dataset_option(p, help="test set (default: the run's)")
    add_data_dir_option(p, help="dataset directory (default: the run's, then $DATA, ./data)")
    p.add_argument("--images", type=int, default=16, help="test images in the tinted grid (default 16)")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="MoE layers to draw (default all; names as in analysis.json, e.g. blocks.1.mlp)")
    p.add_argument("--dead-threshold", type=float, default=0.1, metavar="F",
                   help="an expert is dead when its load share is below F / E (default 0.1)")
    p.add_argument("--batch", type=int, default=500, help="evaluation batch size")
    add_device_option(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of random routes (random-routing accuracy)")
    p.add_argument("--out", default=None, help="output folder (default RUN/analysis)")
    p.add_argument("--force", action="store_true", help="replace files of an earlier analysis in the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder
    from ..report.analysis import layer_summary, random_routing_report, record_routing, shares
    from ..report.analysis_plots import plot_class_experts, plot_position_experts, plot_routed_images
    from .common import analysis_dir
    from .eval import prepare_eval

    if args.images < 0:
        raise CLIError(f"--images {args.images}: must be 0 or more")
    if not 0 <= args.dead_threshold <= 1:
        raise CLIError(f"--dead-threshold {args.dead_threshold}: must be in [0, 1]")
    if args.out is not None:  # a folder that can never be written fails before the model and data load
        check_output_folder(args.out, "--out")
    path, model, loader, dataset, classes, _ = prepare_eval(args.run, None, args.dataset, args.data_dir, args.batch,
                                                            args.device, args.seed, args.which, args.ema)
    if not model.moe_modules():
        raise CLIError(f"{path} is a dense model: there is no routing to analyze")
    names = [n for n, _ in model.moe_modules()]
    unknown = sorted(set(args.layers or []) - set(names))
    if unknown:
        raise CLIError(f"--layers {' '.join(unknown)}: not an MoE layer of {path}; its layers: {', '.join(names)}")
    out = Path(args.out) if args.out else analysis_dir(args.run, path)
    tags = [n.replace(".", "_") for n in names if not args.layers or n in args.layers]
    planned = ["analysis.json", *(f"{kind}_{tag}.png" for tag in tags for kind in ("classes", "positions", "routes"))]
    check_output_folder(out, "--out", names=planned, force=args.force)
    out.mkdir(parents=True, exist_ok=True)
    rec = record_routing(model, loader, len(classes), keep_images=args.images)
    result = {"model_file": str(path), "dataset": dataset, "images": rec["images"], "test_acc": rec["acc"],
              "classes": classes, "dead_threshold": args.dead_threshold, "layers": {}}
    written = []
    for name, c in rec["counts"].items():
        result["layers"][name] = layer_summary(c, args.dead_threshold)
        if args.layers and name not in args.layers:
            continue
        tag = name.replace(".", "_")
        written.append(plot_class_experts(shares(c.by_class).cpu().numpy(), classes, name, out / f"classes_{tag}.png"))
        written.append(plot_position_experts(shares(c.by_position).cpu().numpy(), name, out / f"positions_{tag}.png"))
        if rec["kept_images"] is not None and name in rec["kept_routes"]:
            written.append(plot_routed_images(rec["kept_images"].numpy(), rec["kept_routes"][name].numpy(), c.experts,
                                              name, out / f"routes_{tag}.png"))
    rr = random_routing_report(model, loader, args.seed)
    if rr is not None:
        result["random_routing"] = rr
    from ..fileio import atomic_write_bytes

    written.append(atomic_write_bytes(out / "analysis.json", json.dumps(result, indent=2).encode()))
    echo(f"{path}: {rec['images']:,} {dataset} test images, accuracy {rec['acc']:.2f}%")
    for name, s in result["layers"].items():
        dead = f", dead experts {s['dead_experts']}" if s["dead_experts"] else ""
        echo(f"  {name}: {s['experts']} experts, load max/mean {s['load_max_over_mean']:.2f}, "
             f"entropy {s['router_entropy']:.3f}, dropped {100 * s['dropped_frac']:.2f}%{dead}")
    if rr is not None:
        per = rr.get("per_expert_acc")
        echo(f"  random routing: merged {rr['merged_acc']:.2f}%, ensemble {rr['ensemble_acc']:.2f}%, "
             f"random {rr['random_acc']:.2f}%" + (f", each expert {', '.join(f'{a:.2f}' for a in per)}%" if per else "")
             + f"; drift {', '.join(f'{v:.3f}' for v in rr['drift'].values())}")
    echo(f"written: {out} ({len(written)} files)")
    return 0
