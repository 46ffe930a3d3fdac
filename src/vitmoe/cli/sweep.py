"""`vitmoe sweep`: a grid of training runs x seeds, as ordinary run directories, then mean ± CI.

Every member is a `vitmoe train` process (its own memory and allocator; a crash ends only that
member) writing OUT/<cell>/seed-<s>. OUT/sweep.json records the plan, so running the same
command again resumes: finished members are skipped, killed ones continue from their last
checkpoint (`--resume`), unstarted ones start. Every member's configuration is checked before
the first one trains.

`--launcher slurm` trains the members on a cluster instead: one SLURM job array, a task per
unfinished member running `vitmoe sweep ... --member I` (vitmoe.cli.slurm), submitted at once;
`--collect` (or the same command once every member is done) then reports exactly as the local
sweep does. Submitting again skips finished members and those still queued or running.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ..validation import boolean_word, show
from .common import CLIError, HelpFormatter, echo, warn
from .options import add_data_dir_option, add_dataset_option

PLAN_FILE = "sweep.json"
OWNED = ("seed", "out")
"""Fields the sweep sets for each member (seed 0..N-1, OUT/<cell>/seed-<s>): a --set or --grid of them
would make members identical (a CI of 0 over N copies of one run) or send them outside the sweep."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="a grid of runs x seeds, with mean ± 95%% CI", formatter_class=HelpFormatter,
        description="Train every combination of the --grid values with --seeds seeds each (ordinary run "
                    "directories OUT/<cell>/seed-<s>), then print and write OUT/sweep.md, sweep.json and "
                    "sweep.png: mean ± 95% confidence interval of best and final accuracy, epochs to the "
                    "threshold, training and inference time, and parameters; differences within the "
                    "seed-to-seed noise are said to be. Running the same command again resumes a killed sweep.",
        epilog="Example (the source presentation's experts study):\n  vitmoe sweep --config configs/studies/"
               "fashion_mnist.yaml --set model=random_vit --grid model.num_experts=1,4,8 --seeds 3 --out studies/experts")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept field, spelled as for --set (model, batch_size, model.num_experts, "
                        "model.moe.router, ...); repeatable: the grid is their product")
    p.add_argument("--seeds", type=int, default=3, help="seeds per grid cell (0, 1, ..., N-1; default 3)")
    p.add_argument("--config", default=None, help="base YAML config of every member")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override of every member")
    p.add_argument("--epochs", type=int, default=None, help="epochs per member")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="training seconds per member")
    add_dataset_option(p, help="dataset of every member")
    add_data_dir_option(p, help="dataset directory")
    p.add_argument("--vs-dense", action="store_true",
                   help="also train each MoE cell's dense twin (no MoE layers, the MLP width of equal forward FLOPs "
                        "per image; `vitmoe info --dense-twin`) with the same seeds, and compare each MoE cell with it "
                        "at equal epochs and at equal training time")
    p.add_argument("--member", type=int, default=None, metavar="I",
                   help="train only member I (0-based, in the order --dry-run lists them) and report nothing: "
                        "one member per job of a scheduler or a queue; the same command without --member "
                        "then trains what is left and reports")
    p.add_argument("--dry-run", action="store_true", help="check every member and print the plan; train nothing")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local (default): train the members here, one after another; slurm: submit the unfinished "
                        "members as one SLURM job array (sbatch --array, a task per member, OUT/logs/ per member) and "
                        "return at once; report with --collect")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: report the members that have finished (the same table and statistics as "
                        "the local sweep) and name those that have not")
    from .slurm import add_slurm_options

    add_slurm_options(p)
    p.set_defaults(func=run)


def _field(key: str) -> str:
    """A key as TrainConfig.updated reads it (dashes are underscores)."""
    return key.strip().replace("-", "_")


def _boolean_key(key: str) -> bool:
    """Whether a grid key names a true/false field (of TrainConfig, the model's ViTConfig or its
    MoEConfig), whose values yes/no/on/off the field reads as true/false."""
    import dataclasses

    from ..models import ViTConfig
    from ..moe import MoEConfig
    from ..training.config import TrainConfig

    key = _field(key)
    for prefix, cls in (("model.moe.", MoEConfig), ("model_config.moe.", MoEConfig), ("model.", ViTConfig),
                        ("model_config.", ViTConfig), ("", TrainConfig)):
        if key.startswith(prefix):
            name = key[len(prefix):]
            return any(f.name == name and f.type in ("bool", bool) for f in dataclasses.fields(cls))
    return False


def canonical(text: str, where: str, boolean: bool = False) -> str:
    """A grid value as one spelling of the value the member's config will hold: YAML-parsed (as --set
    parses it), a number written as text (1e-3, which YAML 1.1 reads as a string) made the number, then
    written back as YAML flow text that parses to the same value ('0.001', "'yes'" for the string yes).
    Values that differ only in spelling or quoting (4 and 4.0, 1e-3 and 0.001, topk and 'topk') get one
    canonical text, so they are one member, never two directories holding the same run. `boolean`:
    the key is a true/false field, so yes/on and no/off are true and false."""
    import yaml

    from ..readers import yaml_value

    try:
        value = yaml_value(text, where)
    except ValueError as e:  # PathError: aliases past the bound
        raise CLIError(str(e)) from None
    if boolean:  # yes and true are one value of a true/false field (YAML 1.2 reads only true/false)
        value = boolean_word(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            value = number
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """{key: [canonical values]} of the --grid flags; a repeated value (in any spelling), a repeated key
    or a field the sweep owns (OWNED) is a CLIError."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise CLIError(f"--grid {show(item)}: write KEY=V1,V2,... (e.g. --grid model.num_experts=1,4,8)")
        if _field(key) in OWNED:
            raise CLIError(f"--grid {key}: the sweep sets {key} itself (seeds 0..N-1 with --seeds N, members in "
                           "OUT/<cell>/seed-<s>); sweep other fields")
        if key in grid:
            raise CLIError(f"--grid {key} is given twice: list all its values in one --grid")
        canon = [canonical(v, f"--grid {key}", _boolean_key(key)) for v in vals]
        seen: dict[str, str] = {}
        for raw, c in zip(vals, canon):
            if c in seen:
                raise CLIError(f"--grid {key}: values {show(seen[c])} and {show(raw)} are the same value ({c}): "
                               "list each value once")
            seen[c] = raw
        grid[key] = canon
    return grid


def cell_name(cell: dict[str, str]) -> str:
    """The member folder of a grid cell: its key=value pairs, with characters a file name should not
    hold replaced; then a short hash of the exact text is added, so two cells never share a folder."""
    import hashlib

    text = "_".join(f"{k}={v}" for k, v in cell.items()) or "base"
    name = re.sub(r"[^A-Za-z0-9._=,-]+", "-", text)[:120]
    if name != text:
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name


def member_argv(args: argparse.Namespace, cell: dict[str, str], seed: int, out: Path) -> list[str]:
    argv = []
    if args.config:
        argv += ["--config", args.config]
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir), ("--epochs", args.epochs),
                        ("--time-budget", args.time_budget)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    for key, value in cell.items():
        argv += ["--model", value] if key == "model" else ["--set", f"{key}={value}"]
    return argv + ["--seed", str(seed), "--out", str(out)]


def plan(args: argparse.Namespace) -> tuple[dict, list[tuple[dict[str, str], int, Path]]]:
    if args.seeds < 1:
        raise CLIError(f"--seeds {args.seeds}: must be at least 1")
    if args.epochs is None and args.time_budget is None and args.config is None:
        raise CLIError("give --epochs or --time-budget (or a --config that sets epochs): a member would train "
                       "for the default 350 epochs")
    from ..training.config import parse_set

    owned = sorted({_field(k) for k in parse_set(args.set)} & set(OWNED))
    if owned:
        raise CLIError(f"--set {owned[0]}=...: the sweep sets {owned[0]} itself (seeds 0..N-1 with --seeds N, members "
                       "in OUT/<cell>/seed-<s>); a fixed one would make every seed the same run")
    grid = parse_grid(args.grid)
    root = Path(args.out)
    cells = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if args.vs_dense:
        args.twins = dense_twin_cells(args, cells)
        cells += [t for t in _unique(args.twins.values()) if t not in cells]
    members = [(cell, seed, root / cell_name(cell) / f"seed-{seed}") for cell in cells for seed in range(args.seeds)]
    recorded = {"grid": grid, "seeds": args.seeds, "config": args.config, "set": args.set, "epochs": args.epochs,
                "time_budget": args.time_budget, "dataset": args.dataset}
    if args.vs_dense:
        recorded["vs_dense"] = True
    return recorded, members


def _unique(cells) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for cell in cells:
        if cell not in out:
            out.append(cell)
    return out


MOE_ONLY = ("model.num_experts", "model.moe.", "model_config.num_experts", "model_config.moe.")
"""Grid keys that say nothing about a model without MoE layers: a twin drops them, so MoE cells that
differ only there (expert count, router, k=1 options) share one twin."""


def dense_twin_cells(args: argparse.Namespace, cells: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Each MoE cell's dense twin cell, by the MoE cell's label: the cell with the twin's overrides
    (`vitmoe.models.twin_overrides`) and without its MoE-only keys."""
    from ..models import twin_overrides
    from ..report.sweep import _label
    from ..training.config import MOE_ONLY_FIELDS, TrainConfig, load_config

    twins = {}
    for cell in cells:
        try:
            cfg = load_config(args.config, member_overrides(args, cell, 0, Path(args.out))).validate()
        except Exception as e:  # ConfigError: name the member, keep the message
            raise CLIError(f"sweep member {cell_name(cell)}: {e}") from None
        model = cfg.checked_model
        if not model.is_moe:
            continue
        twin = {k: v for k, v in cell.items() if not k.startswith(MOE_ONLY) and _field(k) not in MOE_ONLY_FIELDS}
        twin.update({k: str(v) for k, v in twin_overrides(model).items()})
        # An MoE-only setting (merge_every, ...) has nothing to act on in the twin, and a dense model
        # refuses some: the twin takes the field's default wherever the grid, --set or the config
        # set it, spelled as a grid value is, so MoE cells that differ only there share one twin.
        swept = {_field(k) for k in cell}
        twin.update({k: canonical(json.dumps(getattr(TrainConfig, k)), k) for k in MOE_ONLY_FIELDS
                     if k in swept or getattr(cfg, k) != getattr(TrainConfig, k)})
        twins[_label(cell)] = twin
    return twins


def plan_argv(args: argparse.Namespace) -> list[str]:
    """The flags that define the sweep's plan (`plan`), as a command line: what a job running one of
    its members (`--member I`) is given, so it finds the same plan."""
    argv = ["--out", str(args.out), "--seeds", str(args.seeds)]
    for item in args.grid:
        argv += ["--grid", item]
    for flag, value in (("--config", args.config), ("--epochs", args.epochs), ("--time-budget", args.time_budget),
                        ("--dataset", args.dataset), ("--data-dir", args.data_dir)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv + (["--vs-dense"] if args.vs_dense else [])


def member_overrides(args: argparse.Namespace, cell: dict[str, str], seed: int, out: Path) -> dict:
    """The TrainConfig overrides of one member, applied to --config (what `member_argv` spells as flags)."""
    from ..training.config import parse_set

    o: dict = {}
    for key, value in (("dataset", args.dataset), ("data_dir", args.data_dir), ("epochs", args.epochs),
                       ("time_budget_s", args.time_budget)):
        if value is not None:
            o[key] = value
    o.update(parse_set(args.set))
    o.update(parse_set([f"{key}={value}" for key, value in cell.items()]))
    return {**o, "seed": seed, "out": str(out)}


def _check_members(args, members) -> list:
    """Build and check every member's TrainConfig (no data touched): bad input fails before any training.
    Returns the checked configs."""
    from ..training.checkpoints.warm_start import adopt_architecture, check_init
    from ..training.config import load_config

    checked = []
    for cell, seed, out in members:
        try:
            cfg = load_config(args.config, member_overrides(args, cell, seed, out))
            if cfg.init is not None:  # as `vitmoe train --init`: SRC's shape where the member leaves it open
                cfg = cfg.updated({"model_config": adopt_architecture(cfg.model_config, cfg.init)})
            cfg = cfg.validate()
            if cfg.init is not None:
                check_init(cfg.init, cfg.checked_model)
        except Exception as e:  # ConfigError: name the member, keep the message
            raise CLIError(f"sweep member {cell_name(cell)}: {e}") from None
        checked.append(cfg)
    return checked


def finished(out: Path) -> bool:
    """Whether a member ran to its end: its summary says it used its epochs or its time budget
    (the trainer rewrites summary.json after every epoch, so a killed run has one too)."""
    from ..readers import load_json

    try:
        s = load_json(out / "summary.json", "summary")
        return bool(s.get("stopped_by_budget")) or int(s["epochs"]) >= int(s["epochs_planned"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # PathError (a ValueError) included
        return False


def run(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder
    from ..readers import load_json
    from ..report.sweep import SWEEP_FILES
    from ..rundir import LOCK_FILE, RunLock, has_checkpoint, is_run_dir

    recorded, members = plan(args)
    root = Path(args.out)
    check_output_folder(root, "--out")
    if is_run_dir(root) or has_checkpoint(root):
        raise CLIError(f"--out {root} is a training run: a sweep writes its members into a folder of its own")
    saved = root / PLAN_FILE
    if saved.is_file():
        try:
            previous = load_json(saved, "sweep plan")
        except (OSError, ValueError) as e:
            raise CLIError(f"{saved} is unreadable ({e}): choose another --out") from None
        if previous != recorded:
            raise CLIError(f"{root} holds another sweep ({PLAN_FILE} differs from this command): choose another --out")
    elif root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
        raise CLIError(f"--out {root} is not empty and not a sweep: choose another folder")
    if args.member is not None and not 0 <= args.member < len(members):
        raise CLIError(f"--member {args.member}: the sweep has members 0 to {len(members) - 1}")
    if args.member is not None and (args.launcher != "local" or args.collect):
        raise CLIError(f"--member {args.member} trains one member here: it cannot be combined with "
                       f"{'--collect' if args.collect else '--launcher ' + args.launcher}")
    if args.launcher == "slurm":
        from .slurm import check_slurm_options

        check_slurm_options(args)
    if args.collect and not saved.is_file():
        raise CLIError(f"--collect: {root} holds no sweep ({PLAN_FILE} is missing); start it first")
    for name in (PLAN_FILE, *SWEEP_FILES):  # the sweep's own files: rewritten on every resume, never a link or device
        check_output_folder(root, "--out", names=[name], force=True)
    configs = _check_members(args, members)
    if args.dry_run:
        for cell, seed, out in members:
            echo(f"{out}: vitmoe train {' '.join(member_argv(args, cell, seed, out))}")
        return 0
    # One whole sweep per folder: a second one fails here, naming the first's pid. Jobs of one member each
    # (--member, the tasks of a SLURM array) run side by side by design; each member's own run lock keeps
    # two off one member.
    lock = RunLock(root).acquire() if args.member is None else None
    try:
        if args.collect:
            return _collect(args, recorded, members, root)
        return _run_members(args, root, saved, recorded, members, configs)
    finally:
        if lock is not None:
            lock.release()


def _run_members(args, root: Path, saved: Path, recorded: dict, members, configs) -> int:
    from ..fileio import atomic_write_bytes, check_write_target, open_append

    atomic_write_bytes(saved, json.dumps(recorded, indent=2).encode())
    if args.launcher == "slurm":
        return _submit(args, recorded, members, root, max(c.nproc for c in configs))
    failed = []
    for i, (cell, seed, out) in enumerate(members, 1):
        if args.member is not None and i - 1 != args.member:
            continue
        tag = f"[{i}/{len(members)}] {cell_name(cell)} seed {seed}"
        if finished(out):
            echo(f"{tag}: finished earlier, skipped")
            continue
        resume = (out / "checkpoints" / "latest").is_file()
        argv = ["--resume", str(out)] if resume else [*member_argv(args, cell, seed, out), "--force"]
        echo(f"{tag}: {'resuming' if resume else 'training'}")
        log = root / "logs" / f"{cell_name(cell)}-seed-{seed}.log"
        check_write_target(log).parent.mkdir(exist_ok=True)
        with open_append(log, binary=True) as fh:  # a regular file: never a FIFO or a link planted there
            code = subprocess.call([sys.executable, "-m", "vitmoe", "train", *argv], stdout=fh, stderr=subprocess.STDOUT)
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            warn(f"{tag}: exit status {code}: {tail[0]} (log: {log})")
            failed.append(tag)
            if code == 2:  # bad input (or a member folder in use): every member would fail alike
                lines = log.read_text(errors="replace").splitlines()
                why = next((ln for ln in reversed(lines) if ln.startswith("vitmoe: error: ")), tail[0])
                raise CLIError(f"sweep stopped: {tag} failed: {why.removeprefix('vitmoe: error: ')} (log: {log})")
    if args.member is None:
        _report(args, recorded, members, root)
    if failed:
        raise CLIError(f"{len(failed)} of {len(members)} members failed ({', '.join(failed)}); run the same "
                       "command again to retry them")
    return 0


def _report(args: argparse.Namespace, recorded: dict, members, root: Path) -> int:
    """The sweep's table, plot and JSON over its finished members; returns how many those are."""
    from ..report import load_run
    from ..report.sweep import sweep_results

    done = [(cell, load_run(out)) for cell, _, out in members if finished(out)]
    if done:
        text, files = sweep_results(done, list(recorded["grid"]), root, getattr(args, "twins", None))
        echo(text)
        echo(f"written: {', '.join(str(f) for f in files)}")
    return len(done)


def _collect(args: argparse.Namespace, recorded: dict, members, root: Path) -> int:
    """--collect: report the finished members, name the others (queued ones when SLURM can say)."""
    import shutil

    unfinished = [(i, cell, seed) for i, (cell, seed, out) in enumerate(members) if not finished(out)]
    if len(unfinished) == len(members):
        raise CLIError(f"--collect: no member of the sweep in {root} has finished yet (logs: {root / 'logs'})")
    if unfinished:
        queued: set[int] = set()
        if shutil.which("squeue"):
            from .slurm import queued_members

            try:
                queued = queued_members(root)
            except CLIError:
                pass
        names = [f"{i} ({cell_name(cell)} seed {seed}{', queued or running' if i in queued else ''})"
                 for i, cell, seed in unfinished]
        warn(f"{len(unfinished)} of {len(members)} members have not finished: {', '.join(names)}; the table holds "
             f"the {len(members) - len(unfinished)} that have (logs: {root / 'logs'})")
    _report(args, recorded, members, root)
    return 0


def _submit(args: argparse.Namespace, recorded: dict, members, root: Path, nproc: int) -> int:
    """--launcher slurm: the unfinished members not already queued, as one job array (vitmoe.cli.slurm)."""
    from . import slurm

    todo = [i for i, (_, _, out) in enumerate(members) if not finished(out)]
    if not todo:
        echo(f"all {len(members)} members have finished")
        _report(args, recorded, members, root)
        return 0
    queued = slurm.queued_members(root)
    fresh = [i for i in todo if i not in queued]
    collect = "vitmoe sweep " + " ".join(shlex.quote(a) for a in plan_argv(args)) + " --collect"
    if not fresh:
        echo(f"the {len(todo)} unfinished members are queued or running already; when they are done: {collect}")
        return 0
    command = [sys.executable, "-m", "vitmoe", "sweep", *plan_argv(args), "--member"]
    job = slurm.submit(args, root, command, fresh, args.slurm_cpus or nproc)
    skipped = len(members) - len(fresh)
    echo(f"submitted SLURM job array {job}: members {', '.join(map(str, fresh))} of {len(members)}"
         + (f" ({skipped} finished or queued, skipped)" if skipped else "")
         + f"; logs in {root / 'logs'}; when they are done: {collect}")
    return 0
