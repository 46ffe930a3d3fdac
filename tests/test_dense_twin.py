"""The dense twin of an MoE (equal forward FLOPs per image) and the verdict against it that
`vitmoe report` and `vitmoe sweep --vs-dense` print, checked against hand computations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vitmoe.cli.main import main
from vitmoe.models import dense_twin, model_config, model_info, twin_overrides
from vitmoe.report import load_run, make_report
from vitmoe.report.groups import Group
from vitmoe.report.verdict import acc_within_epochs, acc_within_time, nearest_twins, time_curve, verdict

SMALL = dict(embed_dim=32, depth=4, num_heads=2, mlp_hidden=64)
MOES = {
    "switch-all": dict(moe_layers="all", num_experts=8),
    "top2-every-other": dict(moe_layers="every_other", num_experts=4, **{"moe.router": "topk", "moe.top_k": 2}),
    "image-top2-last2": dict(moe_layers="last:2", num_experts=4, **{"moe.router": "image", "moe.top_k": 2}),
    "soft": dict(moe_layers="all", num_experts=4, **{"moe.router": "soft", "moe.slots_per_expert": 4}),
    "expert-choice": dict(moe_layers="all", num_experts=4, **{"moe.router": "expert_choice",
                                                               "moe.capacity_factor_eval": 2.0,
                                                               "moe.capacity_factor_train": 1.0}),
    "pr-moe-pyramid": dict(moe_layers=[2, 3], num_experts=[4, 8], **{"moe.residual": True}),
}


@pytest.mark.parametrize("case", list(MOES))
def test_twin_has_the_moe_forward_flops_but_the_routing_within_half_a_hidden_unit(case):
    moe = model_config("vit", **SMALL, **MOES[case]).validate()
    twin = dense_twin(moe)
    assert not twin.is_moe and twin.embed_dim == moe.embed_dim and twin.depth == moe.depth
    info = model_info(moe)
    f_moe = info.forward_flops_per_image - info.routing_flops_per_image
    assert 0 < info.routing_flops_per_image < 0.35 * info.forward_flops_per_image
    f_twin = model_info(twin).forward_flops_per_image
    per_unit = model_info(twin.replace(mlp_hidden=twin.mlp_hidden + 1)).forward_flops_per_image - f_twin
    assert abs(f_twin - f_moe) <= per_unit / 2
    # The --set spelling builds the same model.
    sets = twin_overrides(moe)
    again = moe.replace(**{k.removeprefix("model."): (False if v == "false" else v) for k, v in sets.items()})
    assert model_info(again.validate()).forward_flops_per_image == f_twin


def test_expert_flops_share_by_hand():
    cfg = model_config("vit", **SMALL, moe_layers="every_other", num_experts=4,
                       **{"moe.router": "topk", "moe.top_k": 2}).validate()
    info = model_info(cfg)
    N, D, H = cfg.num_tokens, 32, 64
    experts = 2 * (2 * 2 * N * 2 * D * H)  # two MoE blocks, k = 2 experts per token
    assert info.expert_flops_share == pytest.approx(experts / info.forward_flops_per_image)
    assert model_info(dense_twin(cfg)).expert_flops_share == 0


# -- the verdict, on run directories written by hand -----------------------------------------
def _write(root: Path, name: str, accs: list[float], epoch_s: float, flops: int, moe: bool, steps_per_epoch=10,
           config: str = ""):
    root.mkdir(parents=True)
    rows = [{"epoch": i + 1, "test_acc": a, "epoch_time_s": epoch_s} for i, a in enumerate(accs)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"name": name, "model": name, "experts": 4 if moe else None, "params": 100, "active_params": 50,
               "best_acc": max(accs), "epochs": len(accs), "train_time_s": epoch_s * len(accs),
               "steps": steps_per_epoch * len(accs), "dataset": "digits", "forward_flops_per_image": flops,
               "expert_flops_share": 0.4 if moe else 0.0}
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "config.yaml").write_text(f"model: {name}\nseed: {root.name}\n{config}")
    return root


MOE_ACCS = [[80.0, 86.0, 90.0], [81.0, 87.0, 91.0], [79.5, 85.5, 90.5]]
TWIN_ACCS = [[82.0, 85.0, 86.0], [82.5, 85.5, 86.5], [81.5, 84.5, 85.0]]


@pytest.fixture
def pair(tmp_path):
    moe = [load_run(_write(tmp_path / f"moe{s}", "moe", a, 20.0, 1_000_000, True)) for s, a in enumerate(MOE_ACCS)]
    twin = [load_run(_write(tmp_path / f"twin{s}", "twin", a, 10.0, 1_010_000, False))
            for s, a in enumerate(TWIN_ACCS)]
    return Group("moe", moe), Group("twin", twin)


def welch_beyond(a, b, t_quantile):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    return abs(ma - mb) > t_quantile * math.sqrt(va + vb)


def test_verdict_equals_a_hand_computation(pair):
    moe, twin = pair
    v = verdict(moe, twin)
    assert v.flops_ratio == pytest.approx(1_000_000 / 1_010_000)
    assert v.step_time_ratio == pytest.approx((20.0 / 10) / (10.0 / 10))
    # Equal epochs: 3 (every run logged 3); best within 3 epochs = the final accuracies here.
    assert v.epochs == 3
    a, b = [90.0, 91.0, 90.5], [86.0, 86.5, 85.0]
    assert v.equal_epochs.diff == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert v.equal_epochs.beyond_noise is True and welch_beyond(a, b, 2.776)  # df ~ 3.4 -> t > 2.776
    # Its 95 % CI by hand: Welch-Satterthwaite df, t between the table's df = 3 and 4 entries.
    va, vb = 0.25 / 3, (sum((x - sum(b) / 3) ** 2 for x in b) / 2) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert 3 < df < 4
    assert v.equal_epochs.ci95 == pytest.approx((3.182 + (2.776 - 3.182) * (df - 3)) * math.sqrt(va + vb))
    # Equal time: the shortest run trained 30 s: the MoE finished 1 epoch by then, the twin 3.
    assert v.seconds == pytest.approx(30.0)
    a, b = [80.0, 81.0, 79.5], [86.0, 86.5, 85.0]
    assert [acc_within_time(r, 30.0) for r in moe.runs] == a
    assert acc_within_time(moe.runs[0], 39.0) == 80.0 and acc_within_time(moe.runs[0], 39.5) == 86.0  # 2 % past
    assert [acc_within_epochs(r, 1) for r in twin.runs] == [82.0, 82.5, 81.5]
    assert v.equal_time.diff == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert v.equal_time.beyond_noise is True and v.equal_time.text() == f"-5.67 ± {v.equal_time.ci95:.2f} (beyond noise)"
    assert 0 < v.equal_time.ci95 < 5.67


def test_one_seed_has_no_noise_estimate(pair):
    moe, twin = pair
    v = verdict(Group("moe", moe.runs[:1]), twin)
    assert v.equal_time.ci95 is None and v.equal_time.beyond_noise is None
    assert v.equal_time.text() == "-5.83 (noise unknown)"  # 80.0 against the twins' 86.0 / 86.5 / 85.0


def test_report_pairs_each_moe_with_the_dense_run_of_nearest_flops(pair, tmp_path):
    moe, twin = pair
    far = Group("far", [load_run(_write(tmp_path / "far0", "far", [95.0], 10.0, 2_000_000, False))])
    assert [(m.label, t.label) for m, t in nearest_twins([moe, far, twin])] == [("moe", "twin")]
    assert nearest_twins([moe, far]) == []  # 2x the FLOPs is no twin
    files = make_report([*moe.runs, *twin.runs], tmp_path / "rep")
    assert "Does the MoE pay? Against its dense twin:" in files.markdown
    row = next(line for line in files.markdown.splitlines() if line.startswith("| moe | twin |"))
    assert "+4.67 ± 1.58 (beyond noise) at 3 ep" in row and "-5.67 ± " in row and "| 2.00 |" in row
    for png in (files.vs_dense_png, files.vs_dense_gap_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in files.paths and png.name in files.markdown
    x, y, e = time_curve(moe)
    assert x == [20.0, 40.0, 60.0] and y == pytest.approx([sum(a[i] for a in MOE_ACCS) / 3 for i in range(3)])


def test_a_twin_is_trained_the_same_way(tmp_path):
    """Only the model may differ: a dense run of another time budget or learning rate is no twin,
    whatever its FLOPs; a setting that acts only on MoE layers does not count."""
    def group(name, flops, moe, config):
        return Group(name, [load_run(_write(tmp_path / name / "0", name, [80.0, 85.0], 10.0, flops, moe,
                                            config=config))])

    moe = group("moe", 1_000_000, True, "time_budget_s: 600\nmerge_every: 5\nfreeze_unrouted: true\n")
    short = group("short", 1_000_000, False, "time_budget_s: 120\n")
    other_lr = group("lr", 1_000_000, False, "time_budget_s: 600\nlr: 0.01\n")
    same = group("same", 1_030_000, False, "time_budget_s: 600\neval_batch_size: 500\n")  # not training
    assert nearest_twins([moe, short, other_lr]) == []
    assert [(m.label, t.label) for m, t in nearest_twins([moe, short, other_lr, same])] == [("moe", "same")]


def test_sweep_vs_dense_twin_leaves_moe_only_settings_off(tmp_path, capsys):
    base = ["sweep", "--out", str(tmp_path / "sw"), "--dataset", "digits", "--epochs", "1", "--seeds", "1",
            "--vs-dense", "--set", "model=random_vit", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
            "--set", "model.depth=1", "--set", "model.mlp_hidden=16", "--set", "model.head=linear", "--dry-run"]
    assert main([*base, "--set", "merge_every=5", "--set", "eval_mode=ensemble"]) == 0  # the twin refused merge_every=5
    lines = capsys.readouterr().out.strip().splitlines()
    twin = next(line for line in lines if "moe_layers=none" in line)
    assert twin.endswith("--set merge_every=0 --set eval_mode=null --seed 0 --out " + twin.split("--out ")[1])
    # Swept, such a setting makes two MoE cells but one twin (its 0 and the reset's 0.0 are one value).
    assert main([*base, "--grid", "consistency_weight=0,1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    twins = [line for line in lines if "moe_layers=none" in line]
    assert len(lines) == 3 and len(twins) == 1 and "--set consistency_weight=0 " in twins[0]


def test_sweep_vs_dense_adds_one_twin_per_distinct_dense_model(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--out", str(out), "--dataset", "digits", "--epochs", "1", "--seeds", "2", "--vs-dense",
            "--set", "model=switch_vit", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
            "--set", "model.depth=2", "--set", "model.mlp_hidden=32", "--set", "model.head=linear",
            "--set", "model.moe.router=topk",
            "--grid", "model.num_experts=2,4", "--grid", "model.moe.top_k=1,2", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cells = sorted({Path(line.split(":")[0]).parent.name for line in lines})
    # 4 MoE cells; their twins: one per k (the expert count says nothing about a dense model).
    assert len(lines) == (4 + 2) * 2 and len(cells) == 6
    twins = [c for c in cells if "moe_layers=none" in c]
    assert sorted(twins) == ["model.moe_layers=none_model.mlp_hidden=32", "model.moe_layers=none_model.mlp_hidden=64"]


def test_sweep_member_trains_one_member_and_reports_nothing(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--out", str(out), "--dataset", "digits", "--epochs", "1", "--seeds", "2",
            "--set", "model=vit", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
            "--set", "model.depth=1", "--set", "model.mlp_hidden=16", "--set", "model.head=linear"]
    assert main([*argv, "--member", "2"]) == 2
    assert "--member 2: the sweep has members 0 to 1" in capsys.readouterr().err
    assert main([*argv, "--member", "1"]) == 0
    assert (out / "base" / "seed-1" / "summary.json").is_file() and not (out / "base" / "seed-0").exists()
    assert not (out / "sweep.md").exists()
    assert main(argv) == 0  # the rest, then the report
    text = capsys.readouterr().out
    assert "seed 1: finished earlier, skipped" in text and (out / "sweep.md").is_file()
