"""Data-parallel and expert-parallel training on gloo CPU processes against one process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitmoe.training.config import resolve
import torch
from dist_utils import run_workers
from safetensors.torch import load_file

from vitmoe.data import ImageData, load_dataset
from vitmoe.training.config import TrainConfig
from vitmoe.training.distributed.context import DistContext
from vitmoe.training.loop.trainer import Trainer

# Auxiliary losses are computed over each rank's own tokens (per device, as in Switch/GShard),
# which is not the loss of the global batch; without them one step is the same computation.
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_hidden": 24, "head_hidden": 16,
        "balance_loss_weight": 0.0, "z_loss_weight": 0.0}
CASES = {
    "vit": dict(model="vit"),
    "switch": dict(model="switch_vit", model_config={"num_experts": 4}),
    "topk-capacity-ep2": dict(model="switch_vit", ep_size=2,
                              model_config={"num_experts": 4, "router": "topk", "top_k": 2,
                                            "capacity_factor_train": 1.5, "expert_init": "independent"}),
    "random-ep2": dict(model="random_vit", ep_size=2, model_config={"num_experts": 4}),
}


def _data():
    # 63 images, batch 32: the second global batch (31) splits 16/15, so the loss must be
    # weighted by each rank's share of the global batch to match one process.
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return (ImageData(train.images[:63], train.labels[:63], train.info),
            ImageData(test.images[:20], test.labels[:20], test.info))


def _cfg(case, out):
    kw = dict(CASES[case])
    mc = {**TINY, **kw.pop("model_config", {})}
    return TrainConfig(dataset="digits", epochs=2, batch_size=32, optimizer="adamw", lr=3e-3, grad_clip=0.5,
                       out=str(out), log_every=0, progress=False, model_config=mc, **kw).validate()


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoints" / "epoch-0002" / "model.safetensors"))


def _worker(rank, world, root):
    train, test = _data()
    for case in CASES:
        cfg = _cfg(case, Path(root) / f"{case}-ddp")
        ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"), is_main=rank == 0)
        Trainer(cfg, ctx, train_data=train, test_data=test, log=lambda m: None).fit()


def test_two_ranks_equal_one_process(tmp_path):
    run_workers(_worker, 2, str(tmp_path), timeout=240)
    train, test = _data()
    for case in CASES:
        cfg = _cfg(case, tmp_path / f"{case}-single")
        cfg.ep_size = 1
        Trainer(cfg, train_data=train, test_data=test, log=lambda m: None).fit()
        single, ddp = _weights(tmp_path / f"{case}-single"), _weights(tmp_path / f"{case}-ddp")
        assert single.keys() == ddp.keys()
        for k in single:  # float32 sums in a different order: agreement to ~1e-6 after 4 AdamW steps
            torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=2e-5, msg=f"{case}: {k}")
        moved = max(float((single[k] - v).abs().max()) for k, v in _weights_init(case).items())
        assert moved > 1e-3, f"{case}: training did not change the weights"


def _worker4(rank, world, root):
    train, test = _data()
    cfg = _cfg("topk-capacity-ep2", Path(root) / "ep2-world4")
    cfg.batch_size = 16  # 63 images: batches of 16, 16, 16, 15 split 4 ways
    ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"), is_main=rank == 0)
    Trainer(cfg, ctx, train_data=train, test_data=test, log=lambda m: None).fit()


def test_four_ranks_with_two_expert_replicas_equal_one_process(tmp_path):
    # World 4, ep 2: each expert shard lives on 2 ranks, whose gradients are averaged over the
    # replica group; the checkpoint written by 4 ranks must equal one process's.
    run_workers(_worker4, 4, str(tmp_path), timeout=240)
    train, test = _data()
    cfg = _cfg("topk-capacity-ep2", tmp_path / "single")
    cfg.ep_size, cfg.batch_size = 1, 16
    Trainer(cfg, train_data=train, test_data=test, log=lambda m: None).fit()
    single, ep = _weights(tmp_path / "single"), _weights(tmp_path / "ep2-world4")
    for k in single:
        torch.testing.assert_close(ep[k], single[k], rtol=1e-4, atol=2e-5, msg=k)


def _weights_init(case):
    import vitmoe

    cfg = _cfg(case, "unused")
    torch.manual_seed(cfg.seed)
    return vitmoe.models.VisionTransformer(resolve(cfg).model).state_dict()


def _children(pid):
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out


def test_killed_rank_ends_the_job_and_the_run_resumes_on_one_process(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitmoe", "train", "--dataset", "digits", "--model", "switch_vit", "--experts", "4",
           "--gpu", "2", "--ep-size", "2", "--epochs", "200", "--batch", "64", "--out", str(out),
           "--dist-timeout", "30", "--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.num_heads=2",
           "--set", "model.mlp_hidden=16", "--set", "model.head_hidden=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists():  # wait for one complete epoch
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    workers = [p for p in _children(proc.pid) if b"vitmoe" in Path(f"/proc/{p}/cmdline").read_bytes()
               or b"multiprocessing" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a worker was killed")
    assert proc.returncode == 4, output[-3000:]
    assert "vitmoe: error: worker rank" in output and "--resume" in output, output[-3000:]
    # Any world size continues the run from the last complete checkpoint.
    done = subprocess.run([sys.executable, "-m", "vitmoe", "train", "--resume", str(out), "--gpu", "1",
                           "--ep-size", "1", "--epochs", "3"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoints" / "epoch-0003").is_dir()


def test_torchrun_workers_train_one_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitmoe",
           "train", "--dataset", "digits", "--model", "random_vit", "--epochs", "1", "--batch", "64",
           "--ep-size", "2", "--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.num_heads=2",
           "--set", "model.mlp_hidden=16", "--set", "model.head_hidden=16"]
    # No --out: rank 0 picks the default name (it holds a timestamp) and the others follow it.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    summary = __import__("json").loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
