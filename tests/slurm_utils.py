"""A single-node SLURM cluster for the tests: the one running here, or one `.ci/slurm-up` starts
(root only; .ci/run installs slurm-wlm and munge first). When neither works, the tests skip with the
script's own reason."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_UP = ROOT / ".ci" / "slurm-up"


def require_cluster() -> None:
    """Return when `sinfo` shows a usable node; start one with .ci/slurm-up if needed; else skip."""
    done = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"no SLURM cluster: {reason}")
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%N"], capture_output=True, text=True).stdout.split()
    if nodes != [socket.gethostname().split(".")[0]]:
        pytest.skip(f"the SLURM cluster here runs jobs on {', '.join(nodes) or 'no node'}, not only on this machine: "
                    "they could not see the tests' temporary folders")


def job_env() -> dict[str, str]:
    """The environment jobs are submitted with (sbatch exports it): this Python's bin folder first on
    PATH (torchrun, vitmoe), and the vitmoe being tested importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    import vitmoe

    src = str(Path(vitmoe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def job_state(job: str) -> str:
    """A finished job's state and exit code as `sacct` is not configured here: from scontrol (kept for
    MinJobAge, 300 s by default), e.g. 'COMPLETED 0:0'."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return f"{fields.get('JobState', '?')} {fields.get('ExitCode', '?')}"


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE")


def wait_job(job: str, timeout_s: float) -> str:
    """Poll until the job ends (sbatch --wait polls with back-off up to half a minute); its state."""
    wait_until(lambda: job_state(job).split()[0] in FINAL_STATES, timeout_s, f"job {job} did not end")
    return job_state(job)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout if shutil.which("squeue") else ""
            raise AssertionError(f"{what} within {timeout_s:.0f}s; squeue:\n{queue}")
        time.sleep(0.5)
