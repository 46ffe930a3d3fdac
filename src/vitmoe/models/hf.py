"""The `transformers` ViT layout: import (`load_pretrained`) and export (`export_hf`) of dense ViTs.

A `transformers` ViT directory holds `config.json` (model_type "vit") and `model.safetensors`
(or `pytorch_model.bin`, or a sharded `model.safetensors.index.json`) of `ViTModel` or
`ViTForImageClassification`. No `transformers` import is needed: the layout is mapped here.

    HF key (with or without "vit.")                    vitmoe key
    embeddings.cls_token                               cls_token
    embeddings.position_embeddings                     pos_embed
    embeddings.patch_embeddings.projection.*           patch_embed.proj.*
    encoder.layer.i.attention.attention.{query,key,value}.*  blocks.i.attn.qkv.* (concatenated q, k, v)
    encoder.layer.i.attention.output.dense.*           blocks.i.attn.proj.*
    encoder.layer.i.intermediate.dense.*               blocks.i.mlp.fc1.*
    encoder.layer.i.output.dense.*                     blocks.i.mlp.fc2.*
    encoder.layer.i.layernorm_{before,after}.*         blocks.i.norm{1,2}.*
    layernorm.*                                        norm.*
    classifier.*                                       head.0.*
    pooler.*, embeddings.mask_token                    (ignored)

The vitmoe model is `pool="cls"`, `head="linear"`, one positional row per token; the two
models compute the same function (HF's GELU "gelu" is torch's exact erf GELU).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fileio import PathError, atomic_write, atomic_write_text
from ..readers import MAX_CONFIG_BYTES, first_line, load_json, open_regular, safetensors_header
from .budget import check_buildable, file_mismatch
from .config import ViTConfig
from .io import ModelFileError, load_model, read_metadata
from .surgery import load_adapted, rgb_input
from .vit import VisionTransformer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
PREPROCESSOR_FILE = "preprocessor_config.json"
"""transformers' image-processor config (ViTImageProcessor), read by `pipeline("image-classification")`."""
DEFAULT_CLASSES = 1000
"""Class count of an imported ViTModel (no classifier) whose config names no labels."""

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK_KEYS = {
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.0.weight", "classifier.bias": "head.0.bias",
}
# vitmoe field: (transformers ViTConfig field, its default there)
_CONFIG_FIELDS = {
    "embed_dim": ("hidden_size", 768), "depth": ("num_hidden_layers", 12), "num_heads": ("num_attention_heads", 12),
    "mlp_hidden": ("intermediate_size", 3072), "in_chans": ("num_channels", 3), "qkv_bias": ("qkv_bias", True),
    "norm_eps": ("layer_norm_eps", 1e-12), "drop_rate": ("hidden_dropout_prob", 0.0),
    "attn_drop_rate": ("attention_probs_dropout_prob", 0.0),
}
_IGNORED = re.compile(r"^(pooler\..*|embeddings\.mask_token)$")


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory with a `config.json` (a `transformers` model directory)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    try:
        data = load_json(file, "transformers config", MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no transformers config.json in the directory", str(file)) from None
    except PathError as e:  # not JSON, not text, too large, not a regular file: one line naming it
        raise ModelFileError(str(e)) from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> ViTConfig:
    """The ViTConfig of a `transformers` ViTConfig mapping (num_classes from its labels or
    DEFAULT_CLASSES). Anything vitmoe cannot compute is a ModelFileError naming the field."""
    def bad(name: str, why: str) -> ModelFileError:
        return ModelFileError(f"{source}: field {name}={hf.get(name)!r} {why}")

    if hf.get("model_type", "vit") != "vit":
        raise bad("model_type", "is not a plain ViT (\"vit\"); vitmoe imports only the transformers ViT layout")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise bad("hidden_act", "is not supported: vitmoe's MLP uses the exact (erf) GELU, transformers' \"gelu\"")
    image = hf.get("image_size", 224)
    if isinstance(image, (list, tuple)):
        if len(image) != 2 or image[0] != image[1]:
            raise bad("image_size", "is not square: vitmoe models take square images")
        image = image[0]
    patch = hf.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise bad("patch_size", "is not square: vitmoe models take square patches")
        patch = patch[0]
    labels = hf.get("id2label")
    classes = len(labels) if isinstance(labels, dict) and labels else hf.get("num_labels", DEFAULT_CLASSES)
    fields = {ours: hf.get(theirs, default) for ours, (theirs, default) in _CONFIG_FIELDS.items()}
    fields.update(patch_size=patch, img_size=image, num_classes=classes,
                  pool="cls", head="linear", pos_embed_rows=None, moe_layers="none")
    try:
        return ViTConfig(**fields).validate()
    except ValueError as e:  # ConfigError: e.g. a head count that does not divide the width
        msg = str(e)
        renames = {**{ours: theirs for ours, (theirs, _) in _CONFIG_FIELDS.items()}, "img_size": "image_size",
                   "patch_size": "patch_size", "num_classes": "num_labels"}
        for ours, theirs in renames.items():  # whole names only: norm_eps is not inside layer_norm_eps
            msg = re.sub(rf"(?<![A-Za-z_.])(model field )?{ours}=", f"field {theirs}=", msg)
        msg = re.sub(r" \(flag [^)]*\)", "", msg)  # vitmoe train's flags do not apply here
        raise ModelFileError(f"{source}: cannot be expressed as a vitmoe model: {msg}") from None


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `transformers` directory: model.safetensors, its sharded index, or
    pytorch_model.bin (read with `torch.load(weights_only=True)`: plain tensors only)."""
    path = Path(path)
    if (path / SAFETENSORS_FILE).is_file():
        files = [path / SAFETENSORS_FILE]
    elif (path / INDEX_FILE).is_file():
        try:
            shards = sorted(set(load_json(path / INDEX_FILE, "safetensors index")["weight_map"].values()))
            if not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
                raise ValueError("shard names must be file names in the directory")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{path / INDEX_FILE} is not a safetensors index with a weight_map "
                                 f"({' '.join(str(e).split())[:200]})") from None
        files = [path / s for s in shards]
    elif (path / BIN_FILE).is_file():
        try:
            with open_regular(path / BIN_FILE, "weights file") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        except PathError as e:
            raise ModelFileError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - pickle errors of many kinds: a corrupt or unsafe file
            # torch's refusal is six lines advising weights_only=False: vitmoe never does that.
            raise ModelFileError(f"{path / BIN_FILE} cannot be read as plain tensors ({first_line(e)}); vitmoe "
                                 "never runs code from a file, so it is refused") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{path / BIN_FILE} does not hold a state dict of tensors")
        return dict(state)
    else:
        raise FileNotFoundError(2, f"no {SAFETENSORS_FILE}, {INDEX_FILE} or {BIN_FILE} in the directory", str(path))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            safetensors_header(file, "weights file")  # a regular file with a bounded, valid header
            tensors.update(load_file(str(file), device="cpu"))
        except FileNotFoundError:
            raise ModelFileError(f"{file} is missing (named by {path / INDEX_FILE})") from None
        except (SafetensorError, OSError, PathError) as e:
            raise ModelFileError(f"{file} is not a readable safetensors file: {first_line(e)}") from None
    return tensors


def state_from_hf(tensors: Mapping[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """HF ViT tensors -> a vitmoe state dict (head only if the file has a classifier)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        k = key[4:] if key.startswith("vit.") else key
        if _IGNORED.match(k):
            continue
        if k in _TOP_KEYS:
            out[_TOP_KEYS[k]] = value
            continue
        m = _LAYER.match(k)
        rest = m.group(2) if m else ""
        part = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if part:
            qkv.setdefault((int(m.group(1)), part.group(2)), {})[part.group(1)] = value
            continue
        name, _, kind = rest.rpartition(".")
        if m and name in _BLOCK_KEYS and kind in ("weight", "bias"):
            out[f"blocks.{m.group(1)}.{_BLOCK_KEYS[name]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelFileError(f"{source}: tensors outside the transformers ViT layout: "
                             f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise ModelFileError(f"{source}: block {i} attention {kind} lacks "
                                 f"{sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def load_pretrained(path: str | os.PathLike, img_size: int | None = None, num_classes: int | None = None,
                    **overrides: Any) -> VisionTransformer:
    """A vitmoe model with pretrained dense weights, for another image size and class count if asked.

    `path`: a `transformers` ViT directory (see the module docstring) or a vitmoe model file.
    `img_size`: images the model will take (default the source's); another size resizes the
    positional table bicubically, as transformers' `interpolate_pos_encoding=True` does.
    `num_classes`: another class count gets a zero-initialised head; a ViTModel without a
    classifier gets one of `num_classes` (default: its config's labels, else DEFAULT_CLASSES).
    `overrides`: other ViTConfig fields (dropout rates, ...). Errors are ModelFileError or
    ConfigError naming the file and field.
    """
    path = Path(path)
    if path.is_dir() and not is_hf_dir(path):
        raise FileNotFoundError(2, "no transformers config.json in the directory (a vitmoe run? pass its "
                                   "model .safetensors file)", str(path / CONFIG_FILE))
    if is_hf_dir(path):
        source = config_from_hf(read_hf_config(path), str(path / CONFIG_FILE))
        check_buildable(source, str(path / CONFIG_FILE))
        state = state_from_hf(read_hf_weights(path), str(path))
        # Before building: the config must describe the weights (hidden_size 100000 beside a small file).
        mismatch = file_mismatch(source, sum(t.numel() for t in state.values()), str(path / CONFIG_FILE),
                                 optional_head=True)
        if mismatch:
            raise ModelFileError(mismatch)
    else:
        source = ViTConfig.from_dict(read_metadata(path)["config"])
        state = load_model(path).state_dict()
    changes = dict(overrides)
    if img_size is not None:
        changes["img_size"] = img_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    model = VisionTransformer(source.replace(**changes))
    if "head.0.weight" not in state and is_hf_dir(path):  # ViTModel: no classifier
        state["head.0.weight"] = torch.zeros_like(model.head[0].weight)
        state["head.0.bias"] = torch.zeros_like(model.head[0].bias)
    load_adapted(model, state, source=str(path))
    return model


# --- export ---------------------------------------------------------------------------------------------
def hf_export_problem(cfg: ViTConfig) -> str | None:
    """Why the transformers ViT layout cannot hold this model, or None if it can; each reason
    names the model setting (a `vitmoe train --set` / `--model` choice) that avoids it."""
    if cfg.tokenizer != "patch":
        return (f"model field tokenizer={cfg.tokenizer!r} has no transformers ViT equivalent (the CCT presets' "
                "convolutional tokenizer; the transformers ViT embeds non-overlapping patches); train a ViT preset "
                "to export, e.g. --model vit --set model.head=linear")
    if cfg.pos_embed != "learned":
        return (f"model field pos_embed={cfg.pos_embed!r} has no transformers ViT equivalent (it always adds a "
                "learned positional table); train with --set model.pos_embed=learned to export")
    if cfg.is_moe:
        return (f"model field moe_layers={cfg.moe_layers!r}: the transformers ViT has dense MLPs; merge the experts "
                "first (--merge, vitmoe merge, or vitmoe.merge_experts) and export the merged model")
    if cfg.pool != "cls":
        return (f"model field pool={cfg.pool!r}: the transformers ViT classifies the class token; only pool='cls' "
                "exports (train with --set model.pool=cls, as the vit preset does)")
    if cfg.head != "linear":
        return (f"model field head={cfg.head!r}: the transformers ViT has one linear classifier; only head='linear' "
                "exports (train with --set model.head=linear)")
    if cfg.pos_embed_rows is not None and cfg.pos_embed_rows != cfg.num_tokens:
        return (f"model field pos_embed_rows={cfg.pos_embed_rows}: the transformers ViT has one positional row per "
                f"token ({cfg.num_tokens}); only pos_embed_rows=None exports (train without "
                "--set model.pos_embed_rows)")
    return None


def hf_config(cfg: ViTConfig, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The `config.json` of a ViTForImageClassification equal to a vitmoe model of config `cfg`."""
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise ValueError(f"{len(names)} class names for a model of {cfg.num_classes} classes")
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden, "hidden_act": "gelu", "hidden_dropout_prob": cfg.drop_rate,
        "attention_probs_dropout_prob": cfg.attn_drop_rate, "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size,
        "id2label": {str(i): str(n) for i, n in enumerate(names)},
        "label2id": {str(n): i for i, n in enumerate(names)},
        "torch_dtype": "float32",
    }


def state_to_hf(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under ViTForImageClassification's names (float32, contiguous, unshared)."""
    state = model.state_dict()
    D = model.config.embed_dim
    out = {f"vit.{hf}": state[ours] for hf, ours in _TOP_KEYS.items() if not hf.startswith("classifier")}
    out["classifier.weight"], out["classifier.bias"] = state["head.0.weight"], state["head.0.bias"]
    for i in range(model.config.depth):
        base = f"vit.encoder.layer.{i}."
        for hf, ours in _BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"{base}{hf}.{kind}"] = state[f"blocks.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{kind}" in state:
                q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].split(D, dim=0)
                out.update({f"{base}attention.attention.query.{kind}": q, f"{base}attention.attention.key.{kind}": k,
                            f"{base}attention.attention.value.{kind}": v})
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def hf_preprocessor_config(preprocessing: Any) -> dict[str, Any]:
    """preprocessor_config.json for transformers' image processors, from a vitmoe.data.Preprocessing:
    its resize (Pillow bilinear), rescale by 1/255 and per-channel normalisation (RGB: a 1-channel
    mean/std is repeated for the channels `rgb_input` reads).

    Without a crop: ViTImageProcessor, the whole image to the model's side in one resize. With one:
    BitImageProcessor, which resizes (`size: {shortest_edge}` for the `crop` policy, `{height,
    width}` for `stretch`) and takes the centred `crop_size` window as vitmoe does (top = (H - c) // 2)."""
    pre = preprocessing
    mean, std = [float(m) for m in pre.mean], [float(s) for s in pre.std]
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    common = {"resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": mean, "image_std": std, "do_convert_rgb": True}
    if pre.crop is None and pre.resize == "stretch":
        side = pre.input_size
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
                **common}
    crop = pre.crop or pre.size
    side = pre.size
    if crop != pre.input_size:  # a resize after the crop (step 3) cannot be written: scale both to the model's side
        side, crop = int(round(pre.size * pre.input_size / crop)), pre.input_size
    size = {"shortest_edge": side} if pre.resize == "crop" else {"height": side, "width": side}
    return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": size, "do_center_crop": True,
            "crop_size": {"height": crop, "width": crop}, **common}


def export_hf(model: VisionTransformer, out: str | os.PathLike, class_names: Sequence[str] | None = None,
              preprocessing: Any = None) -> Path:
    """Write `OUT/config.json` and `OUT/model.safetensors` that
    `transformers.ViTForImageClassification.from_pretrained(OUT)` loads with no missing or
    unexpected keys and the same logits. Only dense CLS-pooled models with a linear head and one
    positional row per token fit (`hf_export_problem` says why not, naming the field).

    `preprocessing` (a vitmoe.data.Preprocessing: how the model's inputs were made) adds
    `OUT/preprocessor_config.json`, so `transformers.pipeline("image-classification", model=OUT)`
    feeds image files as vitmoe does (its resize and centre crop, then its normalisation;
    `hf_preprocessor_config`). That pipeline always gives RGB images: a 1-channel model is then written as
    the 3-channel `rgb_input(model)`."""
    problem = hf_export_problem(model.config)
    if problem:
        raise ModelFileError(f"cannot export to the transformers ViT layout: {problem}")
    processor = None
    if preprocessing is not None:
        if model.config.in_chans == 1:
            model = rgb_input(model)
        processor = hf_preprocessor_config(preprocessing)
    out = Path(out)
    config = hf_config(model.config, class_names)
    tensors = state_to_hf(model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SAFETENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if processor is not None:
        atomic_write_text(out / PREPROCESSOR_FILE, json.dumps(processor, indent=2) + "\n")
    text = json.dumps(config, indent=2) + "\n"
    atomic_write_text(out / CONFIG_FILE, text)
    return out
