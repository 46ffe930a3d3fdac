"""Super-class guidance of per-image routers (Mobile V-MoE): the router's cross-entropy against each
image's super-class expert by hand (hard and soft labels), only in training and only inside
`routing_labels`, its gradient reaching the router (and what feeds it) but not the experts, its
weight in the training loss, the config checks, the grouping of classes from a confusion matrix,
and `vitmoe eval --superclasses` on a real run."""
import json

import pytest
import torch
import torch.nn.functional as F

from vitmoe.models import VisionTransformer, model_config
from vitmoe.moe import MoEMlp, collect_moe_outputs, routing_labels
from vitmoe.report.superclasses import confusion_matrix, superclasses_from_confusion
from vitmoe.validation import ConfigError

D, H, E = 12, 20, 4
MAP = [0, 0, 1, 2, 3, 3, 1]  # 7 classes -> 4 experts


def make(**kw):
    torch.manual_seed(0)
    m = MoEMlp(D, H, num_experts=E, router="image", superclasses=MAP, **kw).double()
    with torch.no_grad():
        m.router.weight.normal_()
    return m


def by_hand(m, x_BND, target_BE):
    """Float64: softmax of the pooled image's router logits, cross-entropy against `target_BE`."""
    logits = x_BND.double().mean(1) @ m.router.weight.double().t()
    return -(target_BE * logits.log_softmax(-1)).sum(-1).mean()


def test_hard_and_soft_labels_equal_the_hand_computation():
    m = make()
    x = torch.randn(6, 5, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    hard = F.one_hot(torch.tensor(MAP)[y], E).double()
    with routing_labels(m, y), collect_moe_outputs(m) as moe:
        m(x)
    got = moe.layer_aux()[""]["superclass"]
    torch.testing.assert_close(got, by_hand(m, x, hard), rtol=1e-12, atol=1e-12)
    # Soft targets (mixup of two classes, label smoothing): each class's mass goes to its expert.
    soft = torch.full((6, 7), 0.02, dtype=torch.float64)
    soft[torch.arange(6), y] += 0.5
    soft[torch.arange(6), (y + 3) % 7] += 0.36
    target = soft @ F.one_hot(torch.tensor(MAP), E).double()
    with routing_labels(m, soft), collect_moe_outputs(m) as moe:
        m(x)
    torch.testing.assert_close(moe.layer_aux()[""]["superclass"], by_hand(m, x, target), rtol=1e-12, atol=1e-12)
    # One-hot soft targets are the hard labels.
    with routing_labels(m, F.one_hot(y, 7).double()), collect_moe_outputs(m) as moe:
        m(x)
    torch.testing.assert_close(moe.layer_aux()[""]["superclass"], by_hand(m, x, hard), rtol=1e-12, atol=1e-12)


def test_no_term_without_labels_and_labels_do_not_outlive_the_block():
    m = make()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    with collect_moe_outputs(m) as moe:
        m(x)
    assert "superclass" not in moe.layer_aux()[""]
    with routing_labels(m, torch.tensor([0, 1, 2])):
        pass
    assert m.router.labels is None
    with pytest.raises(ValueError, match="2 labels for 3 images"), routing_labels(m, torch.tensor([0, 1])):
        m(x)
    assert m.router.labels is None  # cleared on the error too


def test_the_term_trains_the_router_not_the_experts_and_is_weighted_in_the_loss():
    m = make(superclass_weight=0.7, balance_loss_weight=0.0, z_loss_weight=0.0)
    x = torch.randn(6, 5, D, dtype=torch.float64)
    with routing_labels(m, torch.tensor([0, 1, 2, 3, 4, 5])), collect_moe_outputs(m) as moe:
        m(x)
    term = moe.layer_aux()[""]["superclass"]
    torch.testing.assert_close(moe.aux_loss(), 0.7 * term)
    grads = torch.autograd.grad(term, [m.router.weight, m.experts.w1], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None  # the guidance trains who goes where, not the experts
    # Its gradient is the float64 cross-entropy's.
    w = m.router.weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(x.mean(1) @ w.t(), torch.tensor(MAP)[torch.arange(6)])
    torch.testing.assert_close(grads[0], torch.autograd.grad(ref, w)[0], rtol=1e-12, atol=1e-12)


def test_checkpoints_and_the_state_dict_do_not_carry_the_map():
    m = make()
    assert "router.expert_of_class" not in m.state_dict()
    assert m.router.expert_of_class.tolist() == MAP


@pytest.mark.parametrize("over, match", [
    ({"moe.superclasses": [0, 1, 2]}, "num_classes=10"),
    ({"moe.superclasses": [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]}, r"\[0, 4\)"),
    ({"moe.superclasses": [0] * 10, "moe.router": "switch"}, "unless router is 'image'"),
    ({"moe.superclasses": "0,1"}, "one expert index per class"),
    ({"moe.superclasses": [0] * 10, "moe.superclass_weight": -1}, "superclass_weight"),
])
def test_bad_settings_are_one_error_naming_the_field(over, match):
    with pytest.raises(ConfigError, match=match) as e:
        model_config("vit", num_classes=10, num_experts=4, moe_layers="all", **{"moe.router": "image", **over})
    assert "model field moe.superclass" in str(e.value)


def test_a_model_routes_the_same_with_and_without_the_map_at_inference():
    over = dict(img_size=8, patch_size=4, in_chans=1, num_classes=7, embed_dim=D, depth=2, num_heads=2, mlp_hidden=H,
                num_experts=E, moe_layers="all", **{"moe.router": "image"})
    torch.manual_seed(0)
    plain = VisionTransformer(model_config("vit", **over).validate())
    torch.manual_seed(0)
    guided = VisionTransformer(model_config("vit", **over, **{"moe.superclasses": MAP}).validate())
    guided.load_state_dict(plain.state_dict())
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(guided.eval()(x), plain.eval()(x))
    guided.train()
    with routing_labels(guided, torch.tensor([0, 1, 2, 3, 4])):
        out = guided(x, return_aux=True)
    assert set(out.aux_terms) >= {"balance", "z", "superclass"}


def test_confusion_matrix_counts():
    got = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert got.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def blocks_confusion(sizes, seed=0):
    """A confusion matrix whose classes are confused within blocks of the given sizes, classes shuffled."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.randperm(n, generator=g)
    block = block[order]
    conf = torch.rand(n, n, generator=g) * 2  # background confusion
    conf += 40 * (block[:, None] == block[None, :])
    conf += 500 * torch.eye(n)
    return conf, block


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2, 2], [3, 3, 2, 2], [1, 2, 2, 2, 2, 1]])
def test_grouping_recovers_confused_blocks(sizes):
    conf, block = blocks_confusion(sizes)
    got = torch.tensor(superclasses_from_confusion(conf, len(sizes)))
    # The same partition as the blocks, up to the experts' numbering.
    assert all(len(set(got[block == b].tolist())) == 1 for b in range(len(sizes)))
    assert len(set(got.tolist())) == len(sizes)
    assert got[0] == 0 and got.max() == len(sizes) - 1  # numbered by smallest class


def test_grouping_special_cases():
    conf = torch.rand(6, 6) + 10 * torch.eye(6)
    assert superclasses_from_confusion(conf, 6) == list(range(6))
    assert superclasses_from_confusion(conf, 1) == [0] * 6
    # Groups are balanced: 10 classes, 4 experts -> at most 3 classes each.
    sizes = torch.bincount(torch.tensor(superclasses_from_confusion(torch.rand(10, 10), 4)))
    assert sizes.numel() == 4 and sizes.max() <= 3
    # Four confused triples into three super-classes: no merge fits 4 classes, so the bound grows.
    conf, _ = blocks_confusion([3, 3, 3, 3])
    assert len(set(superclasses_from_confusion(conf, 3))) == 3
    for bad in (0, 7):
        with pytest.raises(ValueError, match="between 1 and the number of classes"):
            superclasses_from_confusion(torch.rand(6, 6), bad)


def test_eval_superclasses_on_a_trained_run_gives_a_setting_that_trains(tiny_run, tmp_path, capsys):
    from vitmoe.cli.main import main
    from conftest import TINY_SETS

    assert main(["eval", str(tiny_run), "--split", "train", "--superclasses", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["split"] == "train" and r["images"] > 1000 and "test_acc" not in r and "test_loss" not in r
    conf = torch.tensor(r["confusion"])
    assert conf.sum() == r["images"] and conf.shape == (10, 10)
    assert r["train_acc"] == pytest.approx(100.0 * conf.diag().sum().item() / r["images"])
    assert r["superclasses"] == superclasses_from_confusion(conf, 4)
    assert main(["eval", str(tiny_run), "--split", "train", "--superclasses", "4"]) == 0
    text = capsys.readouterr().out
    setting = text.strip().splitlines()[-1]
    assert setting.startswith("guide a per-image router with 4 experts:")
    value = setting.split("model.moe.superclasses=")[1]
    assert json.loads(value) == r["superclasses"]
    assert main(["eval", str(tiny_run), "--superclasses", "11"]) == 2
    assert "at most the number of classes (10" in capsys.readouterr().err
    run = tmp_path / "guided"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch", "256", "--experts", "4", "--out", str(run),
                 *TINY_SETS, "--set", "model.moe.router=image", "--set", f"model.moe.superclasses={value}"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("superclass" in json.dumps(row) for row in metrics)
