"""EMA, expert averaging and freeze_unrouted with expert parallelism: two gloo ranks, experts split
over them, train like one process (the EMA gathered into one file, the mean taken over the EP group,
the frozen experts decided alike on every rank)."""
from pathlib import Path

import pytest
import torch
from dist_utils import run_workers
from safetensors.torch import load_file

from vitmoe.data import ImageData, load_dataset
from vitmoe.training.config import TrainConfig
from vitmoe.training.distributed.context import DistContext
from vitmoe.training.loop.trainer import Trainer

MC = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_hidden": 24, "head_hidden": 16, "num_experts": 4,
      "expert_init": "independent"}


def _data():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return (ImageData(train.images[:96], train.labels[:96], train.info),
            ImageData(test.images[:20], test.labels[:20], test.info))


def _cfg(out, ep_size):
    # 96 images, batch 32: 3 steps per epoch; averaged after step 4, so the last 2 steps move apart again.
    return TrainConfig(model="random_vit", dataset="digits", epochs=2, batch_size=32, optimizer="adamw", lr=3e-3,
                       weight_decay=0.05, grad_clip=0.5, out=str(out), log_every=0, progress=False,
                       model_config=dict(MC), ep_size=ep_size, ema_decay=0.8, merge_every=4,
                       freeze_unrouted=True).validate()


def _worker(rank, world, root):
    train, test = _data()
    ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"), is_main=rank == 0)
    Trainer(_cfg(Path(root) / "ep2", 2), ctx, train_data=train, test_data=test, log=lambda m: None).fit()


@pytest.mark.slow
def test_ema_averaging_and_freezing_with_expert_parallel_equal_one_process(tmp_path):
    run_workers(_worker, 2, str(tmp_path), timeout=240)
    train, test = _data()
    single = Trainer(_cfg(tmp_path / "single", 1), train_data=train, test_data=test, log=lambda m: None).fit()
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "single" / "checkpoints" / "epoch-0002" / name))
        b = load_file(str(tmp_path / "ep2" / "checkpoints" / "epoch-0002" / name))
        assert a.keys() == b.keys()
        assert a["blocks.0.mlp.experts.w1"].shape[0] == b["blocks.0.mlp.experts.w1"].shape[0] == 4  # global order
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=f"{name}: {k}")
    rows = [line for line in (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and '"ema_test_acc"' in rows[-1] and single.history[-1]["ema_test_acc"] is not None
