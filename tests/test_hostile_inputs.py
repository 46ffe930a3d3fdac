"""Hostile and careless inputs: what a user types or a file says never hangs a command, never prints a
traceback and never allocates without bound. Cases are generated: configs, --set values, model
metadata and manifests by hypothesis (few examples, no deadline: the 2-core suite budget), special
files, safetensors headers, transformers directories, image folders and their caches by hand-made
generators. Each ends in one `vitmoe: error:` line (exit 2) or a working result, under a deadline."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SETS
from hostile_utils import deadline, one_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitmoe
from vitmoe.cli.main import main

FEW = settings(max_examples=15, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Reached(Exception):
    """The command got past every check to the point where it would load data or start workers."""


@pytest.fixture
def stop_before_work(monkeypatch):
    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr("vitmoe.data.load_dataset", stop)
    monkeypatch.setattr("vitmoe.training.launch.launch", stop)


def _cli(argv, capsys, seconds=30) -> tuple[int | None, str]:
    """(exit status, stderr) of `vitmoe ARGV` in this process; None when it got past every check."""
    with deadline(seconds):
        try:
            code = main(argv)
        except Reached:
            code = None
        except SystemExit as e:  # argparse's refusal of a flag value
            code = e.code
    return code, capsys.readouterr().err


def _ok_or_one_line(code, err):
    assert code in (None, 0, 2), err
    if code == 2:
        one_error(err)
    else:
        assert "Traceback" not in err and "vitmoe: error" not in err, err


def _subprocess(argv, seconds=60):
    """`vitmoe ARGV` as a user runs it, under `timeout`."""
    proc = subprocess.run(["timeout", str(seconds), sys.executable, "-m", "vitmoe", *argv], capture_output=True,
                          text=True, env={**os.environ, "VITMOE_MALLOC": "system"})
    assert proc.returncode != 124, f"hung: vitmoe {' '.join(argv)}"
    return proc.returncode, proc.stderr


# -- 1. special files where a path is read ---------------------------------------------------------------
def test_special_files_are_refused_where_a_path_is_read(tiny_run, tmp_path, capsys, stop_before_work):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv, needle in ((["train", "--config", str(fifo), "--out", str(tmp_path / "r")], "is a FIFO"),
                         (["eval", str(fifo)], "is a FIFO, not a model file"),
                         (["merge", str(fifo), str(tmp_path / "m.safetensors")], "is a FIFO"),
                         (["upcycle", str(fifo), str(tmp_path / "u.safetensors")], "is a FIFO"),
                         (["train", "--config", "/dev/zero", "--out", str(tmp_path / "r")], "character device")):
        code, err = _cli(argv, capsys, seconds=20)
        assert code == 2, err
        one_error(err, needle)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").unlink()
    os.mkfifo(run / "config.yaml")  # the run's own config, read by eval for its data settings
    code, err = _cli(["eval", str(run)], capsys, seconds=20)
    assert code == 2
    one_error(err, "is a FIFO")


def _image_folder(root: Path, classes=("cat", "dog"), per_class=4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_fifo_among_images_never_hangs_training(tmp_path, capsys):
    from vitmoe.data import load_dataset

    root = _image_folder(tmp_path / "imgs")
    os.mkfifo(root / "cat" / "x.png")
    code, err = _cli(["train", "--dataset", f"folder:{root}", "--epochs", "1", "--out", str(tmp_path / "r"),
                      *TINY_SETS], capsys)
    assert code == 2
    one_error(err, "x.png is a FIFO, not an image file")
    with deadline(30), pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        data = load_dataset(f"folder:{root}", "train", img_size=8, skip_bad_images=True)
    assert len(data.labels) + len(load_dataset(f"folder:{root}", "test", img_size=8, skip_bad_images=True).labels) == 8


def test_image_folder_problems_are_said(tmp_path, monkeypatch):
    from vitmoe.data import DatasetError, load_dataset

    one = _image_folder(tmp_path / "one", classes=("only",))
    with pytest.warns(UserWarning, match="has one class .* accuracy is 100 %"):
        load_dataset(f"folder:{one}", "train", img_size=8)
    two = _image_folder(tmp_path / "two")
    real_walk = os.walk

    def unreadable(top, onerror=None, **k):  # what os.walk meets in a folder it may not list (as root: never)
        if str(top).endswith("dog"):
            onerror(PermissionError(errno.EACCES, "Permission denied", str(top)))
            return iter(())
        return real_walk(top, onerror=onerror, **k)

    monkeypatch.setattr("vitmoe.data.folder.os.walk", unreadable)
    with pytest.raises(DatasetError, match="cannot read folder .*dog: Permission denied"):
        load_dataset(f"folder:{two}", "train", img_size=8)


# -- 2. the image cache: links refused, contents checked, a full disk is one line --------------------
def test_a_cache_that_is_a_link_is_refused_and_nothing_is_written_where_it_points(tmp_path):
    from vitmoe.data import DatasetError, load_dataset

    root = _image_folder(tmp_path / "imgs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    (root / ".vitmoe-cache").symlink_to(elsewhere)
    with pytest.raises(DatasetError, match="is a symbolic link"):
        load_dataset(f"folder:{root}", "train", img_size=8)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]


_CACHE_DAMAGE = {
    "images of the wrong shape": lambda c: np.save(c / "train.npy", np.zeros((len(np.load(c / "train.npy")), 3, 4, 4),
                                                                          np.uint8)),
    "images of the wrong dtype": lambda c: np.save(c / "train.npy", np.load(c / "train.npy").astype(np.float32)),
    "labels out of range": lambda c: np.save(c / "train-labels.npy", np.full(len(np.load(c / "train-labels.npy")), 9)),
    "labels of the wrong dtype": lambda c: np.save(c / "test-labels.npy", np.load(c / "test-labels.npy").astype(float)),
    "pickled labels": lambda c: np.save(c / "test-labels.npy", np.array([{"x": 1}] * 2, dtype=object)),
    "swapped class names": lambda c: _manifest(c, classes=["dog", "cat"]),
    "mean of the wrong type": lambda c: _manifest(c, mean="0.5"),
    "std that is zero": lambda c: _manifest(c, std=[0.0, 0.0, 0.0]),
    "count that is text": lambda c: _manifest(c, train="6"),
    "manifest that is a list": lambda c: (c / "manifest.json").write_text("[]"),
    "manifest that is a link": lambda c: _relink(c / "manifest.json"),
}


def _manifest(cache: Path, **changes):
    m = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**m, **changes}))


def _relink(path: Path):
    target = path.with_name("elsewhere.json")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize("damage", list(_CACHE_DAMAGE))
def test_a_damaged_cache_is_rebuilt_not_trusted(damage, tmp_path):
    from vitmoe.data import DatasetError, folder, load_dataset

    root = _image_folder(tmp_path / "imgs")
    first = load_dataset(f"folder:{root}", "train", img_size=8)
    images, labels = first.images.clone(), first.labels.clone()  # copies: the damage rewrites the mapped files
    cache = root / ".vitmoe-cache" / "s8"
    _CACHE_DAMAGE[damage](cache)
    folder._MEMO.clear()
    try:
        again = load_dataset(f"folder:{root}", "train", img_size=8)
    except DatasetError as e:  # a link in the cache: refused, never followed
        assert damage == "manifest that is a link" and "symbolic link" in str(e)
        return
    assert torch.equal(again.images, images) and torch.equal(again.labels, labels)
    assert again.info.classes == ["cat", "dog"]


@FEW
@given(st.dictionaries(st.sampled_from(["version", "img_size", "in_chans", "classes", "mean", "std", "skipped",
                                        "train", "test", "key"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats() | st.text(max_size=5),
                                    lambda s: st.lists(s, max_size=4) | st.dictionaries(st.text(max_size=3), s, max_size=3),
                                    max_leaves=8), max_size=4))
def test_generated_cache_manifests_are_checked(tmp_path_factory, changes):
    from vitmoe.data import folder, load_dataset

    root = tmp_path_factory.mktemp("gen") / "imgs"
    if not root.exists():
        _image_folder(root)
    load_dataset(f"folder:{root}", "train", img_size=8)
    _manifest(root / ".vitmoe-cache" / "s8", **changes)
    folder._MEMO.clear()
    with deadline(30):
        data = load_dataset(f"folder:{root}", "train", img_size=8)
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 8, 8)
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < 2 and data.info.classes == ["cat", "dog"]


def test_full_disk_while_building_the_cache_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from vitmoe.data import folder

    root = _image_folder(tmp_path / "imgs")

    def full(fd, offset, length):  # what posix_fallocate answers on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder.os, "posix_fallocate", full)
    code, err = _cli(["train", "--dataset", f"folder:{root}", "--epochs", "1", "--out", str(tmp_path / "r"),
                      *TINY_SETS], capsys)
    assert code == 2
    one_error(err, "no space left on device writing the image cache")
    assert [p for p in (root / ".vitmoe-cache").rglob("*") if not p.is_dir()] == []  # no temp file keeps the disk full
    monkeypatch.undo()
    folder._MEMO.clear()
    assert len(folder.prepare_folder(f"folder:{root}", img_size=8).train.labels) > 0  # the retry just works


# -- 3. configs and --set values: bounded, one line ---------------------------------------------------
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_billion_laughs_and_huge_configs_fail_fast(tmp_path):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(LAUGHS)
    assert len(LAUGHS) < 500
    start = time.monotonic()
    code, err = _subprocess(["train", "--config", str(bomb), "--dataset", "digits", "--out", str(tmp_path / "r")])
    assert code == 2 and time.monotonic() - start < 30
    one_error(err, "expands to more than 100,000 values through YAML anchors and aliases")
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write("epochs: 1\n" + "# padding\n" * 3_500_000)  # 35 MB
    from vitmoe.training import TrainConfig
    from vitmoe.validation import ConfigError

    start = time.monotonic()
    with pytest.raises(ConfigError, match="is 35.0 MB: more than the 1.0 MB"):
        TrainConfig.from_yaml(big)
    assert time.monotonic() - start < 1.0  # refused before parsing
    assert not (tmp_path / "r").exists()


def test_yaml_errors_are_one_line_with_line_and_column(tmp_path, capsys, stop_before_work):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlr: [0.1, 0.2\nmodel: vit\n")
    code, err = _cli(["train", "--config", str(bad), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    one_error(err, "is not valid YAML: ")
    assert "at line 3, column " in err


TRAIN_KEYS = ["epochs", "lr", "batch_size", "seed", "warmup_epochs", "optimizer", "betas", "model", "model_config",
              "model.embed_dim", "model.depth", "model.num_heads", "model.moe_layers", "model.num_experts",
              "model.moe.top_k", "model.moe.capacity_factor_eval", "norm_mean", "mixup", "ema_decay", "amp", "device"]
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**30) | st.floats() | st.text(max_size=12),
                      lambda s: st.lists(s, max_size=5) | st.dictionaries(st.text(max_size=8), s, max_size=4),
                      max_leaves=12)


@FEW
@given(st.dictionaries(st.sampled_from(TRAIN_KEYS) | st.text(max_size=10), VALUES, max_size=6), st.booleans())
def test_generated_configs_are_one_line_or_accepted(tmp_path_factory, capsys, stop_before_work, data, with_alias):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    text = yaml.safe_dump(data, allow_unicode=True)
    if with_alias:  # the same values again through anchors and aliases
        text = "anchored: &b\n" + "".join(f"  {line}\n" for line in text.splitlines()) + "again: *b\n"
    path.write_text(text)
    code, err = _cli(["train", "--config", str(path), "--dataset", "digits", "--out", str(path.parent / "r"),
                      "--device", "cpu", "--gpu", "1"], capsys)
    _ok_or_one_line(code, err)


SET_FIELDS = ["embed_dim", "depth", "num_heads", "mlp_hidden", "img_size", "patch_size", "num_classes", "num_experts",
              "moe_layers", "conv_layers", "tokenizer", "moe.top_k", "moe.capacity_factor_eval", "moe.router"]


@FEW
@given(st.sampled_from(SET_FIELDS),
       st.text(max_size=30) | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]*)?(e[0-9]{1,3})?", fullmatch=True)
       | st.sampled_from(["1e9", "1000000000", "1000000001", ".nan", "-.inf", "[1, *a]", "&a [*a]", "{a: 1}"]))
def test_generated_set_values_never_hang_or_trace(capsys, field, value):
    code, err = _cli(["info", "vit", "--set", f"model.{field}={value}"], capsys, seconds=20)
    _ok_or_one_line(code, err)


def test_a_huge_width_is_answered_at_once(capsys, stop_before_work, tmp_path):
    start = time.monotonic()
    code, err = _cli(["info", "vit", "--set", "model.embed_dim=1000000000"], capsys)  # counts only: fine
    assert code == 0, err
    code, err = _cli(["info", "vit", "--set", "model.embed_dim=1000000001"], capsys)
    assert code == 2
    one_error(err, "...] (32 in all)")  # the head counts that divide it, listed lazily and cut
    code, err = _cli(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--set",
                      "model.embed_dim=1000000000", "--set", "model.num_heads=1"], capsys)
    assert code == 2
    one_error(err, "for their weights alone, more than the")
    assert time.monotonic() - start < 20


# -- 4. model files: generated headers and metadata -------------------------------------------------------
@pytest.fixture(scope="module")
def moe_bytes():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        vitmoe.save_model(vitmoe.create_model("switch_vit", num_experts=2, num_classes=10, img_size=8, in_chans=1,
                                              **{**TINY, "patch_size": 4}),
                          Path(d) / "m.safetensors", metadata={"dataset": "digits"})
        return (Path(d) / "m.safetensors").read_bytes()


def _header(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _pack(header, data: bytes, n: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


_HEADERS = {
    "empty file": lambda h, d: b"",
    "seven bytes": lambda h, d: b"\x01" * 7,
    "length past the file": lambda h, d: _pack(h, d, n=10**6),
    "length of 2**63": lambda h, d: _pack(h, d, n=2**63),
    "header not JSON": lambda h, d: _pack(b"{not json" + b" " * 20, d),
    "header a list": lambda h, d: _pack([1, 2], d),
    "nested past recursion": lambda h, d: _pack(b"[" * 100_000 + b"]" * 100_000, d),
    "negative shape": lambda h, d: _pack({**h, next(k for k in h if k != "__metadata__"): {
        "dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, d),
    "offsets past the data": lambda h, d: _pack({**h, next(k for k in h if k != "__metadata__"): {
        "dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}, d),
    "metadata not strings": lambda h, d: _pack({**h, "__metadata__": {"format": ["x"]}}, d),
    "config claims depth 1,000,000": lambda h, d: _pack(_meta(h, config={**json.loads(h["__metadata__"]["config"]),
                                                                             "depth": 1_000_000}), d),
    "config claims depth 1000": lambda h, d: _pack(_meta(h, config={**json.loads(h["__metadata__"]["config"]),
                                                                    "depth": 1000}), d),
    "config claims width 10**6": lambda h, d: _pack(_meta(h, config={**json.loads(h["__metadata__"]["config"]),
                                                                     "embed_dim": 10**6, "num_heads": 1}), d),
    "classes not a list": lambda h, d: _pack(_meta(h, classes={"a": 1}), d),
    "normalization with NaN": lambda h, d: _pack(_meta(h, normalization={"mean": [float("nan")], "std": [1.0]}), d),
    "normalization of text": lambda h, d: _pack(_meta(h, normalization="imagenet"), d),
    "dataset a number": lambda h, d: _pack(_meta(h, dataset=7), d),
}


def _meta(header: dict, **entries) -> dict:
    meta = dict(header["__metadata__"])
    meta.update({k: json.dumps(v) for k, v in entries.items()})
    return {**header, "__metadata__": meta}


@pytest.mark.parametrize("damage", list(_HEADERS))
def test_generated_model_files_are_one_line(damage, moe_bytes, tmp_path, capsys):
    header, data = _header(moe_bytes)
    path = tmp_path / "m.safetensors"
    path.write_bytes(_HEADERS[damage](header, data))
    for argv in (["eval", str(path)], ["merge", str(path), str(tmp_path / "out.safetensors")]):
        start = time.monotonic()
        code, err = _cli(argv, capsys, seconds=30)
        assert code == 2, err
        line = one_error(err)
        assert str(path) in line and time.monotonic() - start < 10
    assert not (tmp_path / "out.safetensors").exists()


@FEW
@given(st.sampled_from(["classes", "normalization", "dataset", "config", "weighting"]),
       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda s: st.lists(s, max_size=4) | st.dictionaries(st.sampled_from(["mean", "std", "depth", "x"]),
                                                                        s, max_size=3), max_leaves=10))
def test_generated_metadata_is_checked(tmp_path_factory, capsys, moe_bytes, entry, value):
    header, data = _header(moe_bytes)
    path = tmp_path_factory.mktemp("meta") / "m.safetensors"
    path.write_bytes(_pack(_meta(header, **{entry: value}), data))
    code, err = _cli(["merge", str(path), str(path.parent / "out.safetensors")], capsys)
    _ok_or_one_line(code, err)


def test_nan_normalisation_in_a_model_file_is_refused(moe_bytes, tmp_path, capsys):
    header, data = _header(moe_bytes)
    path = tmp_path / "m.safetensors"
    path.write_bytes(_pack(_meta(header, normalization={"mean": [float("nan")], "std": [0.3]}), data))
    code, err = _cli(["eval", str(path)], capsys)
    assert code == 2
    one_error(err, "metadata entry 'normalization' must be")


@FEW
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8) | st.floats(),
                    lambda s: st.lists(s, max_size=3) | st.dictionaries(st.sampled_from(
                        ["format", "files", "model.safetensors", "size", "sha256"]), s, max_size=3), max_leaves=8))
def test_generated_checkpoint_manifests_are_one_line(tiny_run, tmp_path_factory, capsys, manifest):
    run = tmp_path_factory.mktemp("man") / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "epoch-0001" / "manifest.json").write_text(json.dumps(manifest))
    code, err = _cli(["merge", str(run), str(run.parent / "out.safetensors")], capsys)
    assert code == 2
    one_error(err, "no usable checkpoint")


# -- 5. transformers directories ------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    from vitmoe.models.hf import export_hf

    out = tmp_path / "hf"
    export_hf(vitmoe.create_model("vit", head="linear", **TINY), out)
    return out


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


_HF_DAMAGE = {
    "hidden_size 100000": ({"hidden_size": 100000, "num_attention_heads": 1}, "for their weights alone, more than"),
    "hidden_size 2048": ({"hidden_size": 2048, "num_attention_heads": 1}, "its config describes a model of"),
    "layer_norm_eps text": ({"layer_norm_eps": "small"}, "field layer_norm_eps='small'"),
    "heads not dividing": ({"num_attention_heads": 5}, "field num_attention_heads=5"),
    "image size not square": ({"image_size": [32, 16]}, "is not square"),
    "depth 10**9": ({"num_hidden_layers": 10**9}, "field num_hidden_layers="),
}


@pytest.mark.parametrize("damage", list(_HF_DAMAGE))
def test_generated_transformers_configs_are_one_line(damage, hf_dir, tmp_path, capsys):
    changes, needle = _HF_DAMAGE[damage]
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, **changes}))
    for argv in (["upcycle", str(hf_dir), str(tmp_path / "u.safetensors")], ["info", str(hf_dir)]):
        code, err = _cli(argv, capsys)
        if argv[0] == "info" and damage.startswith("hidden_size"):
            assert code == 0  # counting a config allocates nothing
            continue
        assert code == 2, err
        line = one_error(err, needle)
        assert "layer_layer" not in line
    assert not (tmp_path / "u.safetensors").exists()


def test_transformers_files_that_are_not_what_they_say(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").write_bytes(b"\x89PNG\r\n" + bytes(range(256)))
    code, err = _cli(["upcycle", str(hf_dir), str(tmp_path / "u.safetensors")], capsys)
    assert code == 2
    one_error(err, "is not text")
    (hf_dir / "config.json").write_text("{" + '"a": 1,' * 400_000 + '"b": 2}')  # 2.8 MB
    code, err = _cli(["upcycle", str(hf_dir), str(tmp_path / "u.safetensors")], capsys)
    assert code == 2
    one_error(err, "more than the 1.0 MB")
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (hf_dir / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, hf_dir / "pytorch_model.bin")
    code, err = _cli(["upcycle", str(hf_dir), str(tmp_path / "u.safetensors")], capsys)
    assert code == 2 and not marker.exists()
    line = one_error(err, "cannot be read as plain tensors")
    assert "weights_only=False" not in err and "vitmoe never runs code" in line


# -- 6. values accepted must work ------------------------------------------------------------------------
def test_huge_capacity_factors_work(tiny_run, tmp_path, capsys):
    from vitmoe.moe.dispatch import expert_capacity

    assert expert_capacity(100, 1, 4, 1e300) == 100 and expert_capacity(100, 2, 8, 0.5) == 13
    assert expert_capacity(10, 1, 4, 0.1, minimum=10**30) == 10
    model = vitmoe.create_model("switch_vit", num_experts=4, capacity_factor_eval=1e18, **TINY).eval()
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, err = _cli(["eval", str(run), "--capacity-factors", "1e18", "1e300", "--out", str(tmp_path / "c")], capsys,
                     seconds=60)
    assert code == 0, err


@pytest.mark.parametrize("argv, needle", [
    (["--noise-std", "inf"], "--noise-std inf: a finite number >= 0"),
    (["--noise-std", "nan"], "--noise-std nan"),
    (["--seed", "1e23"], "invalid seed '1e23'"),
    (["--seed", str(2**70)], "invalid seed"),
])
def test_upcycle_refuses_values_that_would_break_the_model(argv, needle, tmp_path, capsys):
    dense = tmp_path / "d.safetensors"
    vitmoe.save_model(vitmoe.create_model("vit", **TINY), dense)
    code, err = _cli(["upcycle", str(dense), str(tmp_path / "u.safetensors"), *argv], capsys)
    assert code == 2
    one_error(err, needle)
    assert not (tmp_path / "u.safetensors").exists()


# -- 7. run files and sweeps ------------------------------------------------------------------------------
def test_damaged_run_files_are_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = (run / "config.yaml").read_bytes()
    (run / "config.yaml").write_bytes(bytes(range(256)) * 8)
    code, err = _cli(["eval", str(run)], capsys)
    assert code == 2
    one_error(err, "config.yaml is not text")
    (run / "config.yaml").write_bytes(saved)
    (run / "summary.json").write_bytes(b"\xff\xfe" + bytes(range(256)))
    code, err = _cli(["report", str(run), "--out", str(tmp_path / "rep")], capsys)
    assert code == 2
    one_error(err, "summary.json is not text")


def test_a_best_pointer_to_a_missing_checkpoint_is_said(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "best").write_text("epoch-0007\n")
    code, err = _cli(["merge", str(run), str(tmp_path / "m.safetensors"), "--checkpoint", "best"], capsys)
    assert code == 0
    assert "best names 'epoch-0007', which is not a checkpoint folder of the run: using epoch-0001" in err


@pytest.mark.parametrize("argv, needle", [
    (["--set", "seed=7", "--seeds", "3"], "--set seed=...: the sweep sets seed itself"),
    (["--grid", "seed=1,2"], "--grid seed: the sweep sets seed itself"),
    (["--grid", "out=/tmp/elsewhere"], "--grid out: the sweep sets out itself"),
    (["--set", "out=/tmp/elsewhere"], "--set out=...: the sweep sets out itself"),
    (["--grid", "lr=0.001,1e-3"], "are the same value (0.001)"),
    (["--grid", "model.moe.router=topk,'topk'"], "are the same value (topk)"),
    (["--grid", "model.num_experts=4,4.0"], "are the same value (4)"),
    # a true/false field reads yes/on as true (YAML 1.2 leaves them text): one value, not two cells
    (["--grid", "augment=true,yes"], "are the same value (true)"),
    (["--grid", "model.moe.residual=off,false"], "are the same value (false)"),
    (["--grid", "model.qkv_bias=No,false"], "are the same value (false)"),
])
def test_the_sweep_owns_seed_and_out_and_values_are_canonical(argv, needle, tmp_path, capsys):
    code, err = _cli(["sweep", "--out", str(tmp_path / "s"), "--epochs", "1", "--dataset", "digits", *argv], capsys)
    assert code == 2
    one_error(err, needle)
    assert not (tmp_path / "s").exists()


@FEW
@given(st.lists(st.text(min_size=1, max_size=6).filter(lambda v: "," not in v and v.strip()), min_size=1, max_size=5))
def test_sweep_member_names_are_unique_by_construction(values):
    from vitmoe.cli.common import CLIError
    from vitmoe.cli.sweep import cell_name, parse_grid

    try:
        grid = parse_grid([f"model.moe.router={','.join(values)}"])
    except CLIError:
        return
    names = [cell_name({"model.moe.router": v}) for v in grid["model.moe.router"]]
    assert len(set(names)) == len(names) and all("/" not in n and n not in (".", "..") for n in names)


def test_a_sweep_held_by_another_is_told_so(tmp_path, capsys, monkeypatch):
    from vitmoe.rundir import RunLock

    root = tmp_path / "s"
    monkeypatch.setattr("subprocess.call", lambda *a, **k: pytest.fail("a member started in a sweep held by another"))
    with RunLock(root):
        code, err = _cli(["sweep", "--out", str(root), "--epochs", "1", "--dataset", "digits", "--seeds", "1"], capsys)
    assert code == 2
    one_error(err, "is in use by another vitmoe process")
