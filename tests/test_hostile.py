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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitmoe: error: ") and needle in err[0], err
    return err[0]


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
    _one_error_line(capsys, "is the checkpoint being merged")
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "config.yaml").write_text("model: switch_vit\n")
    target = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    target.write_bytes(b"the run's own weights")
    assert main(["merge", str(model_file), str(target)]) == 2
    _one_error_line(capsys, "inside the checkpoints of run")
    assert target.read_bytes() == b"the run's own weights"
    assert sorted(p.name for p in folder.iterdir()) == []


def test_merge_writes_a_file_that_loads(model_file, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(model_file), str(out)]) == 0
    dense = load_model(out)
    assert not dense.config.is_moe and torch.isfinite(dense(torch.randn(1, 3, 32, 32))).all()
