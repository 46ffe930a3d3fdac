"""`vitmoe train`: the source project's `vit.py` flags plus config files and overrides."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from .common import CLIError, HelpFormatter, echo, warn

DESCRIPTION = """\
Train a ViT / MoE-ViT. Accepts the source project's command lines as written, e.g.

  vitmoe train --batch 256 --experts 64 --epochs 500 --gpu 4 --dmodel 300 --out RUN
  vitmoe train --batch 256 --experts 64 --epochs 500 --gpu 4 --dmodel 300 --noswitch --out RUN

Like the source, the model is switch_vit (switch-routed MoE in every block) unless --noswitch
(dense vit; --experts is then ignored), and the dataset is CIFAR-10 unless --cifar100 or
--dataset is given. CIFAR is downloaded to --data-dir ($DATA, then ./data) when a network is
available; offline, use --dataset digits (bundled with scikit-learn) or fashion-mnist, or try
`vitmoe demo`. Your own images: --dataset folder:PATH (PATH/train/CLASS/*.jpg, optional test/ or
val/; decoded once at --img-size, default 32, into PATH/.vitmoe-cache/).

Settings are resolved as: TrainConfig defaults (the source recipe: Adam, lr 2.5e-4, weight decay
1e-4, cosine per step, batch 256, 350 epochs) < --config FILE < explicit flags < --set key=value.
--set takes any TrainConfig field (lr, weight_decay, optimizer, warmup_epochs, label_smoothing,
grad_clip, resume_schedule, augment_policy, norm_mean, norm_std, consistency_weight,
consistency_stopgrad, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, ema_decay,
merge_every, freeze_unrouted, time_budget_s, log_every, tensorboard, keep_checkpoints, ...) and model
fields as model.FIELD and MoE fields as model.moe.FIELD (e.g. --set model.depth=6
--set model.moe.capacity_factor_train=1.25); values are YAML. Recipes: configs/*.yaml (e.g. configs/pr_moe_lite6_cifar10.yaml, the ColossalAI ViT-MoE
Lite6 PR-MoE recipe).
The dataset sets img_size/in_chans/num_classes (--img-size N: the model sees NxN, batches resized on
the device); patch_size stays the preset's (4) when it divides
the image size (else the largest divisor below it).

Run directory (--out, default runs/MODEL-DATASET-TIME): config.yaml (resolved settings),
metrics.jsonl (one line per epoch), summary.json (updated every epoch), checkpoints/ (latest
and best, crash-safe). Continue a killed run with --resume RUN (only --epochs and execution
flags may change); --resume auto --out RUN continues RUN if it exists and starts it otherwise (the
same command line then serves a first start and every restart; torchrun --max-restarts K and
--max-restarts K with --gpu N restart failed workers that way). One process writes a run: it holds RUN/.vitmoe.lock while it trains, and a
second `vitmoe train` on the same directory (--out or --resume) fails at once naming its pid
(`vitmoe eval` and `vitmoe report` may read a running run). --out must be new, empty or a
vitmoe run; another folder is refused unless --force. Extending a finished run (--resume RUN --epochs N): by default the cosine is
recomputed over the new total, so the lr rises again; --set resume_schedule=restart instead gives
the added epochs a fresh warm-up and cosine.
"""


# The source project's spellings (vit.py), written by hand: they are not TrainConfig fields, or not
# by these names. Every TrainConfig field also gets its own flag, made from the field (see
# vitmoe.cli.options.add_field_flags): a new field is a flag without an edit here.
SOURCE_FLAG_FIELDS = {"nproc", "batch_size"}  # --gpu, --batch
FLAG_ALIASES = {"time_budget_s": ["--time-budget"], "dist_timeout_s": ["--dist-timeout"], "mixup_alpha": ["--mixup"],
                "cutmix_alpha": ["--cutmix"]}
"""Older spellings of generated flags, kept working."""
FLAG_METAVARS = {"time_budget_s": "S", "dist_timeout_s": "S", "mixup_alpha": "ALPHA", "cutmix_alpha": "ALPHA",
                 "ema_decay": "D", "merge_every": "N", "consistency_weight": "W", "img_size": "N", "ep_size": "K",
                 "init": "SRC", "out": "RUN_DIR", "folder_test_fraction": "F"}


def add_parser(sub) -> None:
    from ..models import list_models
    from ..moe import LAYER_ROUTERS
    from ..training.config.train_config import FIELD_CHOICES, TrainConfig
    from .options import add_field_flags

    p = sub.add_parser("train", help="train a model (the source project's vit.py flags)", description=DESCRIPTION,
                       formatter_class=HelpFormatter)
    src = p.add_argument_group("source project flags (vit.py)")
    src.add_argument("--gpu", type=int, default=None, metavar="N",
                     help="number of processes (GPUs) to train on; 1 trains in this process (field nproc; default 1)")
    src.add_argument("--experts", type=int, default=None, help="experts per MoE layer (model field num_experts; "
                     "switch_vit preset: 32); ignored with --noswitch")
    src.add_argument("--batch", type=int, default=None,
                     help="global (effective) batch size over all processes (field batch_size; default 256)")
    src.add_argument("--noswitch", action="store_true", default=None, help="train the dense ViT (model vit)")
    src.add_argument("--cifar100", action="store_true", default=None, help="use CIFAR-100 (same as --dataset cifar100)")
    src.add_argument("--dmodel", type=int, default=None, help="embedding width d_model (model field embed_dim; default 300)")
    src.add_argument("--heads", type=int, default=None, metavar="H",
                     help="attention heads (model field num_heads); must divide --dmodel (default: the preset's, "
                          "12 for vit/switch_vit; --dmodel alone keeps the preset's head width)")

    g = p.add_argument_group("model fields")
    g.add_argument("--router", choices=list(LAYER_ROUTERS), default=None,
                   help="router of the MoE layers (model field moe.router)")
    g.add_argument("--top-k", type=int, default=None,
                   help="experts per token for --router topk (model field moe.top_k)")

    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of TrainConfig fields (see configs/); a line `base: OTHER.yaml` starts from "
                        "another file (relative to this one), so the file lists only what it changes")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field after flags and config (repeatable); model fields as model.FIELD")
    g.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                   help="continue a run from its latest checkpoint with its saved config; 'auto': continue the "
                        "--out run if it exists (same configuration; epochs and execution settings may differ), "
                        "else start it, as an elastic restart does (torchrun --max-restarts, --max-restarts)")
    g.add_argument("--force", action="store_true",
                   help="train in an --out folder that is not empty and not a vitmoe run, adding the run's files "
                        "beside what is there; even then vitmoe never replaces a file it did not write (a "
                        "config.yaml, metrics.jsonl, summary.json, checkpoints/ or tensorboard/ already there is "
                        "refused). Without it such a folder is refused; the filesystem root always is")
    g.add_argument("--verbose", action="store_true",
                   help="multi-process runs: show the launcher's logging and the failed workers' tracebacks on "
                        "screen (a failure always writes them to RUN/launcher.log, named in the error line)")

    choices = {**FIELD_CHOICES, "model": list_models()}
    fields = add_field_flags(p, TrainConfig, skip={"model_config", *SOURCE_FLAG_FIELDS}, choices=choices,
                             aliases=FLAG_ALIASES, metavars=FLAG_METAVARS)
    p.set_defaults(func=run, field_flags=fields)


def flag_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig updates from the flags that were given explicitly."""
    from .options import field_overrides

    o: dict = field_overrides(args, [f for f in args.field_flags if f not in ("model", "dataset")])
    if args.noswitch:
        if args.model not in (None, "vit"):
            raise CLIError(f"--noswitch trains the dense vit; it conflicts with --model {args.model}")
        o["model"] = "vit"
    elif args.model is not None:
        o["model"] = args.model
    if args.cifar100:
        if args.dataset not in (None, "cifar100"):
            raise CLIError(f"--cifar100 conflicts with --dataset {args.dataset}")
        o["dataset"] = "cifar100"
    elif args.dataset is not None:
        o["dataset"] = args.dataset
    for flag, key in (("gpu", "nproc"), ("batch", "batch_size")):
        if getattr(args, flag) is not None:
            o[key] = getattr(args, flag)
    if args.dmodel is not None:
        o["model.embed_dim"] = args.dmodel
    if args.heads is not None:
        o["model.num_heads"] = args.heads
    if args.experts is not None and not args.noswitch:
        o["model.num_experts"] = args.experts
    if args.router is not None:
        o[moe_key("router")] = args.router
    if args.top_k is not None:
        o[moe_key("top_k")] = args.top_k
    return o


def moe_key(name: str) -> str:
    """The override key of an MoE setting: `model.moe.NAME` (MoE settings live in ViTConfig.moe)."""
    from ..models import ViTConfig

    return f"model.moe.{name}" if "moe" in ViTConfig.field_names() else f"model.{name}"


# A model much larger than this for its dataset is almost certainly an accident (the default is the
# source project's 242M-parameter switch_vit, sized for CIFAR): warn, naming the count and a fix.
LARGE_MODEL_PARAMS = {"digits": 5_000_000}
PARAMS_PER_TRAIN_IMAGE = 3_500
"""Other datasets whose training-split size is known before training (folders): more parameters than
this many per training image, and than the digits limit, is "far too large" (the digits limit over
its 1,437 training images; the small model the warning suggests stays under it)."""
SMALL_MODEL_FLAGS = "--dmodel 64 --heads 4 --set model.depth=4 --set model.mlp_hidden=128 --experts 8"


def size_warning(spec) -> str | None:
    """One line when the model is far too large for the dataset (e.g. the default switch_vit on 8x8
    digits, or on a folder of a few hundred images), computed from `vitmoe.models.model_info`; None
    otherwise (`spec`: the RunSpec)."""
    from ..models import model_info

    cfg, model_cfg, data = spec.config, spec.model, spec.dataset
    limit = LARGE_MODEL_PARAMS.get(cfg.dataset)
    if limit is None and data.train_images:
        limit = max(LARGE_MODEL_PARAMS["digits"], PARAMS_PER_TRAIN_IMAGE * data.train_images)
    if limit is None:
        return None
    info = model_info(model_cfg)
    if info.total_params <= limit:
        return None
    what = (f"the {data.img_size}x{data.img_size} {cfg.dataset} images" if cfg.dataset in LARGE_MODEL_PARAMS
            else f"{data.train_images:,} training images")
    flags = SMALL_MODEL_FLAGS if model_cfg.moe_block_indices() else SMALL_MODEL_FLAGS.rsplit(" --experts", 1)[0]
    # float32 weights + Adam's two moments: 12 bytes per parameter in every checkpoint
    return (f"model {cfg.model} has {info.total_params:,} parameters (~{info.total_params * 12 / 1e9:.1f} GB per "
            f"checkpoint), far more than {what} need; for a small model run `vitmoe demo` or add {flags}")


def _resume_hint(run_dir) -> str:
    """What Ctrl-C leaves: the newest checkpoint and the command that continues from it ('' when the
    run wrote none yet)."""
    from ..rundir.layout import all_epoch_dirs

    done = all_epoch_dirs(run_dir)
    if not done:
        return ""
    return (f"{run_dir} keeps its checkpoints up to {done[-1].name}; continue it with "
            f"`vitmoe train --resume {shlex.quote(str(run_dir))}`")


def build_config(args: argparse.Namespace):
    """The resolved, validated TrainConfig of a `vitmoe train` command line (no data is touched)."""
    from ..rundir import CONFIG_FILE
    from ..training.config import TrainConfig, parse_set

    from ..training.restart import AUTO

    flags = flag_overrides(args)
    sets = parse_set(args.set)
    if args.resume == AUTO and "out" not in flags:
        raise CLIError("--resume auto continues or starts the run in --out: give --out RUN_DIR (a run directory "
                       "named auto is --resume ./auto)")
    if args.resume and args.resume != AUTO:
        if args.init is not None:
            raise CLIError(f"--init cannot be combined with --resume: a resumed run continues from its own checkpoint "
                           f"(start a new run with --init {args.init} instead)")
        run_dir = Path(args.resume)
        saved_path = run_dir / CONFIG_FILE
        if not saved_path.is_file():
            raise CLIError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a vitmoe run directory)")
        saved = TrainConfig.from_yaml(saved_path).validate()
        cfg = saved
        if args.config:
            cfg = TrainConfig.from_yaml(args.config, cfg)
        if "out" in flags and Path(flags["out"]).resolve() != run_dir.resolve():
            raise CLIError("--out cannot be combined with --resume (the run continues in its own directory)")
        cfg = cfg.updated(flags).updated(sets).validate()
        changed = saved.structural_diff(cfg)
        if changed:
            raise CLIError(f"--resume {run_dir}: cannot change {', '.join(changed)} of an existing run "
                           f"(only epochs and execution settings such as amp, compile, device, log_every may change)")
        cfg.out = str(run_dir)
        return cfg
    cfg = TrainConfig()
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, cfg)
    cfg = cfg.updated(flags).updated(sets)
    if cfg.init is not None:  # SRC's shape, where the command line and config file leave it open
        from ..training.checkpoints.warm_start import adopt_architecture

        cfg = cfg.updated({"model_config": adopt_architecture(cfg.model_config, cfg.init)})
    cfg = cfg.validate()
    model_cfg = cfg.checked_model
    if not model_cfg.moe_block_indices():
        given = [f for f, v in (("--experts", args.experts if not args.noswitch else None), ("--router", args.router),
                                ("--top-k", args.top_k)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} apply to MoE models, but model {cfg.model!r} is dense "
                           f"(use --model switch_vit or random_vit)")
    if cfg.init is not None:  # SRC exists and fits the run's model, before any data is loaded
        from ..training.checkpoints.warm_start import check_init

        check_init(cfg.init, model_cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..rundir import SUMMARY_FILE
    from ..training.config.spec import resolve
    from ..training.launch import launch, run_worker, under_torchrun
    from ..training.restart import AUTO, check_restartable, holds_run

    cfg = build_config(args)
    if args.noswitch and args.experts is not None:
        warn(f"--experts {args.experts} is ignored with --noswitch (dense vit), as in the source project")
    if under_torchrun():
        check_restartable(cfg)  # before `resolve` names a default --out
    spec = resolve(cfg)  # once in this process (the model config validate() built is reused)
    if not args.resume and int(os.environ.get("RANK", 0)) == 0:
        msg = size_warning(spec)
        if msg:
            warn(msg)
    if under_torchrun():  # torchrun started this process as one worker: rank 0's run directory is used
        # "auto" (and every restart) is decided by rank 0 in the worker, after the ranks have met
        resume = AUTO if args.resume == AUTO else bool(args.resume)
        result = run_worker(spec.config, resume=resume, log=echo, force=args.force)
        if int(os.environ.get("RANK", 0)) == 0:
            s = result.summary
            echo(f"summary: {result.run_dir / SUMMARY_FILE} (best {s['best_acc']:.2f}% at epoch {s['best_epoch']})")
        return 0
    resume = holds_run(spec.config) if args.resume == AUTO else bool(args.resume)
    if args.resume == AUTO:
        echo(f"--resume auto: {'continuing' if resume else 'starting'} {spec.run_dir}")
    try:
        if cfg.nproc > 1 or cfg.max_restarts > 0:
            s = launch(spec.config, resume=resume, force=args.force, verbose=args.verbose)
            echo(f"summary: {spec.run_dir / SUMMARY_FILE} (best {s['best_acc']:.2f}% at epoch {s['best_epoch']})")
            return 0
        from ..training import train

        result = train(spec, resume=resume, log=echo, force=args.force)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_resume_hint(spec.run_dir)) from None
    s = result.summary
    echo(f"summary: {result.run_dir / SUMMARY_FILE} (best {s['best_acc']:.2f}% at epoch {s['best_epoch']})")
    return 0
