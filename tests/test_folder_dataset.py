"""`--dataset folder:PATH`: your own images (decode, cache, split, errors, streaming) and the loader resize."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETS

from vitmoe.training.config import resolve
import yaml
import torch
import torch.nn.functional as F
from PIL import Image

from vitmoe.cli.main import main
from vitmoe.data import DeviceLoader, StreamingLoader, get_info, load_dataset, make_loader
from vitmoe.data import folder as fd
from vitmoe.data.augment import normalize
from vitmoe.training.config import TrainConfig
from vitmoe.validation import ConfigError


@pytest.fixture(autouse=True)
def _fresh_memo():
    fd._MEMO.clear()
    yield
    fd._MEMO.clear()


def _save(path: Path, size: tuple[int, int], gray: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_tree(root: Path, classes=("ant", "bee", "cat"), per_class=4, test_per_class=2, gray=lambda i: i % 3 == 0):
    """PNG and JPEG files of varied sizes, some grayscale; train/ and (if test_per_class) test/."""
    k = 0
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in classes:
            for i in range(n):
                ext = ".png" if i % 2 == 0 else ".jpg"
                _save(root / split / c / f"img{i}{ext}", (12 + 3 * i, 9 + 5 * (k % 4)), gray(k), k)
                k += 1
    return root


def pillow_reference(path: Path, size: int, gray: bool) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L" if gray else "RGB").resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(im)
    return a[None] if gray else a.transpose(2, 0, 1)


def test_reads_the_files_as_pillow_resizes_them(tmp_path):
    root = make_tree(tmp_path / "imgs")
    name = f"folder:{root}"
    train = load_dataset(name, "train", img_size=16)
    test = load_dataset(name, "test", img_size=16)
    info = train.info
    assert info.classes == ["ant", "bee", "cat"] and info.num_classes == 3
    assert info.in_chans == 3 and info.img_size == 16 and info.crop_padding == 2 and info.hflip
    for split, data in (("train", train), ("test", test)):
        files = [(p, label) for label, c in enumerate(info.classes)
                 for p in sorted((root / split / c).iterdir())]
        assert len(data) == len(files)
        for row, (p, label) in enumerate(files):
            assert data.labels[row].item() == label
            np.testing.assert_array_equal(data.images[row].numpy(), pillow_reference(p, 16, gray=False))
    # statistics of the training split
    x = train.images.double() / 255
    assert info.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-5)
    assert info.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), correction=0).tolist()), abs=1e-5)


def test_grayscale_folder_gives_one_channel(tmp_path):
    root = make_tree(tmp_path / "g", gray=lambda i: True, test_per_class=0)
    data = load_dataset(f"imagefolder:{root}", "train", img_size=8)
    assert data.info.in_chans == 1 and tuple(data.images.shape[1:]) == (1, 8, 8)
    first = sorted((root / "train" / "ant").iterdir())
    # without test/ the split holds out some images: the train rows are a subset of the files, in order
    refs = [pillow_reference(p, 8, gray=True) for p in first]
    assert any(np.array_equal(data.images[0].numpy(), r) for r in refs)


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imgs")
    name = f"folder:{root}"
    first = load_dataset(name, "train", img_size=12).images.clone()
    assert (root / fd.CACHE_DIR / "s12" / "manifest.json").is_file()
    fd._MEMO.clear()

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(fd, "decode_image", no_decode)
        assert torch.equal(load_dataset(name, "train", img_size=12).images, first)
    fd._MEMO.clear()
    calls = []
    real = fd.decode_image
    monkeypatch.setattr(fd, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    target = root / "train" / "bee" / "img0.png"
    _save(target, (20, 20), False, 999)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_dataset(name, "train", img_size=12)
    assert calls, "a changed file must rebuild the cache"
    row = 4  # ant has 4 training images, then bee/img0.png
    np.testing.assert_array_equal(again.images[row].numpy(), pillow_reference(target, 12, gray=False))
    # a new image size is a cache of its own
    assert load_dataset(name, "train", img_size=10).info.img_size == 10


def test_split_is_seeded_and_stratified(tmp_path):
    labels = np.repeat(np.arange(3), [10, 5, 1])
    train, test = fd.split_indices(labels, 0.2)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
    again = fd.split_indices(labels, 0.2)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(fd.split_indices(labels, 0.2, seed=1)[1], test)

    root = make_tree(tmp_path / "s", per_class=10, test_per_class=0)
    name = f"folder:{root}"
    tr, te = load_dataset(name, "train", test_fraction=0.3), load_dataset(name, "test", test_fraction=0.3)
    assert torch.bincount(te.labels).tolist() == [3, 3, 3] and torch.bincount(tr.labels).tolist() == [7, 7, 7]
    fd._MEMO.clear()
    assert torch.equal(load_dataset(name, "test", test_fraction=0.3).labels, te.labels)


def _train_cli(path, tmp_path, *extra):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", f"folder:{path}", "--epochs", "1", "--batch", "8", "--device", "cpu",
               "--out", str(out), *TINY_SETS, *extra])
    return rc, out


@pytest.mark.parametrize("case", ["corrupt", "truncated", "empty_class", "unknown_test_class", "no_images",
                                  "missing", "test_without_train"])
def test_bad_folders_are_one_line_errors_before_training(tmp_path, capsys, case):
    root = tmp_path / "imgs"
    if case not in ("missing", "no_images", "test_without_train"):
        make_tree(root)
    named = str(root)
    if case == "corrupt":
        bad = root / "train" / "bee" / "broken.png"
        bad.write_bytes(b"not an image at all")
        named = str(bad)
    elif case == "truncated":
        bad = root / "train" / "cat" / "img0.png"
        bad.write_bytes(bad.read_bytes()[:60])
        named = str(bad)
    elif case == "empty_class":
        (root / "train" / "dog").mkdir()
        named = str(root / "train" / "dog")
    elif case == "unknown_test_class":
        _save(root / "test" / "emu" / "a.png", (8, 8), False, 1)
        named = str(root / "test" / "emu")
    elif case == "no_images":
        root.mkdir()
    elif case == "test_without_train":
        _save(root / "test" / "a" / "a.png", (8, 8), False, 1)
    rc, out = _train_cli(root, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vitmoe: error: ") and named in err[0], err
    assert not out.exists()


def test_skip_bad_images_counts_them(tmp_path):
    root = make_tree(tmp_path / "imgs")
    (root / "train" / "bee" / "broken.png").write_bytes(b"garbage")
    (root / "test" / "ant" / "broken.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        data = fd.prepare_folder(f"folder:{root}", 16, skip_bad_images=True)
    assert len(data.train) == 12 and len(data.test) == 6 and len(data.skipped) == 2
    # without the flag the same folder is an error naming the file
    fd._MEMO.clear()
    with pytest.raises(fd.DatasetError, match="broken"):
        fd.prepare_folder(f"folder:{root}", 16)


def test_streaming_loader_gives_the_device_loaders_batches(tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=7)
    data = load_dataset(f"folder:{root}", "train", img_size=16)
    for train in (True, False):
        kw = dict(train=train, seed=3, augment=True, resize_to=20)
        stream = make_loader(data, 5, "cpu", stream_above_bytes=0, **kw)
        device = make_loader(data, 5, "cpu", stream_above_bytes=1e9, **kw)
        assert type(stream) is StreamingLoader and type(device) is DeviceLoader
        for epoch in (1, 2):
            pairs = list(zip(stream.iter_epoch(epoch), device.iter_epoch(epoch), strict=True))
            assert len(pairs) == len(device) == 5
            for (xs, ys), (xd, yd) in pairs:
                assert torch.equal(ys, yd) and torch.equal(xs, xd)
    # sharded over two ranks, in chunks of one batch, of two, or all at once; resumed mid-epoch
    for chunk_bytes in (1, 2 * 6 * 3 * 16 * 16, 2**30):
        a = StreamingLoader(data, 6, "cpu", train=True, rank=1, world_size=2, seed=1)
        a.chunk_bytes = chunk_bytes
        b = DeviceLoader(data, 6, "cpu", train=True, rank=1, world_size=2, seed=1)
        for start in (0, 1):
            for (xs, ys), (xd, yd) in zip(a.iter_epoch(1, start), b.iter_epoch(1, start), strict=True):
                assert torch.equal(xs, xd) and torch.equal(ys, yd)


def test_stream_threshold_field_picks_the_streaming_loader(tmp_path):
    from vitmoe.training.loop.loaders import build_loaders
    from vitmoe.training.distributed.context import DistContext

    root = make_tree(tmp_path / "imgs")
    cfg = TrainConfig(model="vit", dataset=f"folder:{root}", img_size=16, stream_above_mb=0.001, batch_size=4,
                      model_config={"embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_hidden": 32}).validate()
    train, test = build_loaders(resolve(cfg), DistContext(device=torch.device("cpu")), torch.device("cpu"))
    assert isinstance(train, StreamingLoader) and isinstance(test, DeviceLoader)  # test: 6x3x16x16 < 1 kB


def test_loader_resize_matches_interpolate_of_the_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g)
    from vitmoe.data import DATASETS, ImageData

    import dataclasses

    info = DATASETS["cifar10"]
    data = ImageData(images, torch.arange(10) % 10, dataclasses.replace(info, img_size=8))
    loader = DeviceLoader(data, 4, "cpu", train=False, resize_to=24)
    x, _ = next(iter(loader))
    ref = F.interpolate(images[:4].float(), size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    assert x.shape == (4, 3, 24, 24)
    torch.testing.assert_close(x, normalize(ref, info.mean, info.std))
    # downscaling too, and no resize when the size already matches
    small, _ = next(iter(DeviceLoader(data, 4, "cpu", train=False, resize_to=5)))
    ref = F.interpolate(images[:4].float(), size=(5, 5), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(small, normalize(ref, info.mean, info.std))
    assert DeviceLoader(data, 4, "cpu", train=False, resize_to=8).resize_to is None


def test_img_size_field_sets_the_model_side_for_builtin_datasets():
    mc = dict(embed_dim=16, depth=1, num_heads=2, mlp_hidden=32)
    cfg = TrainConfig(model="vit", dataset="digits", img_size=16, model_config=mc).validate()
    assert resolve(cfg).model.img_size == 16
    assert resolve(TrainConfig(model="vit", dataset="digits", model_config=mc)).model.img_size == 8
    with pytest.raises(ConfigError, match="img_size=16"):
        TrainConfig(model="vit", dataset="digits", model_config={**mc, "img_size": 16}).validate()
    with pytest.raises(ConfigError, match="folder_test_fraction"):
        TrainConfig(dataset="digits", folder_test_fraction=1.5).validate()


def test_train_and_eval_a_folder_run(tmp_path, capsys, monkeypatch):
    root = make_tree(tmp_path / "imgs", per_class=6)
    rc, out = _train_cli(root, tmp_path, "--img-size", "16", "--model", "vit")
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["ant", "bee", "cat"] and summary["dataset"] == f"folder:{root}"
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # eval resolves the folder from the run's config, from anywhere
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["classes"] == ["ant", "bee", "cat"] and r["images"] == 6
    per_class = r["per_class"]  # {name: [accuracy %, images]}, consistent with the total
    assert list(per_class) == ["ant", "bee", "cat"] and [n for _, n in per_class.values()] == [2, 2, 2]
    assert sum(a * n for a, n in per_class.values()) / 6 == pytest.approx(r["test_acc"])
    assert main(["report", str(out)]) == 0
    assert "ant, bee, cat" in capsys.readouterr().out
    # the classes changed since training: eval refuses to mislabel
    _save(root / "train" / "dog" / "a.png", (8, 8), False, 5)
    fd._MEMO.clear()
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    assert "classes" in capsys.readouterr().err


def test_get_info_of_a_folder(tmp_path):
    root = make_tree(tmp_path / "imgs")
    info = get_info(f"folder:{root}", img_size=16)
    assert info.classes == ["ant", "bee", "cat"] and info.img_size == 16


def test_read_only_folder_caches_under_the_data_dir(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imgs")
    monkeypatch.setattr(fd, "_writable", lambda folder: False)
    data = fd.prepare_folder(f"folder:{root}", 16, data_dir=tmp_path / "d")
    assert data.cache_dir.parent.parent == tmp_path / "d" / "folder-cache"
    assert not (root / fd.CACHE_DIR / "s16").exists() and len(data.train) == 12


def test_builtin_dataset_trained_and_evaluated_at_another_size(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "digits", "--img-size", "12", "--model", "vit", "--epochs", "1", "--batch", "256",
               "--device", "cpu", "--out", str(out), *TINY_SETS])
    assert rc == 0, capsys.readouterr().err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["img_size"] == 12 and cfg["resolved_model_config"]["img_size"] == 12
    assert "images resized 8x8 -> 12x12 on the device" in capsys.readouterr().out
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0  # the 8x8 test images resized to 12x12
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["images"] == 359 and r["classes"] == [str(i) for i in range(10)] and "per_class" not in r
    assert main(["eval", str(out), "--per-class", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("% of ") == 10


@pytest.mark.parametrize("field,value", [("img_size", 0), ("img_size", 100000), ("folder_test_fraction", 0),
                                         ("folder_test_fraction", 1), ("stream_above_mb", -1),
                                         ("skip_bad_images", "maybe")])
def test_data_fields_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(dataset="digits", **{field: value}).validate()


def test_folder_name_spellings(tmp_path):
    root = make_tree(tmp_path / "imgs")
    for spelling in (f"folder:{root}", f"imagefolder:{root}", f"ImageFolder:{root}/"):
        cfg = TrainConfig(model="vit", dataset=spelling, model_config={"embed_dim": 16, "depth": 1, "num_heads": 2,
                                                                      "mlp_hidden": 32}).validate()
        assert cfg.dataset == f"folder:{root}" and resolve(cfg).model.num_classes == 3
    with pytest.raises(ConfigError, match="folder:PATH"):
        TrainConfig(dataset="nosuchset").validate()


def test_a_failed_rebuild_leaves_no_valid_cache(tmp_path):
    root = make_tree(tmp_path / "imgs")
    name = f"folder:{root}"
    before = load_dataset(name, "train", img_size=8).images.clone()
    manifest = root / fd.CACHE_DIR / "s8" / "manifest.json"
    assert manifest.is_file()
    bad = root / "train" / "ant" / "zzz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(fd.DatasetError, match="zzz.png"):
        load_dataset(name, "train", img_size=8)
    assert not manifest.exists()
    bad.unlink()
    assert torch.equal(load_dataset(name, "train", img_size=8).images, before)


def test_skip_bad_images_flag_trains_and_reports_the_count(tmp_path, capsys):
    root = make_tree(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc, out = _train_cli(root, tmp_path, "--skip-bad-images", "--model", "vit")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipped 1 unreadable image(s)" in captured.err and "broken.jpg" in captured.err
    assert json.loads((out / "summary.json").read_text())["test_images"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["skip_bad_images"] is True
