"""What a new user met on first use (issue 23's list), each held here: the demo keeps earlier
results when it cannot run, no deprecation warning of vitmoe's own making, dead-expert warnings
that say something, distinct run names and the run's own threshold in reports, the precision
eval used, plural grammar, a missing path named as such, MoEMlp on [..., dim] inputs, help text."""
from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS

import vitmoe
from vitmoe.cli.main import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("extra", [["--time-budget", "1"], []], ids=["comparison", "recipe"])
def test_demo_keeps_earlier_results_when_its_data_is_missing(tmp_path, monkeypatch, capsys, extra):
    from vitmoe.cli.demo import MARKER
    from vitmoe.data import download, fashion_mnist

    def no_network(url, *a, **k):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(download, "urlopen", no_network)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("DATA", raising=False)
    out = tmp_path / "demo_runs"
    for name in ("report", "vit", "cct_2_3x2"):  # an earlier demo's results
        (out / name).mkdir(parents=True)
        (out / name / "kept.txt").write_text("earlier")
    (out / MARKER).write_text(json.dumps({"made": ["report", "vit", "cct_2_3x2"]}))
    assert main(["demo", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(out),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitmoe: error: ") and err.count("\n") == 1 and "fashion" in err.lower()
    assert all((out / n / "kept.txt").read_text() == "earlier" for n in ("report", "vit", "cct_2_3x2"))


def test_cli_emits_no_deprecation_warning_of_its_own(tmp_path, capsys):
    import warnings

    from vitmoe.cli.demo import FAMILIES, demo_config

    from conftest import TINY_DIGITS

    run = tmp_path / "rv.safetensors"
    vitmoe.save_model(vitmoe.create_model("random_vit", **TINY_DIGITS), run, metadata={"dataset": "digits"})
    for mode in ("ensemble", "random"):  # eval --mode used the deprecated flat spelling eval_mode=
        assert main(["eval", str(run), "--mode", mode, "--device", "cpu"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for family in FAMILIES:  # the demo's families spelled eval_mode flat too
            demo_config(family, "digits", tmp_path / "d", 1)
    captured = capsys.readouterr()
    assert "warning" not in captured.err, captured.err
    # eval names the mode (only randomly routed models have one) and the precision it used
    assert "eval mode ensemble" in captured.out and "float32" in captured.out


def test_dead_expert_warnings_only_for_learned_routers_whole_epochs_and_once():
    from vitmoe.training.loop.dead_experts import DeadExpertNotes

    switch = DeadExpertNotes(vitmoe.models.model_config("switch_vit", num_experts=4))
    seq = [{"b.1": [10, 10, 10, 0]}, {"b.1": [10, 10, 10, 0]}, {"b.1": [10, 10, 10, 1]},
           {"b.1": [10, 10, 10, 0], "b.3": [0, 40, 0, 0]}, {"b.1": [1, 1, 1, 0.5]}, {"b.1": [40, 0, 0, 0]}]
    notes = [switch.note(e + 1, load) for e, load in enumerate(seq)]
    assert notes[0] and "b.1 [3]" in notes[0] and "epoch 1" in notes[0]
    assert notes[1] is None                   # the same dead expert: said once
    assert notes[2] is None                   # one token is not idle (a small share is analyze's business)
    assert notes[3] and "b.1 [3]; b.3 [0, 2, 3]" in notes[3]   # dead again, and a new layer: said again
    assert notes[4] is None and notes[5] and "b.1 [1, 2, 3]" in notes[5]
    random = DeadExpertNotes(vitmoe.models.model_config("random_vit", num_experts=4))
    assert all(random.note(e, load) is None for e, load in enumerate(seq))
    assert DeadExpertNotes(vitmoe.models.model_config("vit")).note(1, None) is None


def test_random_routing_runs_log_no_dead_experts(digits512, tmp_path):
    """Batch-granular random routing, 4 experts, 2 steps an epoch: some expert gets no step every
    epoch by chance, which used to be a warning per layer per epoch."""
    from conftest import TINY_MC

    from vitmoe.training import TrainConfig, train

    lines: list[str] = []
    cfg = TrainConfig(model="random_vit", dataset="digits", epochs=3, batch_size=256, device="cpu",
                      out=str(tmp_path / "rv"), model_config=dict(TINY_MC), log_every=0)
    train(cfg, log=lines.append, train_data=digits512[0], test_data=digits512[1])
    rows = [json.loads(line) for line in (tmp_path / "rv" / "metrics.jsonl").read_text().splitlines()]
    assert any(0 in load for row in rows for load in row["expert_load"].values())  # experts did go without tokens
    assert not [line for line in lines if "dead" in line]


def test_report_tells_runs_of_one_preset_apart_and_draws_their_thresholds(tmp_path, capsys):
    from vitmoe.report import load_run, make_report
    from vitmoe.report.plots import threshold_lines
    from vitmoe.report.runs import distinct_labels

    runs = []
    for name, threshold in (("a", 90.0), ("b", 75.0)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_acc": acc}) + "\n"
                                                 for e, acc in ((1, 80.0), (2, 91.0))))
        (d / "summary.json").write_text(json.dumps({"name": "vit", "threshold": threshold, "best_acc": 91.0,
                                                    "best_epoch": 2, "epochs_to_threshold": 2 if threshold > 80 else 1}))
        runs.append(d)
    loaded = [load_run(r) for r in runs]
    labels = distinct_labels(loaded)
    assert labels == ["vit (a)", "vit (b)"]
    assert threshold_lines(loaded, labels, None) == {75.0: ["vit (b)"], 90.0: ["vit (a)"]}
    assert threshold_lines(loaded, labels, 80.0) == {80.0: labels}
    files = make_report(runs, tmp_path / "report")
    rows = [line for line in files.markdown.splitlines() if line.startswith("| vit")][:2]  # the results table
    assert [r.split(" | ")[0] for r in rows] == ["| vit (a)", "| vit (b)"]
    assert [r.split(" | ")[7] for r in rows] == ["2", "1"]   # t_epoch at each run's own threshold
    assert "reached the run's own threshold (vit (a): 90 %, vit (b): 75 %)" in files.markdown
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r2"), "--threshold", "85"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| vit")][:2]
    assert "reached 85 %" in out and [r.split(" | ")[7] for r in rows] == ["2", "2"]


def test_eval_uses_and_reports_the_runs_precision(tmp_path, capsys):
    run = tmp_path / "bf"
    assert main(["train", "--model", "vit", "--dataset", "digits", "--epochs", "1", "--batch", "512", "--amp", "bf16",
                 "--out", str(run), "--device", "cpu", *TINY_SETS]) == 0
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["amp"] == "bf16" and r["test_acc"] == pytest.approx(logged)  # what the training log measured
    assert main(["eval", str(run), "--amp", "off", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["amp"] == "off"
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert "bf16 autocast as the run trained (--amp to change)" in capsys.readouterr().out


def test_one_step_per_epoch_is_singular(tmp_path, capsys):
    assert main(["train", "--model", "vit", "--dataset", "digits", "--epochs", "1", "--batch", "2000",
                 "--out", str(tmp_path / "r"), "--device", "cpu", *TINY_SETS]) == 0
    out = capsys.readouterr().out
    assert "1 step/epoch" in out and "1 steps" not in out


def test_info_of_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'nope'} does not exist" in err and "preset" in err
    (tmp_path / "f.txt").write_text("x")
    assert main(["info", str(tmp_path / "f.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["info", "vitt"]) == 2
    assert "unknown model preset 'vitt'" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["switch", "topk", "random", "expert_choice", "soft"])
def test_moe_layers_take_any_leading_shape_like_linear(router):
    cls = vitmoe.SoftMoE if router == "soft" else vitmoe.MoEMlp
    kw = {} if router == "soft" else {"router": router}
    if router == "expert_choice":
        kw.update(capacity_factor_train=1.0, capacity_factor_eval=1.0)
    m = cls(12, 20, num_experts=4, **kw).eval()
    x = torch.randn(2, 3, 5, 12)
    with torch.no_grad():
        as_images = m(x.reshape(6, 5, 12)).reshape(2, 3, 5, 12)
        torch.testing.assert_close(m(x), as_images, rtol=0, atol=0)   # [A, B, N, D]: A*B images
        torch.testing.assert_close(m(x[0, 0]), m(x[0, 0][None])[0], rtol=0, atol=0)  # [T, D]: one sequence
        assert m(x[0, 0]).shape == (5, 12)
    with pytest.raises(ValueError, match=r"\[\.\.\., dim\]"):
        m(torch.randn(12))


def test_help_texts_show_percent_signs_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps at the terminal's width
    for argv in (["sweep", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "95%%" not in out and "95%" in out


def test_readme_list_models_comment_is_true():
    names = vitmoe.list_models()
    line = next(line for line in README.splitlines() if line.startswith("vitmoe.list_models()"))
    shown = re.findall(r"'([a-z0-9_]+)'", line)
    assert shown == [n for n in names if n in shown] and shown[0] == names[0] and shown[-1] == names[-1]
    assert f"all {len(names)}, sorted" in line and names == sorted(names)


def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C) to a real `vitmoe train` process after its first checkpoint: exit 130 with one
    line naming the newest checkpoint and the resume command, which then continues the run."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitmoe", "train", "--dataset", "digits", "--model", "vit", "--epochs", "100000",
           "--device", "cpu", "--out", str(run), *TINY_SETS]
    # A shell that starts a job in the background (CI runners do) ignores SIGINT for it, children
    # inherit that, and Python then leaves Ctrl-C ignored. A handled signal is reset to its default
    # by exec, so with one here the trainer starts as a terminal's foreground process does (conftest
    # puts this process's handler back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((run / "checkpoints").glob("epoch-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"vitmoe: interrupted; {re.escape(str(run))} keeps its checkpoints up to epoch-(\d+); "
                        rf"continue it with `vitmoe train --resume {re.escape(str(run))}`", last), last
    done = int(re.search(r"epoch-(\d+)", last).group(1))
    assert main(["train", "--resume", str(run), "--epochs", str(done + 1)]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == done + 1


def test_eval_shows_progress_on_a_terminal(tiny_run, monkeypatch, capsys):
    """`vitmoe eval` draws a tqdm bar on stderr when it is a terminal, and nothing extra otherwise."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert main(["eval", str(tiny_run)]) == 0
    assert "evaluating" not in capsys.readouterr().err
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["eval", str(tiny_run)]) == 0
    assert "evaluating" in term.getvalue() and "batch" in term.getvalue()


def test_analysis_figures_say_what_their_colours_mean(tmp_path, monkeypatch):
    """The position maps share one colour bar; the tinted images carry a legend of every expert's
    colour (and grey for dropped tokens)."""
    import numpy as np

    from vitmoe.report import analysis_plots as ap

    figs = []
    monkeypatch.setattr(ap, "_save", lambda fig, path: figs.append(fig) or path)
    ap.plot_position_experts(np.random.default_rng(0).random((16, 5)), "block 1", tmp_path / "p.png")
    (fig,) = figs
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "share of the position's tokens"
    routes = np.array([[0, 1, 2, -1], [3, 3, 0, 1]])
    ap.plot_routed_images(np.zeros((2, 1, 8, 8)), routes, 4, "block 1", tmp_path / "r.png")
    legend = figs[1].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["expert 0", "expert 1", "expert 2", "expert 3", "dropped"]
