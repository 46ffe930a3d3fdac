"""`vitmoe sweep` and the seed statistics behind it and behind `vitmoe report`."""
from __future__ import annotations

import json
import math
import os

import pytest

from vitmoe.cli.main import main
from vitmoe.report.groups import Group, groups_table
from vitmoe.report.runs import RunResult
from vitmoe.report.stats import differ, summarize, t975


def test_summary_matches_a_hand_computation():
    s = summarize([90.0, 91.0, 92.5])
    mean = (90.0 + 91.0 + 92.5) / 3
    std = math.sqrt(((90 - mean) ** 2 + (91 - mean) ** 2 + (92.5 - mean) ** 2) / 2)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(std))
    assert s.ci95 == pytest.approx(4.303 * std / math.sqrt(3))  # t_{0.975, 2} = 4.303
    assert s.text() == f"{mean:.2f} ± {4.303 * std / math.sqrt(3):.2f}"
    one = summarize([88.0])
    assert one.std == 0 and math.isnan(one.ci95) and one.text() == "88.00"
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(200) == 1.96
    assert t975(2.5) == pytest.approx((4.303 + 3.182) / 2)


def test_welch_test_separates_noise_from_a_difference():
    assert differ([90.0, 90.2, 89.9], [90.1, 89.8, 90.3]) is False
    assert differ([90.0, 90.2, 89.9], [92.0, 92.2, 91.9]) is True
    assert differ([90.0], [92.0, 92.1]) is None
    # Welch by hand for a=[1,2,3], b=[3,4,5]: |diff| 2, se sqrt(1/3 + 1/3), df 4 -> t 2.776: 2 < 2.776 * 0.8165
    assert differ([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) is False
    assert differ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) is True  # 3 > 2.2666


def _run(name, accs, seed):
    return RunResult(path=f"/x/{name}/{seed}", name=name, best_acc=accs, params=10, active_params=5,
                     config={"model": name, "seed": seed}, summary={"final_acc": accs - 1})


def test_groups_table_states_mean_ci_and_noise():
    a = Group("a", [_run("a", v, i) for i, v in enumerate([90.0, 91.0, 92.5])])
    b = Group("b", [_run("b", v, i) for i, v in enumerate([90.5, 91.5, 92.0])])
    text = groups_table([a, b])
    s = summarize([90.0, 91.0, 92.5])
    assert f"| a | 3 | {s.mean:.2f} ± {s.ci95:.2f} | {s.mean - 1:.2f} ± {s.ci95:.2f} |" in text
    assert "b vs a: best accuracy differs within the seed-to-seed noise" in text


TINY = ["--set", "model.depth=1", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
        "--set", "model.mlp_hidden=16", "--set", "model.head=linear", "--set", "batch_size=256",
        "--set", "lr=0.003", "--set", "model=switch_vit"]


@pytest.mark.slow
def test_sweep_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--out", str(out), "--grid", "model.num_experts=2", "--seeds", "2", "--dataset", "digits",
            "--epochs", "1", *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| model.num_experts=2 | 2 |" in text
    rows = json.loads((out / "sweep_results.json").read_text())
    assert [r["cell"] for r in rows] == [{"model.num_experts": "2"}]
    for r in rows:
        vals = r["best_acc"]["values"]
        assert r["best_acc"]["mean"] == pytest.approx(sum(vals) / 2) and len(vals) == 2
    assert (out / "sweep.png").stat().st_size > 0

    # "Kill" one member: its summary is one from an epoch before its last (the trainer rewrites it
    # every epoch); the others must be skipped, untouched.
    finished = out / "model.num_experts=2" / "seed-0" / "summary.json"
    stamp = finished.stat().st_mtime_ns
    killed = out / "model.num_experts=2" / "seed-1" / "summary.json"
    killed.write_text(json.dumps(dict(json.loads(killed.read_text()), epochs=0)))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("finished earlier, skipped") == 1 and "[2/2] model.num_experts=2 seed 1: resuming" in text
    assert finished.stat().st_mtime_ns == stamp
    assert json.loads(killed.read_text())["epochs"] == 1

    # The same runs through `vitmoe report`: seeds of one configuration get mean ± CI columns.
    runs = [str(out / "model.num_experts=2" / f"seed-{s}") for s in (0, 1)]
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    assert "Configurations over their seeds" in capsys.readouterr().out

    assert main([*argv[:6], "3", *argv[7:]]) == 2  # another plan (3 seeds) in the same folder
    assert "holds another sweep" in capsys.readouterr().err


def test_sweep_checks_every_member_before_training(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["sweep", "--out", str(out), "--grid", "model.moe.top_k=1,9", "--seeds", "1", "--dataset", "digits",
                 "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "sweep member model.moe.top_k=9" in err and "top_k" in err
    assert not out.exists() or not any(os.scandir(out))


def test_grid_words_of_true_false_fields_and_of_choice_fields():
    from vitmoe.cli.sweep import parse_grid

    # augment=on,off is the same plan it was under YAML 1.1 (sweep.json of an older sweep still matches)
    assert parse_grid(["augment=on,off"]) == {"augment": ["true", "false"]}
    # amp's "off" is a choice, not a boolean: it stays the string a member's config takes
    grid = parse_grid(["amp=off,bf16"])
    assert grid == {"amp": ["'off'", "bf16"]}
    from vitmoe.readers import yaml_value
    assert [yaml_value(v, "t") for v in grid["amp"]] == ["off", "bf16"]
