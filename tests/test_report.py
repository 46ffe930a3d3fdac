"""vitmoe.report: run loading, the results table, figures and make_report."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitmoe.report import (ReportFiles, ReportWarning, RunFormatError, expert_load_matrix,
                           load_run, make_report, plot_accuracy, plot_expert_load, results_table)
from vitmoe.fileio import atomic_write
from vitmoe.report.table import column_notes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = ("| model | dataset | experts | size | active params | highest acc (epoch) | test images | t_epoch "
          "| Training Time (60,000 images) | Inference Time (60,000 images) |")
ALIGN = "|---|:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:|"
VIT_ROW = "| vit | fashion-mnist | - | 12,798,490 | 12,798,490 | 81.36 (345) | n/a | 31 | 11.80 | 4.60 |"
MOE_ROW = "| switch-vit | fashion-mnist | 4 | 238,732,426 | 59,683,106 | 79.04 (321) | n/a | 33 | 68.86 | 4.98 |"


# -- fixtures ---------------------------------------------------------------------------
def write_run(root: Path, *, summary=None, metrics=None, config=None, raw_metrics=None) -> Path:
    root.mkdir(parents=True)
    if config is not None:
        (root / "config.yaml").write_text(config)
    if metrics is not None:
        (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if raw_metrics is not None:
        (root / "metrics.jsonl").write_text(raw_metrics)
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return root


def epoch_rec(epoch, test_acc, *, load=None, ips=2000.0, t=30.0):
    rec = {"epoch": epoch, "step": 100 * epoch, "lr": 1e-3, "train_loss": 1.0 / epoch,
           "train_acc": test_acc + 1.0, "test_loss": 1.2 / epoch, "test_acc": test_acc,
           "epoch_time_s": t, "images_per_s": ips, "aux_loss": 0.0 if load is None else 0.01}
    if load is not None:
        rec["expert_load"] = load
        rec["dropped_frac"] = {k: 0.0 for k in load}
    return rec


DENSE_CONFIG = """\
model: vit
dataset: fashion_mnist
epochs: 3
model_config:
  router: null
  num_experts: 1
  depth: 4
  embed_dim: 64
"""
MOE_CONFIG = """\
model: switch_vit
dataset: fashion_mnist
epochs: 3
model_config:
  router: switch
  num_experts: 4
  depth: 4
  embed_dim: 64
"""
# 3 MoE layers (inserted out of natural order on purpose); last epoch's loads are used
LOAD_E1 = {"blocks.1.mlp": [25, 25, 25, 25], "blocks.3.mlp": [25, 25, 25, 25],
           "blocks.10.mlp": [25, 25, 25, 25]}
LOAD_E3 = {"blocks.10.mlp": [0, 0, 50, 50], "blocks.1.mlp": [10, 30, 40, 20],
           "blocks.3.mlp": [1, 1, 1, 1]}


def summary(name, model, experts, params, best_acc, best_epoch, ett, t60, i60, **kw):
    s = {"name": name, "model": model, "experts": experts, "params": params,
         "active_params": params if experts is None else params // 4, "best_acc": best_acc,
         "best_epoch": best_epoch, "threshold": 75.0, "epochs_to_threshold": ett,
         "train_time_s": 1000.0, "time_per_epoch_s": 30.0, "train_time_60k_s": t60,
         "inference_time_60k_s": i60, "epochs": 3, "dataset": "fashion_mnist"}
    s.update(kw)
    return s


@pytest.fixture
def dense_dir(tmp_path):
    return write_run(
        tmp_path / "runs" / "vit", config=DENSE_CONFIG,
        metrics=[epoch_rec(1, 60.0), epoch_rec(2, 74.9), epoch_rec(3, 75.0)],
        summary=summary("vit", "vit", None, 12_798_490, 81.36, 345, 31, 11.8, 4.6))


@pytest.fixture
def moe_dir(tmp_path):
    return write_run(
        tmp_path / "runs" / "switch-vit", config=MOE_CONFIG,
        metrics=[epoch_rec(1, 50.0, load=LOAD_E1), epoch_rec(2, 76.0, load=LOAD_E1),
                 epoch_rec(3, 79.0, load=LOAD_E3)],
        summary=summary("switch-vit", "switch_vit", 4, 238_732_426, 79.04, 321, 33,
                        68.86, 4.98))


def killed_dir(tmp_path, accs, name="vit-killed", ips=2000.0):
    return write_run(tmp_path / "runs" / name, config=DENSE_CONFIG,
                     metrics=[epoch_rec(i + 1, a, ips=ips) for i, a in enumerate(accs)])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def no_tmp_files(d: Path) -> bool:
    return not [p for p in os.listdir(d) if p.endswith(".tmp")]


# -- loading ----------------------------------------------------------------------------
def test_load_run_complete(dense_dir, moe_dir):
    vit = load_run(dense_dir)
    assert (vit.name, vit.model, vit.experts, vit.params, vit.complete) == (
        "vit", "vit", None, 12_798_490, True)
    assert (vit.best_acc, vit.best_epoch, vit.epochs_to(75.0)) == (81.36, 345, 31)
    assert vit.is_moe is False and vit.epochs_logged == [1, 2, 3]
    assert vit.test_accs == [60.0, 74.9, 75.0] and vit.warnings == []
    moe = load_run(str(moe_dir))
    assert (moe.name, moe.model, moe.experts, moe.active_params) == (
        "switch-vit", "switch_vit", 4, 238_732_426 // 4)
    assert moe.is_moe is True and moe.inference_time_60k_s == 4.98


def test_missing_directory_or_files_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_run(missing)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text(DENSE_CONFIG)  # config alone is not a run
    with pytest.raises(FileNotFoundError) as exc:
        load_run(empty)
    assert str(empty) in str(exc.value)
    assert "summary.json" in str(exc.value) and "metrics.jsonl" in str(exc.value)


@pytest.mark.filterwarnings("ignore:.*no summary.json")
def test_truncated_last_line_is_ignored_with_warning(tmp_path):
    good = "".join(json.dumps(epoch_rec(i, a)) + "\n" for i, a in [(1, 60.0), (2, 74.9), (3, 75.0)])
    run_dir = write_run(tmp_path / "r", raw_metrics=good + '{"epoch": 4, "test_a\n\n')
    with pytest.warns(ReportWarning, match=r"metrics\.jsonl:4: ignoring truncated last line"):
        run = load_run(run_dir)
    assert run.epochs_logged == [1, 2, 3]
    assert run.complete is False and run.epochs_to(75.0) == 3
    assert any("truncated" in w for w in run.warnings)


def test_malformed_middle_line_raises_naming_file_and_line(tmp_path):
    lines = [json.dumps(epoch_rec(1, 60.0)), '{"epoch": 2, "test_acc": 7', json.dumps(epoch_rec(3, 75.0))]
    run_dir = write_run(tmp_path / "r", raw_metrics="\n".join(lines) + "\n")
    with pytest.raises(RunFormatError) as exc:
        load_run(run_dir)
    msg = str(exc.value)
    assert str(run_dir / "metrics.jsonl") + ":2:" in msg and "malformed JSON" in msg


def test_middle_line_missing_required_key_raises(tmp_path):
    lines = [json.dumps(epoch_rec(1, 60.0)), json.dumps({"epoch": 2, "train_acc": 70.0}),
             json.dumps(epoch_rec(3, 75.0))]
    run_dir = write_run(tmp_path / "r", raw_metrics="\n".join(lines) + "\n")
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:2: missing required key 'test_acc'"):
        load_run(run_dir)


def test_malformed_summary_names_file(tmp_path):
    run_dir = write_run(tmp_path / "r", metrics=[epoch_rec(1, 60.0)])
    (run_dir / "summary.json").write_text('{"name": "x",\n "params": }')
    with pytest.raises(RunFormatError, match=r"summary\.json:2: malformed JSON"):
        load_run(run_dir)


@pytest.mark.filterwarnings("ignore:.*no summary.json")
def test_resumed_run_relogged_epoch_keeps_later_record(tmp_path):
    recs = [epoch_rec(1, 60.0), epoch_rec(2, 70.0), epoch_rec(2, 76.0), epoch_rec(3, 77.0)]
    run_dir = write_run(tmp_path / "r", metrics=recs)
    with pytest.warns(ReportWarning, match="epoch 2 logged again"):
        run = load_run(run_dir)
    assert run.epochs_logged == [1, 2, 3] and run.test_accs == [60.0, 76.0, 77.0]
    assert run.epochs_to(75.0) == 2


# -- summary.json absent: recompute from metrics ------------------------------------------
def test_incomplete_run_computes_from_metrics(tmp_path):
    with pytest.warns(ReportWarning, match="no summary.json"):
        run = load_run(killed_dir(tmp_path, [60.0, 74.9, 75.0]))
    assert run.complete is False and run.name == "vit-killed" and run.model == "vit"
    assert run.experts is None and run.dataset == "fashion_mnist" and run.epochs == 3
    assert (run.best_acc, run.best_epoch) == (75.0, 3)
    assert run.epochs_to(75.0) == 3 and run.epochs_to(74.9) == 2 and run.epochs_to(60.0) == 1
    assert run.time_per_epoch_s == pytest.approx(30.0) and run.train_time_s == pytest.approx(90.0)
    assert run.train_time_60k_s == pytest.approx(30.0)  # 60,000 images at 2,000 img/s
    assert run.params is None and run.inference_time_60k_s is None


def test_incomplete_rows_in_table(tmp_path):
    with pytest.warns(ReportWarning):
        reached = load_run(killed_dir(tmp_path, [60.0, 74.9, 75.0]))
        never = load_run(killed_dir(tmp_path, [60.0, 70.0, 74.99], name="never", ips=1500.0))
    assert never.epochs_to(75.0) is None
    assert results_table([reached, never]) == "\n".join([
        HEADER, ALIGN,
        "| vit-killed (incomplete) | fashion-mnist | - | n/a | n/a | 75.00 (3) | n/a | 3 | 30.00 | n/a |",
        "| never (incomplete) | fashion-mnist | - | n/a | n/a | 74.99 (3) | n/a | - | 40.00 | n/a |",
        "",
        "- vit-killed (incomplete): no summary.json; values computed from metrics.jsonl (3 epochs logged).",
        "- never (incomplete): no summary.json; values computed from metrics.jsonl (3 epochs logged).",
        "", "Columns:", "", *column_notes(75.0),
    ]) + "\n"
    # the threshold passed to the table is the one used for runs without a summary
    assert "| never (incomplete) | fashion-mnist | - | n/a | n/a | 74.99 (3) | n/a | 2 | 40.00 | n/a |" in results_table(
        [never], threshold=70.0)


def test_incomplete_moe_run_experts_from_config(tmp_path):
    run_dir = write_run(tmp_path / "moe-killed", config=MOE_CONFIG,
                        metrics=[epoch_rec(1, 50.0, load=LOAD_E1)])
    with pytest.warns(ReportWarning):
        run = load_run(run_dir)
    assert run.experts == 4 and run.is_moe and run.name == "moe-killed"
    assert ("| moe-killed (incomplete) | fashion-mnist | 4 | n/a | n/a | 50.00 (1) | n/a | - | 30.00 | n/a |"
            in results_table([run]))


# -- the table ----------------------------------------------------------------------------
def test_results_table_exact(dense_dir, moe_dir):
    runs = [load_run(dense_dir), load_run(moe_dir)]
    notes = "\n".join(["", "Columns:", "", *column_notes(75.0)]) + "\n"
    assert results_table(runs) == f"{HEADER}\n{ALIGN}\n{VIT_ROW}\n{MOE_ROW}\n{notes}"
    # deterministic, and the given order is kept
    assert results_table(runs) == results_table([dense_dir, moe_dir])
    assert results_table(runs[::-1]) == f"{HEADER}\n{ALIGN}\n{MOE_ROW}\n{VIT_ROW}\n{notes}"


def test_table_threshold_other_than_summary_recomputes_from_metrics(dense_dir, tmp_path):
    vit = load_run(dense_dir)
    assert ("| vit | fashion-mnist | - | 12,798,490 | 12,798,490 | 81.36 (345) | n/a | 2 | 11.80 | 4.60 |"
            in results_table([vit], threshold=70.0))
    # no metrics and a different threshold: unknown, not "never reached"
    only_summary = write_run(tmp_path / "s", summary=summary("s", "vit", None, 10, 80.0, 5, 4, 1.0, 0.5))
    run = load_run(only_summary)
    assert "| s | fashion-mnist | - | 10 | 10 | 80.00 (5) | n/a | 4 | 1.00 | 0.50 |" in results_table([run])
    assert "| s | fashion-mnist | - | 10 | 10 | 80.00 (5) | n/a | n/a | 1.00 | 0.50 |" in results_table([run], threshold=70.0)


def test_table_escapes_pipes_and_formats_null_threshold(tmp_path):
    s = summary("a|b", "switch_vit", [8, 8, 16], 1234, 70.5, 7, None, 2.346, 0.124)
    run = load_run(write_run(tmp_path / "p", summary=s))
    assert results_table([run]).splitlines()[2] == ("| a\\|b | fashion-mnist | 8/16 | 1,234 | 308 | 70.50 (7) | n/a | - "
                                                   "| 2.35 | 0.12 |")


# -- figures ------------------------------------------------------------------------------
def test_expert_load_matrix(moe_dir):
    names, mat = expert_load_matrix(load_run(moe_dir))
    assert names == ["blocks.1.mlp", "blocks.3.mlp", "blocks.10.mlp"]  # natural order
    assert mat.shape == (3, 4) and mat.dtype == np.float64
    np.testing.assert_allclose(mat.sum(axis=1), 1.0)
    np.testing.assert_allclose(mat, [[0.1, 0.3, 0.4, 0.2], [0.25] * 4, [0.0, 0.0, 0.5, 0.5]])


def test_expert_load_matrix_pads_differing_expert_counts(tmp_path):
    load = {"blocks.1.mlp": [1, 3], "blocks.3.mlp": [2, 2, 2, 2]}
    run_dir = write_run(tmp_path / "mixed", metrics=[epoch_rec(1, 70.0, load=load)],
                        summary=summary("mixed", "random_vit", [2, 4], 99, 70.0, 1, None, 1.0, 1.0))
    run = load_run(run_dir)
    assert run.experts == (2, 4)
    names, mat = expert_load_matrix(run)
    assert names == ["blocks.1.mlp", "blocks.3.mlp"] and mat.shape == (2, 4)
    assert np.isnan(mat[0, 2:]).all() and not np.isnan(mat[1]).any()
    np.testing.assert_allclose(np.nansum(mat, axis=1), 1.0)
    np.testing.assert_allclose(mat[0, :2], [0.25, 0.75])
    out = plot_expert_load(run, tmp_path / "mixed.png")
    assert out == tmp_path / "mixed.png" and png_size(out)[0] > 100


def test_dense_run_has_no_heatmap(dense_dir, tmp_path):
    vit = load_run(dense_dir)
    with pytest.raises(ValueError, match="no expert_load"):
        expert_load_matrix(vit)
    assert plot_expert_load(vit, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_plots_are_valid_pngs(dense_dir, moe_dir, tmp_path):
    runs = [load_run(dense_dir), load_run(moe_dir)]
    out = tmp_path / "figs"
    acc = plot_accuracy(runs, out / "acc.png")
    heat = plot_expert_load(runs[1], out / "heat.png")
    for p in (acc, heat):
        w, h = png_size(p)
        assert w >= 300 and h >= 200 and p.stat().st_size > 5000
    assert no_tmp_files(out)


def test_make_report(dense_dir, moe_dir, tmp_path):
    out = tmp_path / "report" / "nested"
    files = make_report([dense_dir, moe_dir], out)
    assert isinstance(files, ReportFiles)
    assert files.results_md == out / "results.md"
    assert files.accuracy_png == out / "accuracy.png"
    assert files.expert_load_pngs == {"switch-vit": out / "expert_load_switch-vit.png"}
    assert sorted(os.listdir(out)) == ["accuracy.png", "expert_load_switch-vit.png", "results.md"]
    text = files.results_md.read_text()
    assert text == files.markdown
    assert text.startswith(f"{HEADER}\n{ALIGN}\n{VIT_ROW}\n{MOE_ROW}\n\n")
    assert "reached 75 %" in text and "![test accuracy per epoch](accuracy.png)" in text
    assert "(expert_load_switch-vit.png)" in text
    assert files.paths == [files.results_md, files.accuracy_png, *files.expert_load_pngs.values()]
    for p in files.paths[1:]:
        assert p.stat().st_size > 5000
    for p in (files.accuracy_png, *files.expert_load_pngs.values()):
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert no_tmp_files(out)
    # re-running overwrites in place and is deterministic for the markdown
    again = make_report([dense_dir, moe_dir], out)
    assert again.markdown == files.markdown and no_tmp_files(out)


def test_make_report_duplicate_names_and_incomplete(moe_dir, tmp_path):
    other = write_run(tmp_path / "runs2" / "switch-vit", config=MOE_CONFIG,
                      metrics=[epoch_rec(1, 76.0, load=LOAD_E3)])
    with pytest.warns(ReportWarning):
        files = make_report([moe_dir, other], tmp_path / "out", threshold=76.0)
    assert list(files.expert_load_pngs) == ["switch-vit", "switch-vit_2"]
    assert (tmp_path / "out" / "expert_load_switch-vit_2.png").is_file()
    # two runs of one name: each row says which run it is (the end of its path)
    assert ("| switch-vit (runs2/switch-vit) (incomplete) | fashion-mnist | 4 | n/a | n/a | 76.00 (1) | n/a | 1 | 30.00 "
            "| n/a |" in files.markdown)
    assert ("| switch-vit (runs/switch-vit) | fashion-mnist | 4 | 238,732,426 | 59,683,106 | 79.04 (321) | n/a | 2 "
            "| 68.86 | 4.98 |" in files.markdown)


def test_make_report_requires_runs(tmp_path):
    with pytest.raises(ValueError):
        make_report([], tmp_path)


def test_atomic_write_failure_leaves_nothing(tmp_path):
    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.png", boom)
    assert os.listdir(tmp_path) == []


def test_import_does_not_load_matplotlib():
    # Plotting is optional work; `vitmoe report` and the trainer import this package eagerly.
    code = "import sys, vitmoe.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_field_added_later_at_its_default_is_the_same_configuration(tmp_path):
    """A run written before a TrainConfig field existed (its config.yaml lacks it) groups with runs
    that hold the field at its default, and an execution setting (max_restarts) never splits a
    configuration; a field at another value does."""
    from vitmoe.report.groups import group_runs

    base = "model: vit\ndataset: digits\nlr: 0.01\n"
    runs = []
    for i, extra in enumerate(["", "max_restarts: 0\nfolder_resize: stretch\nbetas: [0.9, 0.999]\n",
                               "max_restarts: 3\nresolved_model_config: {embed_dim: 16}\n", "folder_resize: crop\n"]):
        d = write_run(tmp_path / f"r{i}", config=base + f"seed: {i}\n" + extra,
                      summary=summary("vit", "vit", None, 1000, 90.0 + i, 1, None, 1.0, 1.0),
                      metrics=[epoch_rec(1, 90.0 + i)])
        runs.append(load_run(d))
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [3, 1]
    assert [g.label for g in groups] == ["vit (folder_resize=stretch)", "vit (folder_resize=crop)"]


def test_labels_name_the_nested_settings_that_differ(tmp_path):
    """Two MoE cells of one preset that differ inside model_config are labelled by the differing
    settings spelled as --set takes them, not by a cut-off dump of the nested dict."""
    from vitmoe.report.groups import group_runs

    runs = []
    for i, (layers, experts) in enumerate([("all", 8), ("last:1", 4), ("all", 8)]):
        cfg = (f"model: vit\ndataset: digits\nseed: {i}\nmodel_config:\n  moe: {{router: switch, top_k: 1}}\n"
               f"  moe_layers: '{layers}'\n  num_experts: {experts}\n")
        d = write_run(tmp_path / f"r{i}", config=cfg, summary=summary("vit", "vit", None, 1000, 90.0, 1, None, 1.0, 1.0),
                      metrics=[epoch_rec(1, 90.0)])
        runs.append(load_run(d))
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["vit (model.moe_layers=all, model.num_experts=8)",
                                         "vit (model.moe_layers=last:1, model.num_experts=4)"]


def test_a_model_field_left_to_the_preset_is_labelled_with_the_value_it_took(tmp_path):
    """A run that did not set the field the other configuration changed is labelled with the
    preset's value it trained with (its resolved_model_config), not `None`."""
    from vitmoe.report.groups import group_runs

    runs = []
    for i, (own, resolved) in enumerate([("", 0.1), ("model_config: {attn_drop_rate: 0.0}\n", 0.0)]):
        cfg = (f"model: cct_2_3x2\ndataset: digits\nseed: {i}\n{own}"
               f"resolved_model_config: {{attn_drop_rate: {resolved}, moe: {{router: switch}}}}\n")
        d = write_run(tmp_path / f"r{i}", config=cfg, summary=summary("cct", "cct_2_3x2", None, 1000, 90.0, 1, None, 1.0, 1.0),
                      metrics=[epoch_rec(1, 90.0)])
        runs.append(load_run(d))
    assert [g.label for g in group_runs(runs)] == ["cct (model.attn_drop_rate=0.1)", "cct (model.attn_drop_rate=0.0)"]
