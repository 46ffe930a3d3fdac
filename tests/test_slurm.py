"""SLURM for real: README's sbatch script and `vitmoe sweep --launcher slurm` on a single-node
cluster (real munged, slurmctld and slurmd; tests/slurm_utils.py starts them, or the tests skip
saying why)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port
from slurm_utils import job_env, job_state, require_cluster, wait_job, wait_until
from test_readme import README
from vitmoe.cli.sweep import finished

pytestmark = pytest.mark.slow

TINY = ("--set model.embed_dim=16 --set model.depth=1 --set model.num_heads=2 --set model.mlp_hidden=16 "
        "--set model.head=linear --set log_every=0 --set progress=false")


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


def _readme_sbatch_script() -> str:
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M) if "#SBATCH" in b]
    assert len(blocks) == 1, "README should hold one sbatch script"
    return blocks[0]


def test_readme_sbatch_script_runs_as_written(cluster, tmp_path):
    # Cheap form: one node with 2 tasks of one CPU (one torchrun each, one process per torchrun) and a
    # tiny model for one epoch; every srun/torchrun flag and the rest of the script as written.
    script = _readme_sbatch_script()
    swaps = {"#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=4": "#SBATCH --nodes=1 --ntasks=2 --cpus-per-task=1",
             "--nproc_per_node=4": "--nproc_per_node=1", ":29500": f":{free_port()}",
             "--config configs/vit_cifar10.yaml": f"--dataset digits --model vit --epochs 1 --batch 64 {TINY}"}
    for old, new in swaps.items():
        assert old in script, f"README's sbatch script changed ({old!r} is gone)"
        script = script.replace(old, new)
    (tmp_path / "job.sh").write_text(script)
    t0 = time.monotonic()
    done = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/job.out",
                           str(tmp_path / "job.sh")], capture_output=True, text=True, env=job_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    state = wait_job(job, 600)
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED 0:0", f"{state}\n{output[-3000:]}"
    run = tmp_path / "runs" / f"vit-{job}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1, summary
    assert "--resume auto: " not in output  # under torchrun rank 0 decides, after the ranks have met
    print(f"README sbatch script: job {job} ({job_state(job)}) in {time.monotonic() - t0:.1f}s")


def _sweep(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "vitmoe", "sweep", "--out", str(out), "--grid", "model.num_experts=2,4", "--seeds", "1",
            "--dataset", "digits", "--epochs", "1", *TINY.split(), "--set", "model=switch_vit", *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=job_env(), timeout=300, cwd=out.parent)


def test_sweep_members_run_as_a_job_array_and_collect_like_the_local_sweep(cluster, tmp_path):
    out = tmp_path / "sw"
    members = [out / "model.num_experts=2" / "seed-0", out / "model.num_experts=4" / "seed-0"]
    t0 = time.monotonic()
    sub = _sweep(out, "--launcher", "slurm", "--slurm-cpus", "1", "--slurm-time", "10:00")
    took = time.monotonic() - t0
    assert sub.returncode == 0, sub.stderr[-3000:]
    m = re.search(r"submitted SLURM job array (\d+): members 0, 1 of 2; logs in ", sub.stdout)
    assert m, sub.stdout
    assert "--collect" in sub.stdout
    # It returned at once: the members had not even started to train.
    assert not any(finished(r) for r in members) and took < 60, took
    script = next((out / "slurm").glob("array-*.sbatch")).read_text()
    assert "#SBATCH --array=0,1" in script and "#SBATCH --cpus-per-task=1" in script and "#SBATCH --time=10:00" in script

    # Submitting again while they are queued or running submits nothing.
    again = _sweep(out, "--launcher", "slurm")
    assert again.returncode == 0 and "queued or running already" in again.stdout, again.stdout + again.stderr

    wait_until(lambda: all(finished(r) for r in members), 300, "the array's members did not finish")
    wait_until(lambda: not subprocess.run(["squeue", "--noheader", "--jobs", m.group(1)], capture_output=True,
                                          text=True).stdout.strip(), 60, "the array did not leave the queue")
    for i, r in enumerate(members):  # a log per member: SLURM's and the member's training log
        assert (out / "logs" / f"slurm-{m.group(1)}_{i}.out").is_file()
    assert {p.name for p in (out / "logs").glob("*.log")} == {"model.num_experts=2-seed-0.log",
                                                              "model.num_experts=4-seed-0.log"}

    collected = _sweep(out, "--collect")
    assert collected.returncode == 0, collected.stderr
    table = json.loads((out / "sweep_results.json").read_text())
    # The local sweep's command on the same folder (every member done: it only reports) gives the same.
    local = _sweep(out)
    assert local.returncode == 0 and local.stdout.count("finished earlier, skipped") == 2, local.stdout
    assert json.loads((out / "sweep_results.json").read_text()) == table
    assert [r["cell"] for r in table] == [{"model.num_experts": "2"}, {"model.num_experts": "4"}]
    assert collected.stdout.split("written:")[0] == local.stdout.split("finished earlier, skipped\n")[-1].split("written:")[0]

    # Everything finished: submitting again reports instead of submitting.
    done = _sweep(out, "--launcher", "slurm")
    assert done.returncode == 0 and "all 2 members have finished" in done.stdout and "written:" in done.stdout
    assert len(list((out / "slurm").glob("array-*.sbatch"))) == 1

    # A member killed before its end (its summary from before its last epoch) is the only one submitted again.
    killed = members[1] / "summary.json"
    killed.write_text(json.dumps(dict(json.loads(killed.read_text()), epochs=0)))
    partial = _sweep(out, "--collect")
    assert partial.returncode == 0 and "1 of 2 members have not finished: 1 (model.num_experts=4 seed 0)" in partial.stderr
    resub = _sweep(out, "--launcher", "slurm")
    m = re.search(r"submitted SLURM job array (\d+): members 1 of 2 \(1 finished or queued, skipped\)", resub.stdout)
    assert m, resub.stdout + resub.stderr
    subprocess.run(["scancel", m.group(1)], check=True)  # seen what was submitted: no need to train it again
    script = sorted((out / "slurm").glob("array-*.sbatch"))[-1].read_text()
    assert "#SBATCH --array=1\n" in script and '--member "$SLURM_ARRAY_TASK_ID"' in script
