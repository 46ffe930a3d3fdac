"""Own images at pretrained sizes: `folder_resize: crop` (shorter side, centre crop for evaluation,
random-resized crops for training), checked against transcriptions of torchvision's
RandomResizedCrop, F.interpolate and transformers' image processors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FOLDER_CLASSES, TINY_SETS, write_image
from PIL import Image

import vitmoe
from vitmoe.cli.main import main
from vitmoe.data import DeviceLoader, Preprocessing, load_dataset
from vitmoe.data import augment as aug
from vitmoe.data import folder as fd
from vitmoe.data.seeding import derive_seed, device_generator
from vitmoe.training.config import TrainConfig
from vitmoe.validation import ConfigError


@pytest.fixture(autouse=True)
def _fresh_memo():
    fd._MEMO.clear()
    yield
    fd._MEMO.clear()


# ---------------------------------------------------------------------------------- the crop boxes


def _torchvision_boxes(n, height, width, seed, scale=aug.RRC_SCALE, ratio=aug.RRC_RATIO):
    """RandomResizedCrop.get_params image by image (torchvision's loop), fed the same uniform draws
    the batched version consumes (areas, log-ratios, positions)."""
    gen = torch.Generator().manual_seed(seed)
    areas = torch.rand(n, 10, generator=gen, dtype=torch.float64)
    logs = torch.rand(n, 10, generator=gen, dtype=torch.float64)
    pos = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    out = []
    for b in range(n):
        for t in range(10):
            target = height * width * (scale[0] + (scale[1] - scale[0]) * float(areas[b, t]))
            lo, hi = math.log(ratio[0]), math.log(ratio[1])
            aspect = math.exp(lo + (hi - lo) * float(logs[b, t]))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                out.append((int(float(pos[b, 0]) * (height - h + 1)), int(float(pos[b, 1]) * (width - w + 1)), h, w))
                break
        else:
            r = width / height
            if r < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif r > max(ratio):
                h, w = height, int(round(height * max(ratio)))
            else:
                w, h = width, height
            out.append(((height - h) // 2, (width - w) // 2, h, w))
    return torch.tensor(out)


@pytest.mark.parametrize("height,width,scale", [(37, 37, aug.RRC_SCALE), (20, 50, aug.RRC_SCALE),
                                                (37, 37, (0.9, 1.0)), (10, 40, (1.5, 2.0))])
def test_boxes_are_torchvisions_draws(height, width, scale):
    gen = torch.Generator().manual_seed(3)
    boxes = aug.resized_crop_boxes(400, height, width, gen, scale=scale)
    assert torch.equal(boxes, _torchvision_boxes(400, height, width, 3, scale=scale))
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all())


def test_box_areas_and_ratios_follow_the_recipe():
    boxes = aug.resized_crop_boxes(20000, 256, 256, torch.Generator().manual_seed(0))
    h, w = boxes[:, 2].double(), boxes[:, 3].double()
    frac, ratio = h * w / 256**2, w / h
    # area uniform on [0.08, 1] before the integer rounding and the re-draw of boxes that do not fit
    assert frac.min() > 0.075 and frac.max() <= 1.0
    assert ratio.min() > 0.73 and ratio.max() < 1.36  # 3/4 and 4/3, give or take the rounding of the sides
    assert abs(float(ratio.log().mean())) < 0.01  # log-uniform around 1
    # the mean area is below 0.54, the mean of U(0.08, 1): large crops of extreme ratios do not fit and are drawn again
    assert 0.44 < float(frac.mean()) < 0.52


def test_resized_crop_equals_interpolate_of_each_crop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 37, 37), dtype=torch.uint8)
    boxes = aug.resized_crop_boxes(64, 37, 37, torch.Generator().manual_seed(1))
    got = aug.resized_crop_at(x, boxes, 32)
    assert got.dtype == torch.uint8 and got.shape == (64, 3, 32, 32)
    worst = 0
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w].double(), size=(32, 32), mode="bilinear",
                            align_corners=False).round()
        worst = max(worst, int((got[i:i + 1].double() - ref).abs().max()))
    assert worst <= 1  # float32 coordinates against float64: a value at .5 may round the other way
    same = aug.resized_crop_at(x, torch.tensor([[0, 0, 37, 37]] * 64), 37)
    assert torch.equal(same, x)  # the whole image at its own size is the image


def test_center_crop_takes_the_window_of_transformers():
    x = torch.arange(2 * 9 * 12).reshape(1, 2, 9, 12)
    assert torch.equal(aug.center_crop(x, 4), x[..., 2:6, 4:8])


# -------------------------------------------------------------------------------- files and folders


def _photo(path: Path, size: tuple[int, int], seed: int, tint: int = 0) -> Path:
    write_image(path, size, tint, seed)
    return path


@pytest.mark.parametrize("size", [(64, 40), (40, 64), (50, 50), (33, 90)])
def test_decode_crop_keeps_the_aspect_ratio(tmp_path, size):
    p = _photo(tmp_path / "a.png", size, 0)
    got = fd.decode_image(p, 20, gray=False, resize="crop")
    w, h = size
    nw, nh = (20, int(20 * h / w)) if w <= h else (int(20 * w / h), 20)
    with Image.open(p) as im:
        ref = np.asarray(im.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    top, left = (nh - 20) // 2, (nw - 20) // 2
    assert np.array_equal(got, ref[:, top:top + 20, left:left + 20])


def test_the_window_is_the_one_step_centre_crop(tmp_path):
    """Shorter side 37, window 32 (an odd margin): the stored square's centred window is the resized
    image's centred window, as a one-step centre crop takes it."""
    p = _photo(tmp_path / "tall.png", (33, 90), 0)
    with Image.open(p) as im:
        full = np.asarray(im.convert("RGB").resize((37, int(37 * 90 / 33)), Image.Resampling.BILINEAR))
    top = (full.shape[0] - 32) // 2
    square = fd.decode_image(p, 37, gray=False, resize="crop", window=32)
    assert np.array_equal(aug.center_crop(torch.from_numpy(square.copy()), 32).numpy(),
                          full[top:top + 32, 2:34].transpose(2, 0, 1))


def test_preprocessing_is_transformers_shortest_edge_and_centre_crop(tmp_path):
    transformers = pytest.importorskip("transformers")
    pre = Preprocessing(size=37, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), input_size=32,
                        resize="crop", crop=32)
    hf = transformers.BitImageProcessor(**{k: v for k, v in vitmoe.models.hf.hf_preprocessor_config(pre).items()
                                           if k != "image_processor_type"})
    for i, size in enumerate([(64, 40), (40, 64), (37, 37), (33, 90), (101, 77)]):
        p = _photo(tmp_path / f"{i}.png", size, i)
        ours = pre.load([p])
        with Image.open(p) as im:
            theirs = hf(im.convert("RGB"), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_preprocessing_record_round_trips():
    pre = Preprocessing(size=37, channels=1, mean=(0.5,), std=(0.2,), input_size=32, resize="crop", crop=32)
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    old = Preprocessing(size=16, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3, input_size=16)
    assert "crop" not in old.to_dict()  # model files of stretch runs are written as before
    with pytest.raises(ValueError, match="crop 40 must be an integer from 1 to size"):
        Preprocessing(size=37, channels=1, mean=(0.5,), std=(0.2,), input_size=32, resize="crop", crop=40)


def _tree(root: Path, sizes=((48, 30), (30, 48), (40, 40), (60, 24))) -> Path:
    k = 0
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(FOLDER_CLASSES):
            for i in range(n):
                _photo(root / split / name / f"{i}.png", sizes[(i + k) % len(sizes)], k, c)
                k += 1
    return root


def test_crop_cache_loader_and_stretch_cache_live_side_by_side(tmp_path):
    root = _tree(tmp_path / "imgs")
    name = f"folder:{root}"
    train = load_dataset(name, "train", img_size=16, resize="crop")
    assert train.info.img_size == 16 and train.info.stored_size == 18 and train.images.shape[1:] == (3, 18, 18)
    assert (root / ".vitmoe-cache" / "c18").is_dir() is False and (root / ".vitmoe-cache" / "c16").is_dir()
    first = sorted((root / "train" / FOLDER_CLASSES[0]).iterdir())[0]
    assert np.array_equal(train.images[0].numpy(), fd.decode_image(first, 18, gray=False, resize="crop", window=16))
    assert load_dataset(name, "train", img_size=16).images.shape[1:] == (3, 16, 16)  # stretch: its own cache
    test = load_dataset(name, "test", img_size=16, resize="crop")
    ev = DeviceLoader(test, 4, "cpu", train=False)
    x, _ = next(iter(ev))
    ref = aug.normalize(aug.center_crop(test.images[:4], 16), ev.mean, ev.std)
    assert torch.equal(x, ref)
    tr = DeviceLoader(train, 6, "cpu", train=True, seed=5)
    xa, _ = next(iter(tr))
    assert xa.shape == (6, 3, 16, 16)
    # what the training batch is, by hand: the same draws, boxes then flips
    gen = device_generator(torch.device("cpu"), derive_seed(5, 0, 1, 0))  # seed, epoch, the augmentation stream, batch
    boxes = aug.resized_crop_boxes(6, 18, 18, gen)
    flips = aug.flip_mask(6, gen)
    idx = tr.epoch_order(0)[:6]
    by_hand = aug.hflip_where(aug.resized_crop_at(train.images[idx], boxes, 16), flips)
    assert torch.equal(xa, aug.normalize(by_hand, tr.mean, tr.std))
    # two ranks together draw the one-process batch
    halves = [next(iter(DeviceLoader(train, 6, "cpu", train=True, seed=5, rank=r, world_size=2)))[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), xa)


def test_folder_resize_is_a_checked_field():
    with pytest.raises(ConfigError, match="folder_resize"):
        TrainConfig(model="vit", dataset="digits", folder_resize="squash").validate()


def test_train_predict_and_export_agree_on_crop_folders(tmp_path, capsys):
    """A crop run: its test accuracy is that of `vitmoe eval`; `predict` on the test files gives the
    evaluation batches' logits; transformers' pipeline on the HF export gives predict's top-k."""
    root = _tree(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--img-size", "16", "--folder-resize", "crop",
                 "--model", "vit", "--epochs", "2", "--batch", "6", "--device", "cpu", "--out", str(run),
                 "--lr", "0.01", *TINY_SETS]) == 0
    clf = vitmoe.load_classifier(run)
    assert clf.preprocessing.resize == "crop" and (clf.preprocessing.size, clf.preprocessing.crop) == (18, 16)
    files = sorted((root / "test").rglob("*.png"))
    logits = clf.logits(files)
    test = load_dataset(f"folder:{root}", "test", img_size=16, resize="crop")
    ev = DeviceLoader(test, len(test), "cpu", train=False, mean=clf.preprocessing.mean, std=clf.preprocessing.std)
    x, _ = next(iter(ev))
    # the cache lists test files in the same sorted class/name order
    with torch.no_grad():
        torch.testing.assert_close(logits, clf.model(x).float(), atol=1e-5, rtol=0)
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "BitImageProcessor" and processor["size"] == {"shortest_edge": 18}
    pipe = transformers.pipeline("image-classification", model=str(out), device="cpu")
    preds = vitmoe.predict(run, files, top_k=3)
    for p in preds:
        got = pipe(p.image, top_k=3)
        assert [g["label"] for g in got] == list(p.classes), p.image
        np.testing.assert_allclose([g["score"] for g in got], p.probs, atol=1e-5)
    # and the export reads back as the same preprocessing
    assert vitmoe.load_classifier(out).preprocessing == clf.preprocessing


def test_hf_processors_other_than_vit_must_spell_out_their_steps(tmp_path):
    """An integer size is a shortest edge for BitImageProcessor, and its defaults (bicubic, CLIP's
    statistics) are not ViTImageProcessor's: a file that leaves them out is refused, naming them."""
    from vitmoe.inference.sources import _hf_preprocessing
    from vitmoe.models import ModelFileError, create_model

    model = create_model("vit", img_size=32, embed_dim=16, depth=1, num_heads=2, mlp_hidden=16, num_classes=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "size": 224, "do_center_crop": True, "crop_size": 224}))
    with pytest.raises(ModelFileError, match="BitImageProcessor without resample, image_mean, image_std"):
        _hf_preprocessing(tmp_path, model)
    full = {"image_processor_type": "BitImageProcessor", "size": 37, "do_center_crop": True, "crop_size": 32,
            "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(full))
    pre = _hf_preprocessing(tmp_path, model)
    assert (pre.resize, pre.size, pre.crop, pre.input_size) == ("crop", 37, 32, 32)  # 37 is a shortest edge


def test_hf_export_crops_at_the_models_side():
    """A crop that is not the model's side (an imported 384 model whose processor crops 224) is
    written scaled to the model's side, so the pipeline feeds the model its own size."""
    pre = Preprocessing(size=256, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=384, resize="crop", crop=224)
    cfg = vitmoe.models.hf.hf_preprocessor_config(pre)
    assert cfg["crop_size"] == {"height": 384, "width": 384} and cfg["size"] == {"shortest_edge": 439}


def test_extreme_aspect_ratios_are_refused_before_a_huge_resize(tmp_path):
    p = _photo(tmp_path / "line.png", (20, 1300), 0)  # 65:1
    with pytest.raises(ValueError, match=r"20x1300 pixels: an aspect ratio beyond 64:1"):
        fd.decode_image(p, 16, gray=False, resize="crop")
    assert fd.decode_image(p, 16, gray=False).shape == (3, 16, 16)  # stretch reads it as before
    root = _tree(tmp_path / "imgs")
    bad = root / "train" / FOLDER_CLASSES[0] / "line.png"
    bad.write_bytes(p.read_bytes())
    with pytest.raises(vitmoe.data.DatasetError, match=r"cannot read image .*line.png: ValueError: 20x1300 pixels"):
        load_dataset(f"folder:{root}", "train", img_size=16, resize="crop")
    fd._MEMO.clear()
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        data = load_dataset(f"folder:{root}", "train", img_size=16, resize="crop", skip_bad_images=True)
    assert len(data) == 12


def test_train_help_keeps_each_folder_fields_own_text(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "skip unreadable images (counted in a warning) instead of failing on the first" in text
    assert "how files become img_size squares" in text
