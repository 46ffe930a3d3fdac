"""SLURM job arrays: `vitmoe sweep --launcher slurm` submits its members as one array.

One array task per unfinished member, its task id the member's index, running `vitmoe sweep ...
--member $SLURM_ARRAY_TASK_ID` (the member trains exactly as the local sweep trains it, in its own
`vitmoe train` process, logging to OUT/logs/<cell>-seed-<s>.log). The batch script is written to
OUT/slurm/ (it can be read and resubmitted by hand), SLURM's own output of each task goes to
OUT/logs/slurm-<job>_<task>.out, and `sbatch` returns at once.

Resources per member: --slurm-cpus (default: the largest nproc of the members, each process one
CPU), --slurm-mem, --slurm-gpus, --slurm-time, --slurm-partition, --slurm-max-running, and any other
sbatch option as --slurm-arg=--account=ABC (repeatable); sbatch's own SBATCH_* environment
variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, ...) apply as usual.

The array's job name is derived from the sweep folder, so `queued_members` finds the tasks of this
sweep still pending or running (`squeue`) and a resubmission leaves them alone. Nothing here knows
what a sweep is: the sweep command passes the member command and indices.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from .common import CLIError

SCRIPT_DIR = "slurm"


def add_slurm_options(p) -> None:
    g = p.add_argument_group("SLURM (--launcher slurm: each member one task of a job array)")
    g.add_argument("--slurm-cpus", type=int, default=None, metavar="N",
                   help="CPUs per member (sbatch --cpus-per-task; default: the members' largest nproc)")
    g.add_argument("--slurm-mem", default=None, metavar="MEM", help="memory per member (sbatch --mem, e.g. 8G)")
    g.add_argument("--slurm-gpus", type=int, default=None, metavar="N", help="GPUs per member (sbatch --gpus)")
    g.add_argument("--slurm-time", default=None, metavar="TIME",
                   help="time limit per member (sbatch --time, e.g. 2:00:00; a member killed at the limit "
                        "resumes from its checkpoint when the sweep is submitted again)")
    g.add_argument("--slurm-partition", default=None, metavar="P", help="partition (sbatch --partition)")
    g.add_argument("--slurm-max-running", type=int, default=None, metavar="N",
                   help="members running at once (sbatch --array=...%%N)")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, written as --slurm-arg=--account=ABC (repeatable)")


def check_slurm_options(args: argparse.Namespace) -> None:
    """One-line errors for bad values, before anything is submitted."""
    for flag, value in (("--slurm-cpus", args.slurm_cpus), ("--slurm-gpus", args.slurm_gpus),
                        ("--slurm-max-running", args.slurm_max_running)):
        if value is not None and value < (0 if flag == "--slurm-gpus" else 1):
            raise CLIError(f"{flag} {value}: must be at least {0 if flag == '--slurm-gpus' else 1}")
    for flag, value in (("--slurm-mem", args.slurm_mem), ("--slurm-time", args.slurm_time),
                        ("--slurm-partition", args.slurm_partition), *(("--slurm-arg", a) for a in args.slurm_arg)):
        if value is not None and (not value.strip() or any(c in value for c in "\n\r\0")):
            raise CLIError(f"{flag} {value!r}: give one non-empty value on one line")
    for a in args.slurm_arg:
        if not a.startswith("-"):
            raise CLIError(f"--slurm-arg {a!r}: give an sbatch option, e.g. --slurm-arg=--account=ABC")
        if re.match(r"--?(a|array|o|output|e|error|J|job-name|parsable)(=|$)", a):
            raise CLIError(f"--slurm-arg {a}: the sweep sets this option itself (array, output, job name)")


def job_name(root: Path) -> str:
    """The array's name: the same for every submission of one sweep folder, unlike any other's."""
    return "vitmoe-sweep-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CLIError(f"--launcher slurm: {name} is not on PATH (run the sweep on a SLURM login node, or use "
                       "--launcher local)")
    return path


def queued_members(root: Path) -> set[int]:
    """Members of the sweep in `root` whose array task is pending or running."""
    done = subprocess.run([_tool("squeue"), "--noheader", "--array", "--format=%i %j"], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise CLIError(f"--launcher slurm: squeue failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    name, found = job_name(root), set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == name and (m := re.fullmatch(r"\d+_(\d+)", parts[0])):
            found.add(int(m.group(1)))
    return found


def batch_script(args: argparse.Namespace, root: Path, command: list[str], indices: list[int], cpus: int) -> str:
    """The sbatch script of one array over `indices` running `command` (its last item the task id)."""
    array = ",".join(map(str, indices)) + (f"%{args.slurm_max_running}" if args.slurm_max_running else "")
    options = [f"--job-name={job_name(root)}", f"--array={array}", f"--cpus-per-task={cpus}",
               f"--output={(root / 'logs').resolve()}/slurm-%A_%a.out", f"--chdir={os.getcwd()}"]
    for flag, value in (("--mem", args.slurm_mem), ("--gpus", args.slurm_gpus), ("--time", args.slurm_time),
                        ("--partition", args.slurm_partition)):
        if value is not None:
            options.append(f"{flag}={value}")
    options += args.slurm_arg
    lines = ["#!/bin/bash", f"# vitmoe sweep {root}: members {', '.join(map(str, indices))}, one per array task"]
    lines += [f"#SBATCH {o}" for o in options]
    lines.append("exec " + " ".join(shlex.quote(c) for c in command) + ' "$SLURM_ARRAY_TASK_ID"')
    return "\n".join(lines) + "\n"


def submit(args: argparse.Namespace, root: Path, command: list[str], indices: list[int], cpus: int) -> str:
    """Write the batch script under root/slurm/ and submit it; returns the job id (sbatch returns at once)."""
    from ..fileio import atomic_write_text

    sbatch = _tool("sbatch")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    script = root / SCRIPT_DIR / f"array-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    atomic_write_text(script, batch_script(args, root, command, indices, cpus))
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise CLIError(f"--launcher slurm: sbatch refused {script}: "
                       f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return done.stdout.strip().split(";")[0]
