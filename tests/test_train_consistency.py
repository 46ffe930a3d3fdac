"""AdaMix / THOR consistency regularisation: the symmetric KL, its trainer wiring and validation."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import TINY_MC

from vitmoe.data import ImageData, load_dataset
from vitmoe.models import ConfigError
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.distributed.context import DistContext
from vitmoe.training.loop.losses import symmetric_kl


def _cfg(tmp_path, name="run", **kw):
    base = dict(model="random_vit", dataset="digits", epochs=2, batch_size=128, lr=2e-3, optimizer="adamw",
                weight_decay=0.05, model_config=dict(TINY_MC), out=str(tmp_path / name), log_every=5,
                progress=False, consistency_weight=1.0)
    mc = kw.pop("model_config", {})
    base.update(kw)
    base["model_config"] = {**base["model_config"], **mc}
    return TrainConfig(**base)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_symmetric_kl_matches_hand_computed_values():
    # Row 0: p = (1/4, 3/4) vs q = (1/2, 1/2); row 1: identical predictions (KL exactly 0).
    a = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    p, q = (0.25, 0.75), (0.5, 0.5)
    expected0 = 0.5 * (_kl(p, q) + _kl(q, p))
    assert expected0 == pytest.approx(0.1373265, abs=1e-6)  # 0.5 * (0.1308 + 0.1438)
    per_row = symmetric_kl(a, b, reduction="none")
    assert per_row[0].item() == pytest.approx(expected0, rel=1e-6)
    assert per_row[1].item() == 0.0
    assert symmetric_kl(a, b).item() == pytest.approx(expected0 / 2, rel=1e-6)  # mean over rows
    assert symmetric_kl(a, b, reduction="sum").item() == pytest.approx(expected0, rel=1e-6)
    assert symmetric_kl(b, a).item() == pytest.approx(symmetric_kl(a, b).item(), rel=1e-7)  # symmetric
    # Not a one-directional KL: both directions differ here, the mean of them is what counts.
    assert abs(per_row[0].item() - _kl(p, q)) > 1e-3 and abs(per_row[0].item() - _kl(q, p)) > 1e-3
    # Computed in fp32 whatever the input precision.
    assert symmetric_kl(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_symmetric_kl_stopgrad_gradient():
    torch.manual_seed(0)
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(5, 7, requires_grad=True)
    symmetric_kl(a, b, stopgrad=True, reduction="sum").backward()
    pa, pb = a.softmax(-1).detach(), b.softmax(-1).detach()
    # With the targets detached only KL(p_b || p_a) reaches a: d/da = 0.5 * (p_a - p_b).
    torch.testing.assert_close(a.grad, 0.5 * (pa - pb))
    torch.testing.assert_close(b.grad, 0.5 * (pb - pa))
    # Without stop-gradient: the full derivative of the symmetric KL (by autograd on the formula).
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    symmetric_kl(a2, b2, stopgrad=False, reduction="sum").backward()
    a3, b3 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    la, lb = a3.log_softmax(-1), b3.log_softmax(-1)
    (0.5 * ((la.exp() * (la - lb)).sum() + (lb.exp() * (lb - la)).sum())).backward()
    torch.testing.assert_close(a2.grad, a3.grad)
    torch.testing.assert_close(b2.grad, b3.grad)
    assert not torch.allclose(a2.grad, a.grad)


def test_consistency_is_zero_when_routes_agree_and_trains_otherwise(tmp_path, digits):
    tr, te = digits
    # One expert: both passes route identically, so the two predictions are bit-identical.
    one = Trainer(_cfg(tmp_path, "one", model_config={"num_experts": 1}), log=lambda m: None,
                  train_data=tr, test_data=te).fit()
    assert [r["consistency_loss"] for r in one.history] == [0.0, 0.0]
    # Four experts: the second pass draws other experts, the experts diverge, the KL is positive.
    four = Trainer(_cfg(tmp_path, "four"), log=lambda m: None, train_data=tr, test_data=te).fit()
    rows = [json.loads(line) for line in (tmp_path / "four" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["forwards_per_step"] == 2 and r["consistency_loss"] > 0 and math.isfinite(r["consistency_loss"])
        # Expert loads count both passes' tokens: 2 forwards x images x 5 tokens (4 patches + class token).
        assert sum(r["expert_load"]["blocks.0.mlp"]) == 2 * len(tr) * 5
    s = four.summary
    assert (s["forwards_per_step"], s["consistency_weight"], s["name"]) == (2, 1.0, "random-vit+cr")
    first = load_file(str(tmp_path / "four" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in first.values())
    # Off: one forward per step, no consistency value.
    off = Trainer(_cfg(tmp_path, "off", consistency_weight=0.0, epochs=1), log=lambda m: None,
                  train_data=tr, test_data=te).fit()
    assert off.history[0]["forwards_per_step"] == 1 and off.history[0]["consistency_loss"] is None
    assert sum(off.history[0]["expert_load"]["blocks.0.mlp"]) == len(tr) * 5


@pytest.mark.parametrize("kw, needles", [
    (dict(model="switch_vit"), ["consistency_weight", "router 'switch'", "random"]),
    (dict(model="vit"), ["consistency_weight", "dense"]),
    (dict(model="random_vit", model_config={"router": "topk", "top_k": 2}), ["consistency_weight", "topk"]),
    (dict(consistency_weight=-1.0), ["consistency_weight", ">= 0"]),
    (dict(consistency_stopgrad="maybe"), ["consistency_stopgrad", "true or false"]),
])
def test_consistency_validation(tmp_path, kw, needles):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **kw).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_consistency_allowed_for_random_routes_of_any_model(tmp_path):
    cfg = _cfg(tmp_path, model="switch_vit", model_config={"router": "random"}, consistency_stopgrad="false").validate()
    assert (cfg.forwards_per_step, cfg.consistency_stopgrad) == (2, False)
    assert _cfg(tmp_path, consistency_weight=0.0, model="switch_vit").validate().forwards_per_step == 1


# --- two ranks with expert parallelism equal one process (routes are drawn alike on every rank) ---
# Independently initialised experts: the two passes differ from the first step on.
DIST_MC = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_hidden": 24, "head_hidden": 16, "num_experts": 4,
           "expert_init": "independent"}


def _dist_data():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return (ImageData(train.images[:63], train.labels[:63], train.info),
            ImageData(test.images[:20], test.labels[:20], test.info))


def _dist_cfg(out, ep_size):
    return TrainConfig(model="random_vit", dataset="digits", epochs=2, batch_size=32, optimizer="adamw", lr=3e-3,
                       grad_clip=0.5, out=str(out), log_every=0, progress=False, model_config=dict(DIST_MC),
                       ep_size=ep_size, consistency_weight=1.0).validate()


def _dist_worker(rank, world, root):
    train, test = _dist_data()
    ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"), is_main=rank == 0)
    Trainer(_dist_cfg(Path(root) / "ep2", 2), ctx, train_data=train, test_data=test, log=lambda m: None).fit()


@pytest.mark.slow
def test_consistency_with_expert_parallel_equals_one_process(tmp_path):
    from dist_utils import run_workers

    run_workers(_dist_worker, 2, str(tmp_path), timeout=240)
    train, test = _dist_data()
    single = Trainer(_dist_cfg(tmp_path / "single", 1), train_data=train, test_data=test, log=lambda m: None).fit()
    assert single.history[0]["consistency_loss"] > 0
    a = load_file(str(tmp_path / "single" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    b = load_file(str(tmp_path / "ep2" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    rows = [json.loads(line) for line in (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, single.history):
        assert row["consistency_loss"] == pytest.approx(ref["consistency_loss"], rel=1e-3, abs=1e-7)
