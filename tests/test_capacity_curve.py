"""Capacity-accuracy curves (`vitmoe eval RUN --capacity-factors ...`)."""
from __future__ import annotations

import json

import pytest
import torch

from vitmoe import create_model
from vitmoe.cli.main import main
from vitmoe.moe import MoEMlp
from vitmoe.report.capacity import capacity_curve, eval_capacity, evaluate_spent, expert_flops_per_copy

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_hidden=32, img_size=8, patch_size=4, in_chans=1,
            num_classes=3, head="linear")


def _loader(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _model(**moe):
    torch.manual_seed(0)
    return create_model("switch_vit", num_experts=4, moe=moe, **TINY).eval()


def test_large_capacity_is_flat_and_equals_plain_dropless_eval():
    model, loader = _model(), _loader()
    plain = evaluate_spent(model, loader, torch.device("cpu"))
    curve = capacity_curve(model, loader, torch.device("cpu"), [8.0, 16.0])
    assert curve["baseline"] == {"factor": None, **plain}
    for row in curve["rows"]:
        assert row["acc"] == plain["acc"] and row["dropped_copies_per_image"] == 0
        assert row["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert row["moe_gflops_per_image"] == pytest.approx(plain["moe_gflops_per_image"], rel=1e-9)


def test_flops_spent_count_kept_copies_and_routers():
    model, loader = _model(), _loader()
    m = next(mod for mod in model.modules() if isinstance(mod, MoEMlp))
    tokens, layers = model.config.num_tokens, 2
    per_copy = expert_flops_per_copy(m)
    assert per_copy == 2 * (16 * 32 + 32 * 16)
    router = 2 * tokens * 16 * 4
    dropless = evaluate_spent(model, loader, torch.device("cpu"))
    # Dropless: every token's one copy is computed, in each of the two MoE blocks.
    assert dropless["moe_gflops_per_image"] * 1e9 == pytest.approx(layers * (tokens * per_copy + router))
    with eval_capacity(model, 0.25, "score"):
        small = evaluate_spent(model, loader, torch.device("cpu"))
    kept = layers * tokens - small["dropped_copies_per_image"]
    assert small["dropped_copies_per_image"] > 0
    assert small["moe_gflops_per_image"] * 1e9 == pytest.approx(kept * per_copy + layers * router)


def test_eval_capacity_restores_the_layers():
    model = _model(priority="position", capacity_factor_eval=2.0)
    layers = [m for m in model.modules() if isinstance(m, MoEMlp)]
    with eval_capacity(model, 0.5, "score"):
        assert all(m.config.capacity_factor_eval == 0.5 and m.router.priority == "score" for m in layers)
    assert all(m.config.capacity_factor_eval == 2.0 and m.router.priority == "position" for m in layers)


def test_eval_command_writes_the_curve(tmp_path, capsys):
    run = tmp_path / "sw"
    assert main(["train", "--model", "switch_vit", "--experts", "4", "--dataset", "digits", "--epochs", "1",
                 "--batch", "128", "--out", str(run), "--set", "model.depth=2", "--set", "model.embed_dim=16",
                 "--set", "model.num_heads=2", "--set", "model.mlp_hidden=32", "--set", "model.head=linear"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--capacity-factors", "0.25", "1", "8", "--json"]) == 0
    curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["factor"], r["priority"]) for r in curve["rows"]] == [
        (0.25, "position"), (1.0, "position"), (8.0, "position"), (0.25, "score"), (1.0, "score"), (8.0, "score")]
    assert curve["rows"][2]["acc"] == curve["rows"][5]["acc"] == curve["baseline"]["acc"]
    assert curve["rows"][0]["moe_gflops_per_image"] < curve["rows"][2]["moe_gflops_per_image"]
    for name in ("capacity.json", "capacity.md", "capacity.png"):
        assert (run / "analysis" / name).stat().st_size > 0
    assert curve["split"] == "test" and "| test acc % |" in (run / "analysis" / "capacity.md").read_text()
    assert main(["eval", str(run), "--capacity-factors", "0"]) == 2
    assert "--capacity-factors 0.0: each factor must be a finite number > 0" in capsys.readouterr().err
    # The curve on the training split (unaugmented); the flags of the plain evaluation are refused, not ignored.
    assert main(["eval", str(run), "--capacity-factors", "8", "--split", "train", "--json", "--out",
                 str(tmp_path / "train-curve")]) == 0
    train_curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert train_curve["split"] == "train" and "| train acc % |" in (tmp_path / "train-curve" / "capacity-train.md").read_text()
    assert sorted(p.name for p in (tmp_path / "train-curve").iterdir()) == ["capacity-train.json", "capacity-train.md",
                                                                             "capacity-train.png"]
    assert main(["eval", str(run), "--split", "train", "--json"]) == 0
    assert train_curve["baseline"]["acc"] == pytest.approx(json.loads(capsys.readouterr().out)["train_acc"])
    for flag in (["--superclasses", "2"], ["--per-class"]):
        assert main(["eval", str(run), "--capacity-factors", "1", *flag]) == 2
        assert f"{flag[0]} and --capacity-factors are separate evaluations" in capsys.readouterr().err
    assert main(["eval", str(run), "--capacity-factors", "1", "--amp", "bf16"]) == 2
    assert "--amp bf16: --capacity-factors evaluates in float32; leave --amp out" in capsys.readouterr().err
