"""mixup / CutMix: the draws, the mixed batch, the soft targets and their loss, and exact resume."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitmoe.data.mix import BatchMixer, MixDraw, cut_box, mix_batch, soft_targets
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint
from vitmoe.training.loop.losses import soft_cross_entropy
from vitmoe.training.loop.step import TrainStep


def _flat_batch(b=6, c=2, h=8, w=8):
    """Image i is the constant i + 1 (every pixel), so a pixel tells which image it came from."""
    return torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, c, h, w).contiguous()


def test_mixup_blends_each_image_with_its_reversed_partner():
    x = torch.tensor([1.0, 3.0, 7.0]).view(3, 1, 1, 1)
    y = torch.tensor([0, 1, 2])
    mixed, t = mix_batch(x, y, MixDraw(0.25, None), num_classes=3)
    # partner of image i is image 2 - i: 0.25 * x_i + 0.75 * x_{2-i}
    assert mixed.flatten().tolist() == [0.25 * 1 + 0.75 * 7, 0.25 * 3 + 0.75 * 3, 0.25 * 7 + 0.75 * 1]
    assert t.tolist() == [[0.25, 0.0, 0.75], [0.0, 1.0, 0.0], [0.75, 0.0, 0.25]]


def test_cutmix_box_area_is_one_minus_lambda_exactly_and_targets_keep_mass_one():
    mixer = BatchMixer(num_classes=10, seed=3, cutmix_alpha=1.0)
    x, y = _flat_batch(), torch.tensor([0, 1, 2, 3, 4, 9])
    seen_clipped = False
    for batch in range(40):
        draw = mixer.draw(epoch=1, batch=batch, height=8, width=8)
        y0, y1, x0, x1 = draw.box
        area = (y1 - y0) * (x1 - x0)
        assert draw.lam == 1.0 - area / 64  # the exact kept share, not the drawn lambda
        mixed, t = mix_batch(x, y, draw, 10)
        for i in range(6):  # pixels from the partner (image 5 - i) fill exactly the box
            from_partner = (mixed[i] == 6 - i).all(0) if i != 5 - i else None
            if from_partner is not None:
                assert int(from_partner.sum()) == area
                assert float(from_partner.float().mean()) == pytest.approx(1.0 - draw.lam, abs=0)
        torch.testing.assert_close(t.sum(1), torch.ones(6), rtol=0, atol=1e-6)
        assert t[0, 0].item() == pytest.approx(draw.lam) and t[0, 9].item() == pytest.approx(1 - draw.lam)
        seen_clipped |= area < int(8 * math.sqrt(1 - draw.lam)) ** 2 or y0 == 0 or x1 == 8
    assert seen_clipped  # some boxes met the border


def test_cut_box_side_and_clipping():
    # lam 0.75: side sqrt(0.25) * 8 = 4, centred at (4, 4) -> rows/cols 2..6
    assert cut_box(0.75, 8, 8, 4, 4) == (2, 6, 2, 6)
    # centred at the corner: clipped to the 2 x 2 that lies inside
    assert cut_box(0.75, 8, 8, 0, 0) == (0, 2, 0, 2)
    assert cut_box(1.0, 8, 8, 3, 3) == (3, 3, 3, 3)  # lam 1: nothing pasted


def test_label_smoothing_composes_with_mixing_by_hand():
    # C 4, eps 0.1: smooth(y) = 0.9 onehot + 0.025; lam 0.75 with labels 0 and 2.
    t = soft_targets(torch.tensor([0, 2]), torch.tensor([2, 0]), 0.75, num_classes=4, smoothing=0.1)
    # row 0: 0.75 * (0.925, .025, .025, .025) + 0.25 * (.025, .025, 0.925, .025)
    torch.testing.assert_close(t, torch.tensor([[0.7, 0.025, 0.25, 0.025], [0.25, 0.025, 0.7, 0.025]]))
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    # Through the mixer: the same targets.
    mixed, t2 = mix_batch(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), MixDraw(0.75, None), 4, 0.1)
    torch.testing.assert_close(t2, t)


def test_soft_cross_entropy_by_hand_and_against_label_smoothing():
    # Uniform logits: -sum t log(1/C) = log C for any target row of mass 1.
    t = soft_targets(torch.tensor([1]), torch.tensor([3]), 0.6, 5, 0.2)
    assert soft_cross_entropy(torch.zeros(1, 5), t).item() == pytest.approx(math.log(5), rel=1e-6)
    # logits (0, log 3): p = (1/4, 3/4); targets (0.5, 0.5): 0.5 log 4 + 0.5 log(4/3)
    ce = soft_cross_entropy(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]]), reduction="sum")
    assert ce.item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel=1e-6)
    # An unmixed smoothed target is what F.cross_entropy's label smoothing computes.
    torch.manual_seed(0)
    logits, y = torch.randn(7, 10), torch.randint(10, (7,))
    ref = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum")
    mine = soft_cross_entropy(logits, soft_targets(y, y, 1.0, 10, 0.1), reduction="sum")
    torch.testing.assert_close(mine, ref)
    assert soft_cross_entropy(logits.bfloat16(), soft_targets(y, y, 1.0, 10)).dtype == torch.float32


def test_same_seed_same_mixed_batch_and_other_batches_differ():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    a = BatchMixer(10, seed=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    b = BatchMixer(10, seed=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for batch in range(5):
        xa, ta = a(x, y, 2, batch)
        xb, tb = b(x, y, 2, batch)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    draws = {a.draw(2, i, 8, 8) for i in range(20)}
    assert len(draws) == 20  # a fresh lambda (and box) per batch
    assert a.draw(2, 0, 8, 8) != a.draw(3, 0, 8, 8)  # and per epoch
    assert a.draw(2, 0, 8, 8) != BatchMixer(10, seed=6, mixup_alpha=0.8, cutmix_alpha=1.0).draw(2, 0, 8, 8)


def test_probabilities_choose_what_is_mixed():
    never = BatchMixer(10, mixup_alpha=1.0, mix_prob=0.0)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    out, targets = never(x, y, 1, 0)
    assert out is x and targets is None
    half = BatchMixer(10, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.25)
    draws = [half.draw(1, i, 8, 8) for i in range(2000)]
    mixed = [d for d in draws if d is not None]
    assert 0.45 < len(mixed) / 2000 < 0.55
    assert 0.2 < sum(d.box is not None for d in mixed) / len(mixed) < 0.3
    only_mixup = [BatchMixer(10, mixup_alpha=1.0).draw(1, i, 8, 8) for i in range(50)]
    only_cutmix = [BatchMixer(10, cutmix_alpha=1.0).draw(1, i, 8, 8) for i in range(50)]
    assert all(d.box is None for d in only_mixup) and all(d.box is not None for d in only_cutmix)
    with pytest.raises(ValueError, match="mix_prob"):
        BatchMixer(10, mixup_alpha=1.0, mix_prob=1.5)


def test_mixed_training_with_consistency_resumes_with_the_same_mixed_batches(tmp_path, monkeypatch, kill_after_epoch,
                                                                           digits512):
    tr, te = digits512
    cfg = lambda name: TrainConfig(  # noqa: E731
        model="random_vit", dataset="digits", epochs=2, batch_size=128, lr=2e-3, optimizer="adamw",
        model_config=dict(embed_dim=16, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16, head="linear",
                          num_experts=4), out=str(tmp_path / name), log_every=0, progress=False, mixup_alpha=0.8,
        cutmix_alpha=1.0, mix_prob=0.75, label_smoothing=0.1, consistency_weight=1.0, seed=1)
    seen = {"full": [], "killed": []}
    real_call = TrainStep.__call__

    def recording(run):
        def call(self, x, y, scale, targets=None):
            seen[run].append((x.clone(), None if targets is None else targets.clone()))
            return real_call(self, x, y, scale, targets)
        return call

    monkeypatch.setattr(TrainStep, "__call__", recording("full"))
    full = Trainer(cfg("full"), log=lambda m: None, train_data=tr, test_data=te).fit()
    monkeypatch.setattr(TrainStep, "__call__", recording("killed"))
    kill_after_epoch(Trainer(cfg("killed"), log=lambda m: None, train_data=tr, test_data=te))
    resumed = Trainer(cfg("killed"), resume=True, log=lambda m: None, train_data=tr, test_data=te).fit()

    assert len(seen["full"]) == len(seen["killed"]) == 8
    for (xa, ta), (xb, tb) in zip(seen["full"], seen["killed"]):
        assert torch.equal(xa, xb) and (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb))
    targets = [t for _, t in seen["full"] if t is not None]
    assert 0 < len(targets) < 8  # mix_prob 0.75: some batches stay unmixed
    for t in targets:  # soft, smoothed, mass 1
        torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
        assert float(t.min()) >= 0.1 / 10 - 1e-7 and float(t.max()) <= 0.91 + 1e-6
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "killed") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    assert all(r["consistency_loss"] > 0 and math.isfinite(r["train_loss"]) for r in full.history)
    assert full.summary["mixup_alpha"] == 0.8 and full.summary["cutmix_alpha"] == 1.0
