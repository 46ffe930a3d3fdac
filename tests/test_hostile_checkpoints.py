"""A run directory nobody can break, the checkpoint half: a planted state.pt never runs code, a
damaged newest checkpoint is skipped (saying so), a full disk is one message, and a checkpoint of
another model is one error naming what differs."""
import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import TINY_SETS

import vitmoe
from vitmoe import fileio
from vitmoe.cli.main import main
from vitmoe.models import ModelFileError
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints import checkpoint as ckpt
from vitmoe.training.checkpoints.checkpoint import (CheckpointError, latest_checkpoint, load_state, resolve_model_file,
                                        save_checkpoint, verify_checkpoint)

STEPS_PER_EPOCH = 6  # 1,438 digits training images in batches of 256


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A real 2-epoch switch_vit run (4 experts) keeping both checkpoints; tests work on copies."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "2", "--batch", "256", "--experts", "4",
                 "--out", str(run), *TINY_SETS, "--set", "keep_checkpoints=2"]) == 0
    return run


@pytest.fixture
def run(pristine, tmp_path, capsys):
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    capsys.readouterr()
    return dst


def _ck(run, epoch):
    return run / "checkpoints" / f"epoch-{epoch:04d}"


def _error_lines(err):
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("vitmoe: error:")]


def _weights(path):
    return vitmoe.load_model(path).state_dict()


# -- 1. a checkpoint never executes code -----------------------------------------------------------
class _WritesMarker:
    """Unpickled with weights_only=False, this calls open(marker, "w"): code from the file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(state_file, marker, manifest: str):
    state = torch.load(state_file, weights_only=False)  # the real state (our own file), plus the payload
    state["payload"] = _WritesMarker(marker)
    torch.save(state, state_file)
    man = state_file.parent / ckpt.MANIFEST_FILE
    if manifest == "forged" and man.exists():  # rewritten to match: only the loader stands in the way
        data = json.loads(man.read_text())
        blob = state_file.read_bytes()
        data["files"][ckpt.STATE_FILE] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        man.write_text(json.dumps(data))
    else:  # a checkpoint as written before manifests existed
        for d in state_file.parent.parent.glob("epoch-*"):
            (d / ckpt.MANIFEST_FILE).unlink(missing_ok=True)


@pytest.mark.parametrize("manifest", ["forged", "absent"])
def test_planted_state_never_runs_code(run, tmp_path, capsys, manifest):
    shutil.rmtree(_ck(run, 1))  # the only checkpoint is the planted one
    state_file = _ck(run, 2) / ckpt.STATE_FILE
    marker = tmp_path / "pwned"
    _plant(state_file, marker, manifest)
    # The plant is live: an unrestricted load runs it.
    live = tmp_path / "live.pt"
    torch.save(_WritesMarker(tmp_path / "live-marker"), live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live-marker").exists()

    for argv in (["train", "--resume", str(run)],
                 ["merge", str(run), str(tmp_path / "merged.safetensors"), "--weighting", "usage"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert not marker.exists(), argv
        assert code == 2, argv
        lines = _error_lines(err)
        assert len(lines) == 1, err
        assert str(state_file) in lines[0] and "it would import io.open" in lines[0] and "refused" in lines[0], lines[0]
        assert not marker.exists(), argv
    assert not (tmp_path / "merged.safetensors").exists()

    # eval and report do not need state.pt: they succeed without touching it.
    assert main(["eval", str(run), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(out)["checkpoint"] == str(_ck(run, 2) / ckpt.MODEL_FILE)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "results.md").is_file()
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="does not load as plain data"):
        load_state(_ck(run, 2))
    assert not marker.exists()


def test_saved_state_is_plain_data(run):
    for epoch in (1, 2):
        state_file = _ck(run, epoch) / ckpt.STATE_FILE
        assert torch.serialization.get_unsafe_globals_in_checkpoint(state_file) == []
        state = torch.load(state_file, weights_only=True)
        assert (state["epoch"], state["step"]) == (epoch, epoch * STEPS_PER_EPOCH)
        assert state["rng"]["numpy"]["key"].dtype == torch.int64 and state["rng"]["numpy"]["key"].shape == (624,)
        assert state["rng"]["python"]["state"].shape == (625,)


def test_rng_state_round_trips_through_plain_data(tmp_path):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(),
                torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(),
            torch.rand(1).item()) == expected


def test_state_that_is_not_plain_data_is_refused_when_saving(tmp_path):
    model = vitmoe.create_model("vit", img_size=8, in_chans=1, embed_dim=16, depth=1, num_heads=2, mlp_hidden=32)
    with pytest.raises(TypeError, match=r"state\['extra'\]\[0\] is a builtins.object"):
        save_checkpoint(tmp_path / "r", 1, model, {"epoch": 1, "extra": [object()]})
    assert latest_checkpoint(tmp_path / "r") is None
    assert os.listdir(tmp_path / "r" / "checkpoints") == []
    # numpy values become tensors and numbers.
    save_checkpoint(tmp_path / "r", 1, model, {"epoch": np.int64(1), "a": np.arange(3, dtype=np.uint32)})
    state = load_state(tmp_path / "r" / "checkpoints" / "epoch-0001")
    assert state["epoch"] == 1 and type(state["epoch"]) is int
    assert torch.equal(state["a"], torch.tensor([0, 1, 2], dtype=torch.uint32))


# -- 2. a damaged newest checkpoint: skipped, said so -----------------------------------------------
def test_manifest_records_sizes_and_hashes(run):
    d = _ck(run, 2)
    manifest = json.loads((d / ckpt.MANIFEST_FILE).read_text())
    assert manifest["format"] == "vitmoe-checkpoint-1"
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        blob = (d / name).read_bytes()
        assert manifest["files"][name] == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    verify_checkpoint(d)


def test_truncated_newest_model_falls_back_and_resume_completes(run, capsys):
    model_file = _ck(run, 2) / ckpt.MODEL_FILE
    before = _weights(model_file)
    size = model_file.stat().st_size
    with open(model_file, "r+b") as f:
        f.truncate(size // 2)
    # Readers of the run take epoch 1, each saying what it skipped.
    assert latest_checkpoint(run).name == "epoch-0001"
    logged = []
    assert resolve_model_file(run, log=logged.append) == _ck(run, 1) / ckpt.MODEL_FILE
    assert logged == [f"skipped a checkpoint that does not verify: {model_file} is {size // 2:,} bytes where "
                      f"manifest.json records {size:,} (truncated or overwritten); using epoch-0001"]
    assert main(["eval", str(run), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out.strip().splitlines()[-1])["checkpoint"] == str(_ck(run, 1) / ckpt.MODEL_FILE)
    assert "vitmoe: warning: skipped a checkpoint" in cap.err and str(model_file) in cap.err

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert skipped == [f"resume: skipped checkpoint epoch-0002: {model_file} is {size // 2:,} bytes where "
                       f"manifest.json records {size:,} (truncated or overwritten); resuming from epoch-0001"]
    assert "resumed" in out and "from epoch-0001 (epoch 1, step 6)" in out
    assert "epoch 2/2" in out
    # Epoch 2 trained again from epoch 1 gives the same weights the damaged file held.
    assert latest_checkpoint(run).name == "epoch-0002"
    after = _weights(model_file)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_state(_ck(run, 2))["step"] == 2 * STEPS_PER_EPOCH
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_flipped_state_bytes_fall_back(run, capsys):
    state_file = _ck(run, 2) / ckpt.STATE_FILE
    blob = bytearray(state_file.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF
    state_file.write_bytes(bytes(blob))
    assert latest_checkpoint(run).name == "epoch-0001"
    assert resolve_model_file(run) == _ck(run, 2) / ckpt.MODEL_FILE  # eval needs only the intact weights
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert (f"resume: skipped checkpoint epoch-0002: {state_file} does not match the sha256 manifest.json "
            "records (damaged or replaced); resuming from epoch-0001") in out.splitlines()
    assert load_state(_ck(run, 2))["step"] == 2 * STEPS_PER_EPOCH
    verify_checkpoint(_ck(run, 2))


def test_checkpoints_without_manifest_still_load_and_are_checked(run, capsys):
    for epoch in (1, 2):
        (_ck(run, epoch) / ckpt.MANIFEST_FILE).unlink()
    assert latest_checkpoint(run).name == "epoch-0002"
    assert load_state(_ck(run, 2))["epoch"] == 2
    model_file = _ck(run, 2) / ckpt.MODEL_FILE
    size = model_file.stat().st_size
    with open(model_file, "r+b") as f:
        f.truncate(size - 100)
    assert latest_checkpoint(run).name == "epoch-0001"
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert (f"resume: skipped checkpoint epoch-0002: {model_file} is truncated or damaged: {size - 100:,} bytes "
            f"where its header announces {size:,}; resuming from epoch-0001") in out.splitlines()
    assert (_ck(run, 2) / ckpt.MANIFEST_FILE).is_file()  # rewritten with a manifest


def test_only_checkpoint_damaged_is_one_clear_error(run, capsys):
    shutil.rmtree(_ck(run, 1))
    model_file = _ck(run, 2) / ckpt.MODEL_FILE
    size = model_file.stat().st_size
    with open(model_file, "r+b") as f:
        f.truncate(1000)
    assert latest_checkpoint(run) is None
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        f"vitmoe: error: no usable checkpoint in {run / 'checkpoints'}: {model_file} is 1,000 bytes where "
        f"manifest.json records {size:,} (truncated or overwritten)"]
    assert main(["eval", str(run)]) == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1
    # A fresh run is still refused: the directory holds a run, even an unusable one.
    assert ckpt.has_checkpoint(run)


# -- 3. a full disk --------------------------------------------------------------------------------
_Usage = namedtuple("_Usage", "total used free")


@pytest.mark.parametrize("writer", ["state", "model"])
def test_disk_full_is_one_message_and_keeps_latest(run, capsys, monkeypatch, writer):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if writer == "state":
        def partial_save(obj, f, *a, **k):
            f.write(b"\x80\x02partial")
            full()
        monkeypatch.setattr(ckpt.torch, "save", partial_save)
    else:
        def partial_file(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"partial")
            full()
        monkeypatch.setattr("vitmoe.models.io.save_file", partial_file)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: _Usage(10**12, 10**12 - 1_234_567, 1_234_567))

    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    ckdir = run / "checkpoints"
    assert re.fullmatch(
        rf"vitmoe: error: no space left on device writing checkpoint epoch-0003: 1\.2 MB free in "
        rf"{re.escape(str(ckdir))}, \d+\.\d kB needed \(model and training state\); the previous checkpoint "
        rf"epoch-0002 is still the latest\. Free space, then resume with --resume {re.escape(str(run))}",
        lines[0]), lines[0]
    assert sorted(os.listdir(ckdir)) == ["best", "epoch-0001", "epoch-0002", "latest"]  # no temp files
    assert latest_checkpoint(run).name == "epoch-0002"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert latest_checkpoint(run).name == "epoch-0003"


def test_atomic_write_disk_full_names_file_and_size(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 2_000, 2_000))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1500)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(fileio.DiskFullError) as e:
        fileio.atomic_write(target, write, size=5_000)
    assert str(e.value) == f"no space left on device writing {target}: 2.0 kB free in {tmp_path}, 5.0 kB needed"
    assert e.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]
    with pytest.raises(fileio.DiskFullError, match="more than the 1.5 kB written before it filled"):
        fileio.atomic_write(target, write)


# -- 4. a checkpoint of another model ---------------------------------------------------------------
def test_checkpoint_of_other_model_is_one_error(run, capsys):
    cfg_file = run / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("num_experts: 4", "num_experts: 8"))
    assert main(["train", "--resume", str(run)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    model_file = _ck(run, 2) / ckpt.MODEL_FILE
    assert len(lines) == 1
    assert lines == [f"vitmoe: error: {model_file}: tensors do not match the model its config describes: shape of "
                     "blocks.0.mlp.router.weight (4, 16) (model: (8, 16)); blocks.0.mlp.experts.w1 (4, 16, 32) "
                     "(model: (8, 16, 32)); blocks.0.mlp.experts.b1 (4, 32) (model: (8, 32)) ... (the run's "
                     "config.yaml describes a different model than this checkpoint holds)"]

    cfg = TrainConfig.from_yaml(cfg_file).validate()
    cfg.out = str(run)
    with pytest.raises(ModelFileError, match=re.escape(str(model_file))):
        Trainer(cfg, resume=True, log=lambda m: None).setup()


def test_fit_check_compares_every_expert_when_experts_are_sharded(tmp_path):
    from vitmoe.training.checkpoints.restore import check_fits

    model = vitmoe.create_model("switch_vit", img_size=8, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                                mlp_hidden=32, num_experts=4)
    path = tmp_path / "m.safetensors"
    vitmoe.save_model(model, path)
    weights = vitmoe.load_model(path).state_dict()
    check_fits(path, model, model.config, True, weights)  # the whole model, rebuilt on the meta device
    other = model.config.replace(num_experts=8)
    with pytest.raises(ModelFileError) as e:
        check_fits(path, model, other, True, weights)
    assert str(e.value).startswith(f"{path}: tensors do not match the model its config describes: shape of "
                                   "blocks.0.mlp.router.weight (4, 16) (model: (8, 16)); ")
