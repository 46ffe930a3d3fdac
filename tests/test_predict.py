"""`vitmoe predict` and `vitmoe.load_classifier` / `predict`: a tiny model trained on a folder of
real image files classifies new files exactly as its logits, computed by hand through the
documented preprocessing (Pillow convert + bilinear resize, the training split's statistics),
say; every kind of model source; the CSV and JSON outputs parsed back; bad arguments as one line."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FOLDER_CLASSES as CLASSES, FOLDER_SIDE as SIDE, write_image as _image
from PIL import Image

import vitmoe
from vitmoe.cli.main import main
from vitmoe.data import DATASETS, Preprocessing
from vitmoe.models import load_model as load_file, read_metadata, save_model


def _ckpt(run: Path, which: str = "latest") -> Path:
    """The model file of the checkpoint the run's `latest` (or `best`) pointer names."""
    return run / "checkpoints" / (run / "checkpoints" / which).read_text().strip() / "model.safetensors"


def _by_hand(path: Path, size: int, gray: bool) -> np.ndarray:
    """The documented steps 1-2, written out: Pillow convert, bilinear resize of the whole image."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("L" if gray else "RGB").resize((size, size), Image.Resampling.BILINEAR), np.float64)
    return a[None] if gray else a.transpose(2, 0, 1)


def _train_stats(root: Path) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([_by_hand(p, SIDE, False) for p in sorted((root / "imgs" / "train").rglob("*.png"))]) / 255
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def _hand_probs(model, files, mean, std, size=SIDE, gray=False, input_size=None) -> torch.Tensor:
    x = torch.tensor(np.stack([_by_hand(f, size, gray) for f in files]), dtype=torch.float32)
    if input_size is not None and input_size != size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x / 255 - torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    with torch.no_grad():
        return torch.softmax(model.eval()(x), dim=-1)


def _new_files(new: Path) -> list[Path]:
    return sorted(p for p in new.rglob("*") if p.is_file())


def test_the_model_file_records_its_preprocessing(folder_run):
    root, run, _ = folder_run
    meta = read_metadata(_ckpt(run))
    pre = Preprocessing.from_dict(meta["preprocessing"])
    mean, std = _train_stats(root)  # the training split's statistics, computed from the files themselves
    assert (pre.size, pre.channels, pre.input_size, pre.resize) == (SIDE, 3, SIDE, "stretch")
    np.testing.assert_allclose(pre.mean, mean, atol=2e-6)
    np.testing.assert_allclose(pre.std, std, atol=2e-6)
    assert meta["classes"] == list(CLASSES)


def test_predictions_are_the_logits_of_the_documented_preprocessing(folder_run, capsys):
    root, run, new = folder_run
    preds = vitmoe.predict(run, [new], top_k=3)
    files = _new_files(new)
    assert [p.image for p in preds] == [str(f) for f in sorted(files)]
    meta = read_metadata(_ckpt(run))
    probs = _hand_probs(load_file(_ckpt(run)), [Path(p.image) for p in preds], meta["preprocessing"]["mean"],
                        meta["preprocessing"]["std"])
    top = probs.topk(3, dim=-1)
    assert [list(p.indices) for p in preds] == top.indices.tolist()
    np.testing.assert_allclose([p.probs for p in preds], top.values.numpy(), atol=1e-6)
    assert [p.label for p in preds] == [CLASSES[i] for i in probs.argmax(-1).tolist()]
    assert len({p.label for p in preds}) > 1  # the model tells the tints apart: the check is not vacuous
    # the command prints the same as a table: one row per image, every class with its percentage
    capsys.readouterr()
    assert main(["predict", str(run), str(new), "--top-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "3 classes, 16x16 RGB inputs" in out[0] and out[1].split() == ["image", "top-1", "top-2"]
    for p, line in zip(preds, out[2:], strict=True):
        assert line.split() == [p.image, p.classes[0], f"{100 * p.probs[0]:.1f}%", p.classes[1], f"{100 * p.probs[1]:.1f}%"]


def test_csv_and_json_outputs_parse_back(folder_run, tmp_path, capsys):
    _, run, new = folder_run
    want = vitmoe.predict(run, new, top_k=2)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(new), "--top-k", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == [p.image for p in want]
    assert [[r["class_1"], r["class_2"]] for r in rows] == [list(p.classes) for p in want]
    np.testing.assert_allclose([[float(r["probability_1"]), float(r["probability_2"])] for r in rows],
                               [p.probs for p in want], rtol=0, atol=1e-12)
    js = tmp_path / "p.json"
    assert main(["predict", str(run), str(new), "--top-k", "9", "--out", str(js), "--device", "cpu"]) == 0
    data = json.loads(js.read_text())
    assert data["classes"] == list(CLASSES) and data["top_k"] == 3 and data["mode"] is None
    assert data["preprocessing"] == read_metadata(_ckpt(run))["preprocessing"]
    full = vitmoe.predict(run, new, top_k=3)
    assert [d["image"] for d in data["predictions"]] == [p.image for p in full]
    assert [[t["class"] for t in d["top"]] for d in data["predictions"]] == [list(p.classes) for p in full]
    np.testing.assert_allclose([sum(t["probability"] for t in d["top"]) for d in data["predictions"]], 1, atol=1e-6)
    # never replaced without --force; a format the name does not say is refused; both before any work
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["predict", str(run), str(new), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and out.read_bytes() == before
    assert main(["predict", str(run), str(new), "--out", str(out), "--force", "--top-k", "1", "--device", "cpu"]) == 0
    assert next(csv.reader(out.open())) == ["image", "class_1", "probability_1"]
    assert main(["predict", str(run), str(new), "--out", str(tmp_path / "p.txt")]) == 2
    assert ".csv or .json" in capsys.readouterr().err


def test_every_kind_of_model_source(folder_run, tmp_path, capsys):
    _, run, new = folder_run
    ckpt = _ckpt(run)
    want = [p.probs for p in vitmoe.predict(ckpt, new)]
    for source in (run, run / "checkpoints" / "latest", ckpt.parent):
        assert [p.probs for p in vitmoe.predict(source, new)] == want, source
    best = [p.probs for p in vitmoe.predict(_ckpt(run, "best"), new)]
    assert [p.probs for p in vitmoe.predict(run, new, checkpoint="best")] == best
    assert [p.probs for p in vitmoe.predict(run / "checkpoints" / "best", new)] == best
    # vitmoe.load_model takes a run directory and its pointer files too
    for source in (run, run / "checkpoints" / "latest"):
        got = vitmoe.load_model(source).state_dict()
        assert all(torch.equal(v, load_file(ckpt).state_dict()[k]) for k, v in got.items())
    # `vitmoe eval` of the pointer file (it was read as safetensors: "header too large")
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoints" / "latest"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["checkpoint"] == str(ckpt)
    # a model file written before preprocessing was recorded: its folder's statistics, from the cache
    meta = {k: v for k, v in read_metadata(ckpt).items() if k not in ("format", "config", "preprocessing")}
    save_model(load_file(ckpt), tmp_path / "old.safetensors", metadata=meta)
    np.testing.assert_allclose([p.probs for p in vitmoe.predict(tmp_path / "old.safetensors", new)], want, atol=1e-6)
    assert main(["predict", str(tmp_path / "missing"), str(new)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitmoe: error: ") and err.count("\n") == 1 and "missing" in err


def test_a_builtin_dataset_model_goes_through_the_datasets_side(tmp_path):
    """A digits model trained at img_size 12: files are made 8x8 (digits' side), resized to 12x12
    on the batch as the loaders do, normalised with digits' constants."""
    model = vitmoe.create_model("vit", img_size=12, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                                mlp_hidden=16, head="linear", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(model, tmp_path / "digits.safetensors", metadata={"dataset": "digits"})  # no preprocessing entry
    files = []
    for i in range(3):
        files.append(tmp_path / f"d{i}.png")
        _image(files[-1], (17 + 5 * i, 19), i, i)
    preds = vitmoe.predict(tmp_path / "digits.safetensors", files, top_k=10)
    info = DATASETS["digits"]
    probs = _hand_probs(model, files, info.mean, info.std, size=8, gray=True, input_size=12)
    assert [p.classes for p in preds] == [tuple(str(i) for i in row) for row in probs.argsort(-1, descending=True).tolist()]
    np.testing.assert_allclose([sorted(p.probs, reverse=True) for p in preds],
                               probs.sort(-1, descending=True).values.numpy(), atol=1e-6)


def test_random_routing_modes(tmp_path, capsys):
    moe = vitmoe.create_model("random_vit", img_size=SIDE, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                              mlp_hidden=16, head="linear", num_classes=3, num_experts=3,
                              moe={"expert_init": "independent"})
    pre = Preprocessing(SIDE, 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), SIDE)
    save_model(moe, tmp_path / "rv.safetensors", metadata={"preprocessing": pre.to_dict(), "classes": list(CLASSES)})
    files = [tmp_path / f"{i}.png" for i in range(4)]
    for i, f in enumerate(files):
        _image(f, (20, 20 + i), i % 3, i)
    x = pre.load(files)
    for mode in ("merged", "ensemble"):
        clf = vitmoe.load_classifier(tmp_path / "rv.safetensors", mode=mode)
        moe.set_eval_mode(mode)
        with torch.no_grad():
            want = torch.softmax(moe.eval()(x), -1).max(-1).values
        assert clf.mode == mode
        np.testing.assert_allclose([p.prob for p in clf.predict(files)], want.numpy(), atol=1e-6)
    # random routes: seeded, so two runs with one seed agree
    a = [p.probs for p in vitmoe.predict(tmp_path / "rv.safetensors", files, mode="random", seed=3, batch_size=1)]
    b = [p.probs for p in vitmoe.predict(tmp_path / "rv.safetensors", files, mode="random", seed=3, batch_size=1)]
    assert a == b
    dense = vitmoe.create_model("vit", img_size=SIDE, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_hidden=16,
                                head="linear", num_classes=3)
    save_model(dense, tmp_path / "d.safetensors", metadata={"preprocessing": pre.to_dict()})
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "d.safetensors"), str(files[0]), "--mode", "random"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mode" in err and "random" in err


def test_images_arguments_and_bad_files(folder_run, tmp_path, capsys):
    _, run, new = folder_run
    got = vitmoe.predict(run, [str(new / "*.png"), new / "n0.png", str(new / "**" / "*.jpg")])
    assert [Path(p.image).name for p in got] == ["n0.png", "n2.png", "n1.jpg", "n5.jpg"]  # each once, in order
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    capsys.readouterr()
    for args, text in (([str(tmp_path / "nope.png")], "no such file or folder"),
                       ([str(tmp_path / "empty")], "holds no images"),
                       ([str(tmp_path / "*.jpg")], "matches no image files"),
                       ([str(new / "n0.png"), str(bad)], "--skip-bad-images")):
        assert main(["predict", str(run), *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitmoe: error: ") and err.count("\n") == 1 and text in err, err
    assert main(["predict", str(run), str(new / "n0.png"), str(bad), "--skip-bad-images", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s)" in captured.err and str(bad) in captured.err
    assert len(captured.out.splitlines()) == 3  # the header line, the table's header and n0.png
