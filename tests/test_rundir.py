"""vitmoe.rundir: one definition of the run directory, written by the trainer and read by the report."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_MC

from vitmoe import rundir
from vitmoe.data import ImageData, load_dataset
from vitmoe.report import load_run, results_table
from vitmoe.report import runs as report_runs
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.loop import trainer as trainer_module


def test_trainer_and_report_share_the_names_and_the_threshold_rule():
    for name in ("METRICS_FILE", "SUMMARY_FILE", "CONFIG_FILE", "IMAGES_60K", "DEFAULT_THRESHOLD", "RunFormatError"):
        assert getattr(report_runs, name) is getattr(rundir, name), name
    assert trainer_module.rundir is rundir and report_runs.epochs_to_threshold is rundir.epochs_to_threshold
    assert TrainConfig().threshold == rundir.DEFAULT_THRESHOLD
    # Percentages from integer counts: 3/4 of 100 images is 75 %, but float round-off may give less.
    rows = [{"epoch": 1, "test_acc": 74.9}, {"epoch": 2, "test_acc": 74.99999999999999}, {"epoch": 3, "test_acc": 80}]
    assert rundir.epochs_to_threshold(rows, 75.0) == 2 and rundir.epochs_to_threshold(rows, 80.1) is None
    assert rundir.reached(75.0 - 0.5 * rundir.THRESHOLD_EPS, 75.0) and not rundir.reached(float("nan"), 0.0)
    assert rundir.time_for_60k([1000.0, 3000.0, 2000.0, None, 0.0]) == 30.0  # the median 2000 img/s
    s = rundir.summarize(rows, 75.0)
    assert (s["best_acc"], s["best_epoch"], s["final_acc"], s["epochs_to_threshold"], s["epochs"]) == (80.0, 3, 80.0, 2, 3)


def test_rundir_imports_without_torch(monkeypatch, tmp_path):
    # Read a run with torch unimportable: the package itself (layout, records) must not need it.
    monkeypatch.setitem(sys.modules, "torch", None)
    spec = importlib.util.spec_from_file_location("rundir_alone", rundir.__file__,
                                                  submodule_search_locations=[str(Path(rundir.__file__).parent)])
    alone = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rundir_alone", alone)
    spec.loader.exec_module(alone)
    assert alone.records.__name__ == "rundir_alone.records"  # the copy, not the package imported with torch
    (tmp_path / alone.METRICS_FILE).write_text('{"epoch": 1, "test_acc": 50.0}\n{"epoch": 2, "test_acc": 76')
    warned = []
    assert alone.read_metrics(tmp_path / alone.METRICS_FILE, warned.append) == [{"epoch": 1, "test_acc": 50.0}]
    assert "truncated" in warned[0]


@pytest.fixture(scope="module")
def small_digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return ImageData(train.images[:200], train.labels[:200], train.info), ImageData(test.images[:90], test.labels[:90],
                                                                                    test.info)


def test_report_reads_what_the_trainer_writes(tmp_path, small_digits):
    cfg = TrainConfig(model="switch_vit", dataset="digits", epochs=2, batch_size=64, lr=3e-3, optimizer="adamw",
                      out=str(tmp_path / "run"), log_every=0, progress=False, model_config=dict(TINY_MC), threshold=10.0)
    res = Trainer(cfg, log=lambda m: None, train_data=small_digits[0], test_data=small_digits[1]).fit()
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.SUMMARY_FILE, "checkpoints"])
    s = json.loads((run_dir / rundir.SUMMARY_FILE).read_text())
    assert s == res.summary
    assert (s["dataset"], s["test_images"], s["epochs"], s["resume_schedule"]) == ("digits", 90, 2, "stretch")
    assert {k: s[k] for k in rundir.summarize(res.history, 10.0)} == rundir.summarize(res.history, 10.0)
    run = load_run(run_dir)
    assert run.complete and run.warnings == []
    assert (run.name, run.model, run.experts, run.dataset, run.test_images) == ("switch-vit", "switch_vit", 4, "digits", 90)
    assert (run.best_acc, run.best_epoch, run.epochs, run.train_time_60k_s) == (
        s["best_acc"], s["best_epoch"], 2, s["train_time_60k_s"])
    assert run.epochs_to(10.0) == s["epochs_to_threshold"] == rundir.epochs_to_threshold(res.history, 10.0)
    assert run.metrics == rundir.read_metrics(run_dir / rundir.METRICS_FILE) and len(run.metrics) == 2
    # Killed before summary.json: the report recomputes the same numbers from metrics.jsonl.
    (run_dir / rundir.SUMMARY_FILE).unlink()
    with pytest.warns(Warning, match="no summary.json"):
        partial = load_run(run_dir)
    assert (partial.best_acc, partial.best_epoch, partial.train_time_60k_s) == (
        s["best_acc"], s["best_epoch"], s["train_time_60k_s"])
    assert partial.epochs_to(10.0) == s["epochs_to_threshold"]
    assert partial.experts == 4  # from config.yaml's nested model_config (moe.router) or the loads
    assert "switch-vit" in results_table([run])
