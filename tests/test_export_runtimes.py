"""Exports that run where they are meant to: `vitmoe export --format hf` under
`transformers.pipeline("image-classification")` and `--format onnx` under onnxruntime give what
`vitmoe predict` gives for the same image files; what a format cannot hold is one error line that
names the setting (or --merge) that avoids it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FOLDER_CLASSES, FOLDER_SIDE, write_image

import vitmoe
from vitmoe.cli.main import main
from vitmoe.data import Preprocessing
from vitmoe.models import save_model

SMALL = dict(img_size=FOLDER_SIDE, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_hidden=16, num_classes=3)


def _files(new: Path) -> list[Path]:
    return sorted(p for p in new.rglob("*") if p.is_file())


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_transformers_pipeline_gives_the_predictions_of_vitmoe_predict(folder_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, run, new = folder_run
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    processor = json.loads((out / "preprocessor_config.json").read_text())
    pre = vitmoe.load_classifier(run).preprocessing
    assert processor["image_mean"] == list(pre.mean) and processor["size"] == {"height": FOLDER_SIDE, "width": FOLDER_SIDE}
    pipe = transformers.pipeline("image-classification", model=str(out), device="cpu")
    preds = vitmoe.predict(run, new, top_k=3)
    assert len(preds) == 6 and len({p.label for p in preds}) > 1
    for p in preds:  # RGB, gray and RGBA files of other sizes, PNG, JPEG and BMP
        got = pipe(p.image, top_k=3)
        assert [g["label"] for g in got] == list(p.classes), p.image
        np.testing.assert_allclose([g["score"] for g in got], p.probs, atol=1e-5)
    # and vitmoe predicts from the exported directory itself, reading its preprocessor_config.json
    again = vitmoe.predict(out, new, top_k=3)
    assert [q.classes for q in again] == [p.classes for p in preds]
    np.testing.assert_allclose([q.probs for q in again], [p.probs for p in preds], atol=1e-5)


def test_a_gray_model_exports_as_a_reader_of_rgb_luma(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _perturbed(vitmoe.create_model("vit", in_chans=1, head="linear", **SMALL))
    pre = Preprocessing(FOLDER_SIDE, 1, (0.4,), (0.25,), FOLDER_SIDE)
    save_model(model, tmp_path / "gray.safetensors", metadata={"preprocessing": pre.to_dict(), "classes": list(FOLDER_CLASSES)})
    assert main(["export", str(tmp_path / "gray.safetensors"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_channels"] == 3
    # read back as a gray model, the RGB weights sum to the original ones
    x = torch.randn(2, 1, FOLDER_SIDE, FOLDER_SIDE)
    with torch.no_grad():
        back = vitmoe.load_pretrained(tmp_path / "hf", in_chans=1).eval()
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)
    pipe = transformers.pipeline("image-classification", model=str(tmp_path / "hf"), device="cpu")
    files = []
    for i, mode in enumerate(("L", "L", "RGB", "RGB")):
        files.append(tmp_path / f"{i}.png")
        write_image(files[-1], (20 + i, 18), i % 3, i, mode)
    for p in vitmoe.predict(tmp_path / "gray.safetensors", files, top_k=3):
        got = pipe(p.image, top_k=3)
        # gray files: the same function exactly; colour files: up to Pillow's rounding of "L" to integers
        tol = 1e-5 if p.image.endswith(("0.png", "1.png")) else 2e-2
        np.testing.assert_allclose([dict((g["label"], g["score"]) for g in got)[c] for c in p.classes], p.probs, atol=tol)


def test_onnx_graph_gives_the_pytorch_logits(folder_run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, run, new = folder_run
    out = tmp_path / "onnx"
    assert main(["export", str(run), str(out), "--format", "onnx"]) == 0
    assert json.loads((out / "labels.json").read_text())["id2label"] == {str(i): c for i, c in enumerate(FOLDER_CLASSES)}
    clf = vitmoe.load_classifier(run)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    files = _files(new)
    x = clf.preprocessing.load(files)
    with torch.no_grad():
        want = clf.model(x).numpy()
    for rows in (slice(0, 6), slice(2, 3)):  # the batch axis is dynamic
        got = session.run(["logits"], {"pixel_values": x[rows].numpy()})[0]
        np.testing.assert_allclose(got, want[rows], atol=1e-4, rtol=0)
    labels = [p.label for p in clf.predict(files)]
    assert [FOLDER_CLASSES[i] for i in session.run(None, {"pixel_values": x.numpy()})[0].argmax(-1)] == labels


def test_onnx_of_other_models(tmp_path, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 3, FOLDER_SIDE, FOLDER_SIDE)
    pre = Preprocessing(FOLDER_SIDE, 3, (0.5,) * 3, (0.25,) * 3, FOLDER_SIDE).to_dict()

    def onnx_logits(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]

    # dense presets the transformers ViT cannot hold: CCT (conv tokenizer, sequence pooling), ViT-Lite (mean pooling)
    from vitmoe.models.onnx import export_onnx

    for name, kw in (("cct_2_3x2", dict(img_size=FOLDER_SIDE, num_classes=3)), ("vit_lite6", SMALL)):
        model = _perturbed(vitmoe.create_model(name, **kw))
        export_onnx(model, tmp_path / f"{name}.onnx")
        with torch.no_grad():
            np.testing.assert_allclose(onnx_logits(tmp_path / f"{name}.onnx"), model(x).numpy(), atol=1e-4, rtol=0)
    # random routing in eval mode merged exports as it is (no dispatch at eval)
    rv = _perturbed(vitmoe.create_model("random_vit", head="linear", num_experts=3, moe={"expert_init": "independent"},
                                        **SMALL))
    save_model(rv, tmp_path / "rv.safetensors", metadata={"preprocessing": pre})
    assert main(["export", str(tmp_path / "rv.safetensors"), str(tmp_path / "rv"), "--format", "onnx"]) == 0
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits(tmp_path / "rv" / "model.onnx"), rv(x).numpy(), atol=1e-4, rtol=0)
    # a switch model dispatches tokens: refused naming --merge, exported merged with it
    sw = _perturbed(vitmoe.create_model("switch_vit", head="linear", num_experts=4, **SMALL))
    save_model(sw, tmp_path / "sw.safetensors", metadata={"preprocessing": pre})
    capsys.readouterr()
    assert main(["export", str(tmp_path / "sw.safetensors"), str(tmp_path / "sw"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--merge" in err and "moe.router='switch'" in err
    assert not (tmp_path / "sw" / "model.onnx").exists()
    assert main(["export", str(tmp_path / "sw.safetensors"), str(tmp_path / "sw"), "--format", "onnx", "--merge"]) == 0
    with torch.no_grad(), pytest.warns(UserWarning, match="learned router"):
        merged = vitmoe.merge_experts(sw).eval()(x).numpy()
    np.testing.assert_allclose(onnx_logits(tmp_path / "sw" / "model.onnx"), merged, atol=1e-4, rtol=0)
    # an existing export is kept unless --force
    assert main(["export", str(tmp_path / "sw.safetensors"), str(tmp_path / "sw"), "--format", "onnx", "--merge"]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("preset, overrides, setting", [
    ("vit", {}, "--set model.head=linear"),                         # the vit preset's MLP head
    ("vit_lite6", {"head": "linear"}, "--set model.pool=cls"),       # mean pooling
    ("cct_2_3x2", {}, "--model vit --set model.head=linear"),      # the conv tokenizer
])
def test_hf_export_errors_name_the_training_setting(tmp_path, capsys, preset, overrides, setting):
    kw = {k: v for k, v in SMALL.items() if k not in ("depth", "patch_size")} if preset == "cct_2_3x2" else SMALL
    model = vitmoe.create_model(preset, **{**kw, **overrides})
    save_model(model, tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitmoe: error: ") and err.count("\n") == 1 and setting in err, err
    assert not (tmp_path / "out").exists()


def test_onnx_export_without_the_onnx_package_says_what_to_install(folder_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(folder_run[1]), str(tmp_path / "o"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'vitmoe[onnx]'" in err and not (tmp_path / "o").exists()
