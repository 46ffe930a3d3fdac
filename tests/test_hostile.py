"""Hostile and careless input: every bad file, flag or directory gives one clear line, never a traceback,
and never code execution or a clobbered file."""
import json

import pytest
import torch
from conftest import TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitmoe
from vitmoe.cli.main import main
from vitmoe.models import ModelFileError, load_model


def _one_error_line(capsys, needle):
    """Exactly one `vitmoe: error:` line holding `needle`; nothing else but `vitmoe: warning:` lines
    (a deprecated spelling may warn), so no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("vitmoe: error: ")]
    assert len(errors) == 1 and needle in errors[0], err
    assert all(line.startswith(("vitmoe: error: ", "vitmoe: warning: ")) for line in err), err
    return errors[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.safetensors"
    vitmoe.save_model(vitmoe.create_model("switch_vit", num_experts=2, **TINY), path)
    return path


def _rewrite_meta(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


def test_metadata_that_is_not_json_is_one_error(model_file, capsys):
    _rewrite_meta(model_file, config="{not json")
    with pytest.raises(ModelFileError, match="metadata entry 'config' is not JSON"):
        load_model(model_file)
    assert main(["eval", str(model_file), "--dataset", "digits"]) == 2
    _one_error_line(capsys, "is not JSON")


def test_metadata_that_does_not_match_the_tensors_is_one_error(model_file, capsys):
    # The file holds a 2-expert model; its metadata claims 4 experts.
    with safe_open(str(model_file), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    _rewrite_meta(model_file, config=json.dumps({**cfg, "num_experts": 4}))
    with pytest.raises(ModelFileError, match=r"shape of blocks\.0\.mlp\.router\.weight \(2, 24\) \(model: \(4, 24\)\)"):
        load_model(model_file)
    _rewrite_meta(model_file, config=json.dumps({**cfg, "depth": 3}))
    with pytest.raises(ModelFileError, match=r"missing \['blocks\.2\."):
        load_model(model_file)
    _rewrite_meta(model_file, config=json.dumps({**cfg, "depth": "deep"}))
    with pytest.raises(ModelFileError, match="recorded model config is not valid: model field depth"):
        load_model(model_file)
    assert main(["merge", str(model_file), str(model_file.parent / "out.safetensors")]) == 2
    _one_error_line(capsys, "recorded model config is not valid")


def test_truncated_model_file_is_one_error(model_file, capsys):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    assert main(["eval", str(model_file), "--dataset", "digits"]) == 2
    _one_error_line(capsys, str(model_file))


def test_merge_refuses_a_directory_the_input_and_a_runs_checkpoints(model_file, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert main(["merge", str(model_file), str(folder)]) == 2
    _one_error_line(capsys, "is a directory")
    assert main(["merge", str(model_file), str(model_file)]) == 2
    _one_error_line(capsys, "is the command's input")
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "config.yaml").write_text("model: switch_vit\n")
    target = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    target.write_bytes(b"the run's own weights")
    assert main(["merge", str(model_file), str(target)]) == 2
    _one_error_line(capsys, "would replace its checkpoints/ of the run")
    assert target.read_bytes() == b"the run's own weights"
    assert sorted(p.name for p in folder.iterdir()) == []


def test_merge_writes_a_file_that_loads(model_file, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(model_file), str(out)]) == 0
    dense = load_model(out)
    assert not dense.config.is_moe and torch.isfinite(dense(torch.randn(1, 3, 32, 32))).all()


@pytest.fixture
def nothing_loads(monkeypatch):
    """Validation must fail before any data is touched: loading it is a test failure."""
    def boom(*a, **k):
        raise AssertionError("data was loaded before the bad value was reported")

    monkeypatch.setattr("vitmoe.data.load_dataset", boom)


@pytest.mark.parametrize("argv, needle", [
    (["--set", "warmup_epochs=.inf"], "warmup_epochs=inf is not allowed: a finite number"),
    (["--seed", "99999999999999999999999"], "seed=99999999999999999999999 is not allowed"),
    (["--set", "model.moe.top_k=true"], "model field moe.top_k=True is not allowed: an integer"),
    (["--set", "model.top_k=true"], "model field moe.top_k=True is not allowed: an integer"),
    (["--dist-timeout", "1e300"], "dist_timeout_s=1e+300 is not allowed: a finite number in [1.0, 604800.0]"),
    (["--lr", "inf"], "lr=inf is not allowed: a finite number > 0.0"),
    (["--set", "weight_decay=.inf"], "weight_decay=inf is not allowed"),
    (["--set", "model.moe.capacity_factor_train=.nan"], "model field moe.capacity_factor_train=nan"),
    (["--set", "betas=[0.9,.nan]"], "betas="),
])
def test_bad_values_are_one_line_before_any_work(argv, needle, tmp_path, capsys, nothing_loads):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), *argv]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()


def test_config_that_is_a_directory_or_binary_is_one_line(tmp_path, capsys, nothing_loads):
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "is a directory")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--config", str(binary), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "is not text (not UTF-8)")
    assert not (tmp_path / "r").exists()


def test_review_findings_stay_fixed(tmp_path):
    """16-bit images scale to 8 bits; upcycle defaults apply field by field; a manifest that is JSON but
    not an object is a CheckpointError; a hard-linked lock file is refused and its target kept."""
    import os

    import numpy as np
    from PIL import Image

    from vitmoe.data.folder import decode_image
    from vitmoe.models.upcycle import upcycled_config
    from vitmoe.rundir import RunDirError, RunLock
    from vitmoe.training.checkpoints.checkpoint import CheckpointError
    from vitmoe.training.checkpoints.verify import read_manifest

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = decode_image(tmp_path / "g16.png", 8, True)
    assert 110 < float(img.mean()) < 145 and int(img.min()) < 40  # was ~255 everywhere (clipped)

    dense = vitmoe.create_model("vit", **TINY).config
    cfg = upcycled_config(dense, moe={"capacity_factor_train": 2.0})
    assert (cfg.moe.router, cfg.moe.top_k, cfg.moe.capacity_factor_train) == ("topk", 2, 2.0)
    assert upcycled_config(dense, moe={"top_k": 3}, num_experts=4).moe.top_k == 3
    assert upcycled_config(dense, moe={"router": "switch"}).moe.top_k == 1

    ck = tmp_path / "epoch-0001"
    ck.mkdir()
    (ck / "manifest.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a vitmoe checkpoint manifest"):
        read_manifest(ck)

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.link(victim, run / ".vitmoe.lock")
    with pytest.raises(RunDirError, match="hard-linked"):
        RunLock(run).acquire()
    assert victim.read_text() == "keep me"
