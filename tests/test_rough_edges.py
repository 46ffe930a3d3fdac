"""The rough edges a new user hits: flags, multi-process start-up errors, eval's data, the demo
re-run, model size warnings, router choices, one --set spelling, the report's columns."""
import json
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETS

from vitmoe.training.config import resolve

import vitmoe
from vitmoe.cli.main import build_parser, main
from vitmoe.cli.train import build_config, size_warning
from vitmoe.data import download, fashion_mnist


def _config(argv):
    return build_config(build_parser().parse_args(["train", *argv]))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no $DATA, no system Fashion-MNIST, cwd in a scratch dir (./data absent)."""
    def no_network(url, *a, **k):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(download, "urlopen", no_network)
    monkeypatch.delenv("DATA", raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(tmp_path / "no-system-dir"),))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def write_fmnist(directory: Path, n_train=8, n_test=4, bad_label=None):
    """Raw IDX files of tiny Fashion-MNIST splits (label `bad_label` at the end of train, if given)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fashion_mnist.FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        if bad_label is not None and split == "train":
            labels[-1] = bad_label
        (directory / img_name).write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (directory / lbl_name).write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())
    return directory


# -- 1. --heads --------------------------------------------------------------------------------
def test_heads_flag_sets_num_heads(capsys):
    m = resolve(_config(["--dataset", "digits", "--dmodel", "96", "--heads", "6"])).model
    assert (m.embed_dim, m.num_heads) == (96, 6)
    assert resolve(_config(["--dataset", "digits", "--heads", "4", "--noswitch"])).model.num_heads == 4
    assert main(["train", "--dataset", "digits", "--dmodel", "96", "--heads", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitmoe: error: ") and "num_heads" in err


# -- 2. --gpu N: errors before any worker starts, one line from a worker that fails anyway ---------
@pytest.fixture
def no_workers(monkeypatch):
    import torch.distributed.launcher.api as api

    def boom(*a, **k):
        raise AssertionError("workers were started before the error")

    monkeypatch.setattr(api, "elastic_launch", boom)


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_multiprocess_missing_data_fails_before_spawning(tmp_path, offline, no_workers, capfd, data):
    data_dir = tmp_path / "data-dir"
    if data == "empty":
        data_dir.mkdir()
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--gpu", "2", "--device", "cpu",
                 "--epochs", "1", "--out", str(tmp_path / "run"), *TINY_SETS])
    out, err = capfd.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "vitmoe: error: fashion-mnist: train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] not found; "
        f"searched {data_dir}, "), err
    assert "network disabled in tests" in err and "Traceback" not in out + err and "--resume" not in err
    assert "launching" not in out
    # Nothing made: no run directory, no download folder (and an empty --data-dir stays as it was).
    assert not (tmp_path / "run").exists()
    assert (list(data_dir.iterdir()) == []) if data == "empty" else not data_dir.exists()
    assert not (offline / "data").exists()


def test_multiprocess_run_dir_in_use_fails_before_spawning(tmp_path, no_workers, capfd):
    from vitmoe.training.checkpoints import checkpoint

    run = tmp_path / "run"
    model = vitmoe.create_model("vit", embed_dim=8, depth=1, num_heads=2, mlp_hidden=8, head="linear")
    checkpoint.save_checkpoint(run, 1, model, {"epoch": 1})
    code = main(["train", "--dataset", "digits", "--gpu", "2", "--device", "cpu", "--epochs", "1",
                 "--out", str(run), *TINY_SETS])
    err = capfd.readouterr().err
    assert code == 2 and err == (f"vitmoe: error: run directory {run} already holds a run; resume it with "
                                 f"--resume {run} or choose another --out\n")


@pytest.mark.slow
def test_worker_error_is_its_own_one_line(tmp_path, offline, capfd):
    """Data whose headers pass the parent's check but whose labels are bad: the workers fail; the
    user sees that worker's one-line error, no launcher tracebacks, no --resume of a run that has
    no checkpoint."""
    data_dir = write_fmnist(tmp_path / "fm", bad_label=200)
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--gpu", "2",
                 "--device", "cpu", "--epochs", "1", "--batch", "4", "--out", str(tmp_path / "run"), *TINY_SETS])
    out, err = capfd.readouterr()
    assert code == 2, out + err
    assert out.strip() == "launching 2 worker processes (gloo)"
    assert err.strip().splitlines() == [
        f"vitmoe: error: fashion-mnist: {data_dir / 'train-labels-idx1-ubyte'} has label 200 outside 0..9"]


# -- 3. eval reads the run's data_dir ----------------------------------------------------------------
def test_eval_uses_the_runs_data_dir(tmp_path, offline, capsys):
    data_dir = write_fmnist(tmp_path / "fm", n_train=8, n_test=4)
    run = tmp_path / "run"
    assert main(["train", "--model", "vit", "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
                 "--epochs", "1", "--batch", "8", "--out", str(run), *TINY_SETS]) == 0
    capsys.readouterr()
    # From a directory without ./data: the run's own data_dir (config.yaml) is used.
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["dataset"], result["images"]) == ("fashion-mnist", 4)
    # The model file inside the run finds it too; an explicit --data-dir still wins.
    ckpt_file = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    assert main(["eval", str(ckpt_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4
    other = write_fmnist(tmp_path / "other", n_train=8, n_test=6)
    assert main(["eval", str(run), "--data-dir", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 6


# -- 5. the demo runs again -------------------------------------------------------------------------
def test_demo_runs_twice_and_keeps_other_folders(tmp_path, capsys):
    from vitmoe.cli.demo import MARKER

    out = tmp_path / "demo"
    for _ in range(2):  # `make demo` twice: the second run replaces the first one's runs
        assert main(["demo", "--out", str(out), "--epochs", "1", "--models", "vit", "--device", "cpu"]) == 0
    assert json.loads((out / MARKER).read_text()) == {"made": ["report", "vit"]}
    assert len((out / "vit" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "report" / "results.md").is_file()
    capsys.readouterr()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["demo", "--out", str(foreign), "--epochs", "1", "--models", "vit"]) == 2
    err = capsys.readouterr().err
    assert f"vitmoe: error: {foreign} already exists and was not made by vitmoe demo" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # A demo folder with a run the demo did not make: that run is left alone.
    (out / "switch_vit").mkdir()
    (out / "switch_vit" / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(out), "--epochs", "1", "--models", "switch_vit"]) == 2
    assert f"{out / 'switch_vit'} is not from an earlier vitmoe demo" in capsys.readouterr().err
    assert (out / "switch_vit" / "keep.txt").read_text() == "x"


# -- 6. a model far too large for digits -------------------------------------------------------------
def test_digits_default_model_warns_with_its_size(monkeypatch, capsys):
    import vitmoe.training as training
    from vitmoe.cli.common import CLIError

    def stop(*a, **k):
        raise CLIError("stopped before training")

    monkeypatch.setattr(training, "train", stop)
    assert main(["train", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.splitlines()
    n = vitmoe.model_info(resolve(_config(["--dataset", "digits"])).model).total_params
    assert n > 200_000_000
    assert err == [
        f"vitmoe: warning: model switch_vit has {n:,} parameters (~{n * 12 / 1e9:.1f} GB per checkpoint), far "
        f"more than the 8x8 digits images need; for a small model run `vitmoe demo` or add --dmodel 64 --heads 4 "
        f"--set model.depth=4 --set model.mlp_hidden=128 --experts 8",
        "vitmoe: error: stopped before training"]
    # The suggested flags give a small model: no warning.
    small = _config(["--dataset", "digits", *"--dmodel 64 --heads 4 --set model.depth=4 --set model.mlp_hidden=128 "
                     "--experts 8".split()])
    assert size_warning(resolve(small)) is None
    assert vitmoe.model_info(resolve(small).model).total_params < 1_000_000
    assert size_warning(resolve(_config(["--dataset", "cifar10"]))) is None  # the source recipe's own size



def test_size_warning_for_a_small_folder(tmp_path):
    from conftest import FOLDER_CLASSES, write_image

    for c, name in enumerate(FOLDER_CLASSES):
        for i in range(10):
            write_image(tmp_path / "imgs" / name / f"{i}.png", (20, 20), c, 10 * c + i)
    folder = ["--dataset", f"folder:{tmp_path / 'imgs'}", "--img-size", "16"]
    spec = resolve(_config(folder))
    n = vitmoe.model_info(spec.model).total_params
    assert size_warning(spec) == (
        f"model switch_vit has {n:,} parameters (~{n * 12 / 1e9:.1f} GB per checkpoint), far more than 24 training "
        f"images need; for a small model run `vitmoe demo` or add --dmodel 64 --heads 4 --set model.depth=4 "
        f"--set model.mlp_hidden=128 --experts 8")
    # the model the warning suggests does not warn (under the floor of 5M parameters)
    small = folder + "--dmodel 64 --heads 4 --set model.depth=4 --set model.mlp_hidden=128 --experts 8".split()
    n_small = vitmoe.model_info(resolve(_config(small)).model).total_params
    assert 3_500 * 24 < n_small < 5_000_000 and size_warning(resolve(_config(small))) is None


# -- 9. every router; one --set spelling ---------------------------------------------------------------
def test_router_choices_are_every_layer_router():
    from vitmoe.moe import LAYER_ROUTERS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    router = next(a for a in train._actions if a.dest == "router")
    assert list(router.choices) == list(LAYER_ROUTERS) and "soft" in router.choices
    m = resolve(_config(["--dataset", "digits", "--router", "soft"])).model
    assert m.moe.router == "soft"
    m = resolve(_config(["--dataset", "digits", "--router", "topk", "--top-k", "2"])).model
    assert (m.moe.router, m.moe.top_k) == ("topk", 2)


def _info(argv, capsys):
    assert main(["info", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_info_takes_the_train_spelling(capsys):
    info, err = _info(["switch_vit", "--set", "model.num_experts=64"], capsys)
    assert info["total_params"] == 478_445_734 and err == ""
    info, err = _info(["switch_vit", "--set", "model.moe.router=topk", "--set", "model.moe.top_k=2"], capsys)
    assert info["active_params_per_token"] == 20_231_878 and err == ""
    # The old bare spelling still works, with a one-line warning naming the new one.
    info, err = _info(["switch_vit", "--set", "num_experts=64"], capsys)
    assert info["total_params"] == 478_445_734
    assert err == ("vitmoe: warning: --set num_experts=...: write --set model.num_experts=... (the spelling "
                   "vitmoe train takes); the bare field name is deprecated\n")


# -- 8. the report: dataset, test images, active parameters, column notes, mixed datasets ---------------
def _run_dir(root, name, dataset, **extra):
    root.mkdir(parents=True)
    s = {"name": name, "model": "vit", "experts": None, "params": 1000, "active_params": 1000, "best_acc": 80.0,
         "best_epoch": 2, "threshold": 75.0, "epochs_to_threshold": 2, "train_time_s": 10.0,
         "train_time_60k_s": 12.5, "inference_time_60k_s": 1.25, "epochs": 2, "dataset": dataset, **extra}
    (root / "summary.json").write_text(json.dumps(s))
    load = {"expert_load": {"blocks.0.mlp": [1] * extra["experts"]}} if extra.get("experts") else {}
    (root / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_acc": a, **load}) + "\n"
                                                for e, a in ((1, 70.0), (2, 80.0))))
    return root


def test_report_columns_and_mixed_datasets_warning(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", "vit", "digits", test_images=359)
    b = _run_dir(tmp_path / "b", "switch-vit", "fashion-mnist", experts=8, params=9000, active_params=2000)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert err == ("vitmoe: warning: the runs used 2 different datasets (digits, fashion-mnist): accuracies and "
                   "times are not comparable across them\n")
    lines = out.splitlines()
    assert lines[0] == ("| model | dataset | experts | size | active params | highest acc (epoch) | test images "
                        "| t_epoch | Training Time (60,000 images) | Inference Time (60,000 images) |")
    assert lines[2] == "| vit | digits | - | 1,000 | 1,000 | 80.00 (2) | 359 | 2 | 12.50 | 1.25 |"
    assert lines[3] == "| switch-vit | fashion-mnist | 8 | 9,000 | 2,000 | 80.00 (2) | n/a | 2 | 12.50 | 1.25 |"
    assert ("- **Note:** the runs used 2 different datasets (digits, fashion-mnist): accuracies and times are not "
            "comparable across them.") in lines
    assert ("- t_epoch: the first epoch whose test accuracy reached 75 % (`-`: never).") in lines
    assert any(line.startswith("- Training Time (60,000 images): seconds to train on 60,000 images at the run's "
                               "median training throughput") and "`train_time_60k_s`" in line for line in lines)
    assert out.count("\n- ") >= 11  # every column explained
    assert (tmp_path / "rep" / "results.md").read_text() in out
    # One dataset: no warning.
    assert main(["report", str(a), "--out", str(tmp_path / "rep1")]) == 0
    assert capsys.readouterr().err == ""
