"""Import and export of the `transformers` ViT layout, checked against transformers itself."""
import inspect
import json
import warnings

import pytest
import torch
from conftest import TINY

import vitmoe
from vitmoe.cli.main import main
from vitmoe.models import ModelFileError, export_hf, load_pretrained, save_model
from vitmoe.models.hf import BIN_FILE, SAFETENSORS_FILE
from vitmoe.models.surgery import resize_pos_embed

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) checks the HF layout")

transformers.utils.logging.disable_progress_bar()

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, num_labels=10)


def hf_model(cls=None, **kw):
    torch.manual_seed(0)
    model = (cls or transformers.ViTForImageClassification)(transformers.ViTConfig(**{**SMALL, **kw}))
    with torch.no_grad():  # make every tensor matter: no zero biases or unit LayerNorms
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path, bin_file=False):
    model.save_pretrained(path)
    if bin_file:  # transformers 5 dropped safe_serialization=False: write the .bin it used to write
        from safetensors.torch import load_file

        tensors = load_file(str(path / SAFETENSORS_FILE))
        (path / SAFETENSORS_FILE).unlink()
        torch.save(tensors, path / BIN_FILE)
    return path


def hf_logits(model, x, **kw):
    with torch.no_grad():
        return model(pixel_values=x, **kw).logits


@pytest.mark.parametrize("bin_file", [False, True])
def test_import_gives_the_same_logits(tmp_path, bin_file):
    hf = hf_model()
    path = save_hf(hf, tmp_path / "vit", bin_file)
    assert (path / BIN_FILE).is_file() == bin_file
    ours = vitmoe.load_pretrained(path).eval()
    cfg = ours.config
    assert (cfg.pool, cfg.head, cfg.pos_embed_rows, cfg.num_classes, cfg.norm_eps) == ("cls", "linear", None, 10, 1e-12)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = ours(x)
    assert logits.abs().max() > 1e-3
    torch.testing.assert_close(logits, hf_logits(hf, x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_import_without_qkv_bias_and_vit_model(tmp_path):
    hf = hf_model(qkv_bias=False)
    ours = load_pretrained(save_hf(hf, tmp_path / "a")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(hf, x), atol=1e-5, rtol=0)
    # ViTModel (pooler included, no classifier): same features, a zero head of the asked classes
    base = hf_model(transformers.ViTModel)
    ours = load_pretrained(save_hf(base, tmp_path / "b"), num_classes=7).eval()
    assert ours.config.num_classes == 7 and not ours.head[0].weight.any()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), base(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0)
    assert load_pretrained(tmp_path / "b").config.num_classes == 10  # its config's labels


def test_import_at_another_image_size_matches_interpolate_pos_encoding(tmp_path):
    emb = transformers.models.vit.modeling_vit.ViTEmbeddings
    if "scale_factor" in inspect.getsource(emb.interpolate_pos_encoding):
        pytest.skip("this transformers interpolates with scale_factor (+0.1), before 4.43's size=")
    hf = hf_model()
    path = save_hf(hf, tmp_path / "vit")
    for size in (48, 24):
        ours = load_pretrained(path, img_size=size).eval()
        assert ours.pos_embed.shape[1] == 1 + (size // 8) ** 2
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf_logits(hf, x, interpolate_pos_encoding=True), atol=1e-5, rtol=0)
    # another class count: zero head, everything else kept
    ours = load_pretrained(path, num_classes=3)
    assert ours.config.num_classes == 3 and not ours.head[0].weight.any()


@pytest.mark.parametrize("extra", [{}, dict(qkv_bias=False, norm_eps=1e-6), dict(in_chans=1, patch_size=8),
                                   dict(share_blocks=True, pos_embed_rows=17)])
def test_export_round_trip_through_transformers(tmp_path, extra):
    kw = {**dict(img_size=16, patch_size=4, head="linear", num_classes=5), **TINY, **extra}
    model = vitmoe.create_model("vit", **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = export_hf(model, tmp_path / "hf", class_names=list("abcde"))
    hf, info = transformers.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert hf.config.id2label[2] == "c" and hf.config.label2id["e"] == 4
    x = torch.randn(2, model.config.in_chans, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf.eval(), x), model(x), atol=1e-5, rtol=0)
    # and back into vitmoe
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out).eval()(x), model(x), atol=1e-6, rtol=0)


def test_export_of_merged_random_model_via_cli(tmp_path, capsys):
    moe = vitmoe.create_model("random_vit", img_size=16, patch_size=4, head="linear", **TINY).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(moe, tmp_path / "moe.safetensors", metadata={"dataset": "cifar10"})
    capsys.readouterr()
    assert main(["export", str(tmp_path / "moe.safetensors"), str(tmp_path / "x")]) == 2
    assert "moe_layers" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "moe.safetensors"), str(tmp_path / "out"), "--merge"]) == 0
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.id2label[0] == vitmoe.data.DATASETS["cifar10"].classes[0]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the merged model computes what the MoE model computes in merged eval mode
        torch.testing.assert_close(hf_logits(hf, x), moe(x), atol=1e-5, rtol=0)
    # a second export into the same folder needs --force
    capsys.readouterr()
    assert main(["export", str(tmp_path / "moe.safetensors"), str(tmp_path / "out"), "--merge"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "moe.safetensors"), str(tmp_path / "out"), "--merge", "--force"]) == 0


@pytest.mark.parametrize("field, overrides", [
    ("pool", dict(pool="mean")), ("head", dict(head="mlp")), ("pos_embed_rows", dict(pos_embed_rows=300)),
])
def test_export_refuses_what_the_layout_cannot_hold(tmp_path, capsys, field, overrides):
    model = vitmoe.create_model("vit", img_size=16, patch_size=4, **{"head": "linear", **TINY, **overrides})
    with pytest.raises(ModelFileError, match=f"model field {field}="):
        export_hf(model, tmp_path / "api")
    save_model(model, tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model field {field}=" in err and "only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu_new"), ("model_type", "deit"), ("image_size", [32, 16]), ("image_size", 30),
    ("num_attention_heads", 3),
])
def test_import_refuses_what_vitmoe_cannot_compute(tmp_path, capsys, field, value):
    path = save_hf(hf_model(), tmp_path / "vit")
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=field):
        load_pretrained(path)
    capsys.readouterr()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "config.json" in err


def test_import_file_errors(tmp_path, capsys):
    path = save_hf(hf_model(), tmp_path / "vit")
    (path / SAFETENSORS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_pretrained(path)
    (path / SAFETENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_pretrained(path)
    torch.save({"vit.encoder.layer.0.strange.weight": torch.zeros(1)}, path / BIN_FILE)
    with pytest.raises(ModelFileError, match="strange"):
        load_pretrained(path)
    torch.save({"x": torch.nn.Linear(1, 1)}, path / BIN_FILE)  # a pickled module: refused by weights_only
    with pytest.raises(ModelFileError, match="plain tensors"):
        load_pretrained(path)


def test_info_on_a_transformers_directory(tmp_path, capsys):
    hf = hf_model()
    path = save_hf(hf, tmp_path / "vit")
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == sum(p.numel() for p in hf.parameters())
    assert main(["info", str(tmp_path)]) == 2
    assert "without a transformers config.json" in capsys.readouterr().err


def test_load_pretrained_of_a_vitmoe_file(tmp_path):
    model = vitmoe.create_model("vit", img_size=16, patch_size=4, **TINY)
    save_model(model, tmp_path / "m.safetensors")
    bigger = load_pretrained(tmp_path / "m.safetensors", img_size=24, num_classes=4)
    assert bigger.config.img_size == 24 and bigger.config.num_classes == 4
    assert torch.equal(bigger.pos_embed, resize_pos_embed(model.pos_embed, 4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = load_pretrained(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(same.eval()(x), model.eval()(x))


def test_import_of_a_sharded_directory(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_model()
    path = save_hf(hf, tmp_path / "vit")
    tensors = load_file(str(path / SAFETENSORS_FILE))
    (path / SAFETENSORS_FILE).unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(path).eval()(x), hf_logits(hf, x), atol=1e-5, rtol=0)
