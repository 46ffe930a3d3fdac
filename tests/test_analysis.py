"""`vitmoe analyze`: the MoE layers' recording mode and the numbers computed from it."""
from __future__ import annotations

import json

import pytest
import torch

from vitmoe import create_model, merge_experts
from vitmoe.cli.main import main
from vitmoe.moe import MoEMlp, SoftMoE, collect_moe_outputs
from vitmoe.report.analysis import (class_expert_shares, expert_drift, random_routing_report, record_routing,
                                    routed_as)

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_hidden=32, img_size=8, patch_size=4, in_chans=1,
            num_classes=3, head="linear")


def _loader(n=24, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("moe", [
    dict(router="switch"),
    dict(router="topk", top_k=2, capacity_factor_eval=0.5),
    dict(router="expert_choice", capacity_factor_train=1.0, capacity_factor_eval=1.0),
    dict(router="soft"),
    dict(router="random", random_granularity="token", eval_mode="random"),
])
def test_recording_changes_no_output_and_matches_the_layers_statistics(moe):
    torch.manual_seed(0)
    model = create_model("switch_vit", num_experts=4, moe=moe, **TINY).eval()
    x = _loader()[0][0]
    torch.manual_seed(1)
    with collect_moe_outputs(model) as plain:
        y0 = model(x)
    torch.manual_seed(1)
    with collect_moe_outputs(model, record=True) as rec:
        y1 = model(x)
    assert torch.equal(y0, y1)
    assert plain.routing() == {}
    stats, routing = rec.stats(), rec.routing()
    assert set(routing) == set(stats) == {"blocks.0.mlp", "blocks.1.mlp"}
    layer = next(m for m in model.modules() if isinstance(m, (MoEMlp, SoftMoE)))
    for name, calls in routing.items():
        e = calls[0]["expert_T"]
        assert e.shape == (x.shape[0] * model.config.num_tokens,) and int(e.max()) < 4 and int(e.min()) >= -1
        load = stats[name]["load"]
        if moe["router"] in ("switch", "random"):
            assert torch.equal(torch.bincount(e, minlength=4).float(), load)  # one copy per token, none dropped
        elif moe["router"] == "topk":
            # First choices kept: at most the load, and every -1 is a dropped first choice.
            kept_first = torch.bincount(e[e >= 0], minlength=4).float()
            assert (kept_first <= load).all() and float(stats[name]["dropped_frac"]) > 0
        elif moe["router"] == "expert_choice":
            assert int(calls[0]["experts_per_token_T"].sum()) == int(load.sum())
        else:
            assert isinstance(layer, SoftMoE) and int((e >= 0).sum()) == e.numel()


def test_class_expert_shares_of_a_hand_built_routing():
    expert = torch.tensor([0, 0, 1, 2, 2, 2, -1, 1])
    label = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    got = class_expert_shares(expert, label, classes=3, experts=3)
    want = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(got, want)


def test_record_routing_counts_every_patch_once_per_layer():
    torch.manual_seed(0)
    model = create_model("switch_vit", num_experts=4, **TINY).eval()
    loader = _loader()
    rec = record_routing(model, loader, classes=3, keep_images=5)
    patches = model.config.num_patches  # the class token is not a patch
    for c in rec["counts"].values():
        assert int(c.by_class.sum()) == int(c.by_position.sum()) == 24 * patches
        assert c.by_position.sum(1).tolist() == [24] * patches
        assert int(c.load.sum()) == 24 * model.config.num_tokens
    assert rec["kept_images"].shape == (5, 1, 8, 8)
    assert all(r.shape == (5, patches) for r in rec["kept_routes"].values())


def test_random_routing_report_matches_merging_and_single_experts():
    torch.manual_seed(0)
    model = create_model("random_vit", num_experts=3, moe={"expert_init": "independent"}, **TINY).eval()
    loader = _loader()
    rr = random_routing_report(model, loader)
    merged = merge_experts(model).eval()
    acc = lambda m: 100.0 * sum(int((m(x).argmax(-1) == y).sum()) for x, y in loader) / 24  # noqa: E731
    assert rr["merged_acc"] == acc(merged)
    for e, got in enumerate(rr["per_expert_acc"]):
        with routed_as(model, "random", fixed_expert=e):
            assert got == acc(model)
    assert all(v > 0 for v in rr["drift"].values())
    shared = create_model("random_vit", num_experts=3, **TINY)  # every expert starts as one draw
    assert all(expert_drift(m) == 0.0 for _, m in shared.moe_modules())


def test_analyze_command(tmp_path, capsys):
    run = tmp_path / "rv"
    assert main(["train", "--model", "random_vit", "--experts", "2", "--dataset", "digits", "--epochs", "1",
                 "--batch", "128", "--out", str(run), "--set", "model.depth=2", "--set", "model.embed_dim=16",
                 "--set", "model.num_heads=2", "--set", "model.mlp_hidden=32", "--set", "model.head=linear",
                 "--set", "model.moe.random_granularity=sample", "--set", "model.moe.eval_mode=random"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(run), "--images", "4"]) == 0
    out = capsys.readouterr().out
    assert "random routing: merged" in out
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    assert set(result["layers"]) == {"blocks.0.mlp", "blocks.1.mlp"}
    for s in result["layers"].values():
        assert sum(s["load_share"]) == pytest.approx(1.0)
        assert all(sum(row) == pytest.approx(1.0) for row in s["class_expert_shares"])
    assert len(result["random_routing"]["per_expert_acc"]) == 2
    for kind in ("classes", "positions", "routes"):
        assert (run / "analysis" / f"{kind}_blocks_0_mlp.png").stat().st_size > 0
    assert main(["analyze", str(run), "--layers", "nope"]) == 2
    assert "--layers nope: not an MoE layer" in capsys.readouterr().err


def test_dead_experts_by_layer_names_the_starved_experts():
    from vitmoe.moe.collect import dead_experts_by_layer

    load = {"blocks.0.mlp": [100.0, 100.0, 100.0, 2.0], "blocks.1.mlp": [90.0, 110.0, 100.0, 100.0],
            "blocks.2.mlp": [5.0]}
    # 2 of 302 copies is 0.66% < 0.1 x 25%; a one-expert layer is never "dead".
    assert dead_experts_by_layer(load) == {"blocks.0.mlp": [3]}
    assert dead_experts_by_layer(None) == {}
