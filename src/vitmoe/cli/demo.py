"""`vitmoe demo`: vit, switch_vit and random_vit at a small width on digits, then the report.

With `--time-budget SECONDS` it becomes a time-limited comparison: every model family trains for
the same training-time budget at one small width (d 64, depth 6, 4 heads, MLP 128), and the report
plus a cost table (epochs and steps done in the budget, training images/s, accuracy) answer
"does MoE help here, and at what cost" in one command, e.g.

    vitmoe demo --dataset fashion-mnist --data-dir ../shared/datasets --time-budget 120
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..fileio import atomic_write_text
from ..outputs import check_output_folder
from ..readers import load_json
from ..rundir import is_run
from .common import CLIError, HelpFormatter, echo
from .options import add_data_dir_option, add_dataset_option, add_device_option, seed_arg

MODELS = ("vit", "switch_vit", "random_vit")
# How long `make demo` / `vitmoe demo` takes (measured; README's quick start states the same words).
DEMO_TIME = "under a minute on a 2-core CPU"
# Marks an output folder the demo made: its runs may be replaced by the next demo (re-running the quick start).
MARKER = ".vitmoe-demo"
# Small enough for DEMO_TIME (8x8 digits, patch 4: 2x2 patches).
DEMO_MODEL = dict(embed_dim=64, depth=4, num_heads=4, mlp_hidden=128, head_hidden=128, pool="mean")
DEMO_EXPERTS = {"switch_vit": 8, "random_vit": 4}
DEMO_RECIPE = dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=2, batch_size=32, augment=False,
                   label_smoothing=0.0, grad_clip=1.0, log_every=0, keep_checkpoints=1)

# --- the time-limited comparison ---------------------------------------------------------------
# Family -> (preset, model overrides, training overrides). One small width for all; depth 6 so
# that the ColossalAI pyramid (MoE in blocks 1, 3, 5 with [4, 4, 8] experts) keeps its shape.
# Each preset keeps its own character (the source models: no dropout, MLP head; the Lite ones:
# dropout 0.1, linear zero-initialised head, capacity 1.25 / 2.0).
COMPARE_WIDTH = dict(embed_dim=64, depth=6, num_heads=4, mlp_hidden=128)
_SOURCE = dict(COMPARE_WIDTH, head_hidden=128, pool="mean")
FAMILIES: dict[str, tuple[str, dict, dict]] = {
    "vit": ("vit", _SOURCE, {}),
    "switch_vit": ("switch_vit", dict(_SOURCE, num_experts=8), {}),
    "random_vit": ("random_vit", dict(_SOURCE, num_experts=4, moe={"eval_mode": "merged"}), {}),
    "random_vit_cr": ("random_vit", dict(_SOURCE, num_experts=4, moe={"eval_mode": "merged"}), dict(consistency_weight=1.0)),
    "vit_lite6": ("vit_lite6", dict(COMPARE_WIDTH), {}),
    "vit_moe_lite6": ("vit_moe_lite6", dict(COMPARE_WIDTH), {}),
    "pr_moe_lite6": ("pr_moe_lite6", dict(COMPARE_WIDTH), {}),
}
COMPARE_MODELS = ("vit", "switch_vit", "random_vit", "vit_lite6", "vit_moe_lite6", "pr_moe_lite6")
COMPARE_RECIPE = dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_steps=50, batch_size=128,
                      eval_batch_size=1000, augment=False, label_smoothing=0.0, grad_clip=1.0, log_every=0,
                      keep_checkpoints=1)
COMPARE_MAX_EPOCHS = 1000  # an upper bound: the budget ends the run (and its cosine decay)


# --- the recipe demo (a dataset with a recipe file, no --time-budget, no --models) -----------
RECIPE_VARIANTS = ("", "_switch", "_random")  # the recipe's dense model, its switch MoE, its random-routing MoE


def recipe_path(dataset: str):
    """The packaged recipe of `dataset` (vitmoe/recipes/<dataset>.yaml, also configs/recipes/), or None."""
    from importlib.resources import files

    path = files("vitmoe") / "recipes" / f"{dataset.replace('-', '_')}.yaml"
    return path if path.is_file() else None


def recipe_configs(dataset: str, out: Path, time_budget_s: float | None, epochs: int | None, seed: int = 0,
                   device: str = "auto", data_dir: str | None = None, threshold: float | None = None):
    """The recipe's model and its MoE variants, each trained with the recipe (its budget unless
    `time_budget_s` is given)."""
    from ..models import list_models
    from ..training import TrainConfig

    base = TrainConfig.from_yaml(str(recipe_path(dataset)))
    presets = set(list_models())
    models = [base.model + v for v in RECIPE_VARIANTS if base.model + v in presets]
    changes = dict(dataset=dataset, seed=seed, device=device, data_dir=data_dir)
    if time_budget_s is not None:
        changes["time_budget_s"] = time_budget_s
    if epochs is not None:
        changes["epochs"] = epochs
    if threshold is not None:
        changes["threshold"] = threshold
    return models, [base.updated(dict(changes, model=m, out=str(out / m))).validate() for m in models]


def _available_families() -> list[str]:
    from ..models import list_models

    presets = set(list_models())
    return [f for f, (preset, _, _) in FAMILIES.items() if preset in presets]


def add_parser(sub) -> None:

    p = sub.add_parser(
        "demo", help="train vit, switch_vit and random_vit briefly and report (or compare families in a time budget)",
        formatter_class=HelpFormatter,
        description="Train the three source models at a small width (d 64, depth 4, 4 heads, MLP 128, mean pooling; "
                    "switch_vit with 8 experts, random_vit with 4, evaluated merged) with AdamW, then write the "
                    "report (results.md, accuracy.png, expert-load plots) into OUT/report and print the table. "
                    f"On the offline digits set this takes {DEMO_TIME}. Running it again replaces the runs it "
                    "made before in OUT (marked by OUT/" + MARKER + "); a folder holding anything else is left "
                    "alone (choose another --out, or --force).\n\n"
                    "With --time-budget S: a time-limited comparison. Each model family (default: "
                    + ", ".join(COMPARE_MODELS) + "; also random_vit_cr = random_vit with AdaMix consistency "
                    "regularisation) trains at d 64, depth 6, 4 heads, MLP 128 for S seconds of training time "
                    "(evaluation not counted; the last epoch ends early and is evaluated; the cosine decay ends "
                    "with the budget), batch 128, AdamW lr 2e-3, 50 warm-up steps. The report and a cost table "
                    "(epochs and steps done, training images/s, accuracy) follow. Example:\n"
                    "  vitmoe demo --dataset fashion-mnist --data-dir ../shared/datasets --time-budget 120\n\n"
                    "A dataset with a recipe (vitmoe/recipes/, linked as configs/recipes/: fashion-mnist), given "
                    "without --time-budget and --models, gets the recipe demo instead: the recipe's model and its "
                    "switch and random-routing MoE variants, each trained with the recipe for its budget "
                    "(fashion-mnist: CCT-2/3x2, 10 minutes each).")
    add_dataset_option(p, help="dataset (default digits)", default="digits")
    add_data_dir_option(p, help="dataset directory (default $DATA, then ./data)")
    p.add_argument("--out", default=None,
                   help="directory of the runs and the report (default demo_runs, or compare_runs with --time-budget)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per model (default 20; with --time-budget an upper bound, default {COMPARE_MAX_EPOCHS})")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", dest="time_budget",
                   help="training-time budget per model: run the time-limited comparison")
    p.add_argument("--models", nargs="+", choices=list(FAMILIES), default=None,
                   help="model families to train (default: " + ", ".join(MODELS) + "; with --time-budget: "
                        + ", ".join(COMPARE_MODELS) + ")")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed")
    p.add_argument("--threshold", type=float, default=None,
                   help="accuracy for the 'epochs to' column (default 75, or the recipe's)")
    add_device_option(p)
    p.add_argument("--force", action="store_true",
                   help="replace the runs in OUT even when OUT was not made by vitmoe demo")
    p.set_defaults(func=run)


def demo_config(model: str, dataset: str, out: Path, epochs: int, seed: int = 0, device: str = "auto",
                data_dir: str | None = None, threshold: float = 75.0):
    """The demo run of a source model (vit, switch_vit, random_vit) or, for other families, the
    comparison width trained for `epochs`."""
    from ..training import TrainConfig

    if model not in MODELS:
        preset, mc, extra = FAMILIES[model]
        recipe = dict(DEMO_RECIPE, **extra)
        return TrainConfig(model=preset, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed, device=device,
                           out=str(out / model), model_config=dict(mc), threshold=threshold, **recipe).validate()
    mc = dict(DEMO_MODEL)
    if model in DEMO_EXPERTS:
        mc["num_experts"] = DEMO_EXPERTS[model]
    return TrainConfig(model=model, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed, device=device,
                       out=str(out / model), model_config=mc, threshold=threshold, **DEMO_RECIPE).validate()


def compare_config(family: str, dataset: str, out: Path, time_budget_s: float, epochs: int = COMPARE_MAX_EPOCHS,
                   seed: int = 0, device: str = "auto", data_dir: str | None = None, threshold: float = 75.0):
    """One family of the time-limited comparison."""
    from ..training import TrainConfig

    if family not in FAMILIES:
        raise CLIError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    preset, mc, extra = FAMILIES[family]
    return TrainConfig(model=preset, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed, device=device,
                       out=str(out / family), model_config=dict(mc), threshold=threshold,
                       time_budget_s=time_budget_s, **dict(COMPARE_RECIPE, **extra)).validate()


def cost_table(run_dirs, labels) -> str:
    """Markdown: what each family did with its budget (from summary.json)."""
    head = ("family", "model", "params", "active/token", "epochs", "steps", "fwd/step", "train img/s",
            "train s", "best acc (epoch)", "final acc")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for label, d in zip(labels, run_dirs):
        s = json.loads((Path(d) / "summary.json").read_text())
        ips = 60_000 / s["train_time_60k_s"] if s.get("train_time_60k_s") else None
        best = "n/a" if s.get("best_acc") is None else f"{s['best_acc']:.2f} ({s['best_epoch']})"
        final = "n/a" if s.get("final_acc") is None else f"{s['final_acc']:.2f}"
        lines.append("| " + " | ".join([
            label, s["name"], f"{s['params']:,}", f"{s['active_params']:,}", str(s["epochs"]), str(s.get("steps", "")),
            str(s.get("forwards_per_step", 1)), "n/a" if ips is None else f"{ips:,.0f}",
            f"{s['train_time_s']:.1f}", best, final]) + " |")
    return "\n".join(lines) + "\n"


def _made_by_demo(out: Path) -> set[str] | None:
    """Names of the entries of `out` an earlier demo made, or None when `out` is not a demo folder."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        made = load_json(marker, "demo marker", limit=100_000).get("made", [])
    except (OSError, ValueError, AttributeError):  # PathError (a ValueError) included: trust nothing in it
        return set()
    return {m for m in made if isinstance(m, str)} if isinstance(made, list) else set()


def check_inputs(dataset: str, data_dir: str | None) -> None:
    """The dataset's files are found (or downloaded) and sound, before claim_output removes an
    earlier demo's results: a demo that cannot run leaves them as they were."""
    from ..data import check_dataset

    check_dataset(dataset, data_dir)


def claim_output(out: Path, run_dirs: list[Path], force: bool = False) -> None:
    """Make `out` the demo's folder before anything is trained: runs an earlier demo made there are
    removed (so `make demo` can run again); anything else that is in the way is an error (or, with
    `force`, removed too). Then mark the folder with what this demo makes."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; choose another --out")
    check_output_folder(out, "--out")  # never a system folder, a run's internals, or under a file
    if is_run(out):
        raise CLIError(f"--out {out} is a training run: the demo writes its runs into a folder of its own")
    made = _made_by_demo(out)
    names = [d.name for d in run_dirs] + ["report"]
    if made is None and out.is_dir() and any(out.iterdir()) and not force:
        raise CLIError(f"{out} already exists and was not made by vitmoe demo (no {MARKER} there); choose another "
                       f"--out, or pass --force to replace {', '.join(names)} in it")
    made = made or set()
    in_the_way = [out / n for n in names if (out / n).exists() and n not in made]
    if in_the_way and not force:
        raise CLIError(f"{', '.join(map(str, in_the_way))} {'is' if len(in_the_way) == 1 else 'are'} not from an "
                       f"earlier vitmoe demo; choose another --out, or pass --force to replace "
                       f"{'it' if len(in_the_way) == 1 else 'them'}")
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"made": sorted(made | set(names))}) + "\n")


def run(args: argparse.Namespace) -> int:
    from ..training import train

    budget = args.time_budget
    if budget is not None and budget <= 0:
        raise CLIError(f"--time-budget {budget}: must be a positive number of seconds")
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs {args.epochs}: must be >= 1")
    if budget is None and args.models is None and args.dataset != "digits" and recipe_path(args.dataset) is not None:
        return run_recipe(args)
    if args.threshold is None:
        args.threshold = 75.0
    available = _available_families()
    families = args.models or [m for m in (COMPARE_MODELS if budget is not None else MODELS) if m in available]
    missing = [m for m in families if m not in available]
    if missing:
        raise CLIError(f"model famil{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} need presets this "
                       f"vitmoe does not have (available: {', '.join(available)})")
    out = Path(args.out or ("compare_runs" if budget is not None else "demo_runs"))
    if budget is None:
        configs = [demo_config(m, args.dataset, out, args.epochs or 20, args.seed, args.device, args.data_dir,
                               args.threshold) for m in families]
    else:
        configs = [compare_config(m, args.dataset, out, budget, args.epochs or COMPARE_MAX_EPOCHS, args.seed,
                                  args.device, args.data_dir, args.threshold) for m in families]
    check_inputs(args.dataset, args.data_dir)
    claim_output(out, [Path(c.out) for c in configs], force=args.force)
    if budget is not None:
        echo(f"time-limited comparison on {args.dataset}: {len(configs)} families x {budget:g}s of training "
             f"(plus evaluation), at d {COMPARE_WIDTH['embed_dim']}, depth {COMPARE_WIDTH['depth']}")
    for family, cfg in zip(families, configs):
        echo(f"=== {family} ({cfg.model}) ===")
        train(cfg, log=echo)
    from .report import run as report_run

    code = report_run(argparse.Namespace(runs=[c.out for c in configs], out=str(out / "report"),
                                         threshold=args.threshold, force=True))  # claim_output made the folder ours
    if budget is not None:
        table = cost_table([c.out for c in configs], families)
        atomic_write_text(out / "report" / "cost.md",
                          f"Time-limited comparison on {args.dataset}: {budget:g}s of training per family.\n\n" + table)
        echo(f"\nWhat each family did with {budget:g}s of training ({args.dataset}):\n")
        echo(table)
        echo(f"wrote {out / 'report' / 'cost.md'}")
    return code


def run_recipe(args: argparse.Namespace) -> int:
    """The dataset's recipe model and its MoE variants, each for the recipe's training budget."""
    from ..training import train

    out = Path(args.out or "demo_runs")
    families, configs = recipe_configs(args.dataset, out, None, args.epochs, args.seed, args.device, args.data_dir,
                                       args.threshold)
    check_inputs(args.dataset, args.data_dir)
    claim_output(out, [Path(c.out) for c in configs], force=args.force)
    budget = configs[0].time_budget_s
    echo(f"recipe demo on {args.dataset} ({recipe_path(args.dataset)}): {', '.join(families)}"
         + (f", {budget:g}s of training each (plus evaluation)" if budget else ""))
    for family, cfg in zip(families, configs):
        echo(f"=== {family} ===")
        train(cfg, log=echo)
    from .report import run as report_run

    code = report_run(argparse.Namespace(runs=[c.out for c in configs], out=str(out / "report"),
                                         threshold=configs[0].threshold, force=True))
    table = cost_table([c.out for c in configs], families)
    atomic_write_text(out / "report" / "cost.md", f"The {args.dataset} recipe, per model.\n\n" + table)
    echo(f"\nWhat each model did with the recipe's budget ({args.dataset}):\n")
    echo(table)
    return code
