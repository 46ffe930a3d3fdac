"""Model surgery: move weights to a model of another image size or class count.

- `resize_pos_embed`: bicubic interpolation of a positional table over its patch grid, with the
  class-token row(s) kept as they are; numerically what `transformers`' ViT does with
  `interpolate_pos_encoding=True`.
- `replace_head`: a new zero-initialised last head layer for another number of classes.
- `load_adapted`: load a state dict into a model, resizing the positional table and replacing
  the head where the model's differ (fine-tuning at another resolution, on another dataset).
- `rgb_input`: a 1-channel model as a 3-channel one that takes the luma of its input (for
  runtimes that always feed RGB, such as transformers' image pipeline).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import ModelFileError, check_tensors
from .vit import VisionTransformer


def _grid(g: int | Sequence[int], name: str) -> tuple[int, int]:
    h, w = (g, g) if isinstance(g, int) else tuple(g)
    if not (isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1):
        raise ValueError(f"{name} must be a positive int or (rows, cols), got {g!r}")
    return int(h), int(w)


def resize_pos_embed(pos_1LD: Tensor, old_grid: int | Sequence[int], new_grid: int | Sequence[int],
                     num_prefix_tokens: int = 1) -> Tensor:
    """The positional table `pos_1LD` [1, prefix + old_h*old_w, D] for a `new_grid` of patches.

    The first `num_prefix_tokens` rows (the class token's; 0 for a mean-pooled model) are kept
    unchanged; the patch rows, read row-major as an old_h x old_w grid, are resized with
    `F.interpolate(mode="bicubic", align_corners=False, size=new_grid)` - exactly the computation
    of transformers' `ViTEmbeddings.interpolate_pos_encoding` (>= 4.43, which passes `size=`
    rather than the older `scale_factor=` with a +0.1 offset). An unchanged grid returns the
    table itself (bicubic at scale 1 is the identity anyway). Computed in float32 or wider and
    returned in the table's dtype.
    """
    (oh, ow), (nh, nw) = _grid(old_grid, "old_grid"), _grid(new_grid, "new_grid")
    if pos_1LD.dim() != 3 or pos_1LD.shape[0] != 1:
        raise ValueError(f"pos_1LD must be [1, L, D], got {tuple(pos_1LD.shape)}")
    if pos_1LD.shape[1] != num_prefix_tokens + oh * ow:
        raise ValueError(f"positional table has {pos_1LD.shape[1]} rows; an old grid of {oh}x{ow} with "
                         f"{num_prefix_tokens} prefix token(s) needs {num_prefix_tokens + oh * ow}")
    if (oh, ow) == (nh, nw):
        return pos_1LD
    D = pos_1LD.shape[-1]
    prefix, patches = pos_1LD[:, :num_prefix_tokens], pos_1LD[:, num_prefix_tokens:]
    work = patches.float() if patches.dtype in (torch.float16, torch.bfloat16) else patches
    grid_1DHW = work.reshape(1, oh, ow, D).permute(0, 3, 1, 2)
    new_1DHW = F.interpolate(grid_1DHW, size=(nh, nw), mode="bicubic", align_corners=False)
    new_patches = new_1DHW.permute(0, 2, 3, 1).reshape(1, nh * nw, D).to(pos_1LD.dtype)
    return torch.cat([prefix, new_patches], dim=1)


def grid_of_rows(rows: int, num_prefix_tokens: int = 1) -> int:
    """The side of the square patch grid a table of `rows` rows holds (ValueError if none)."""
    n = rows - num_prefix_tokens
    side = math.isqrt(max(n, 0))
    if n < 1 or side * side != n:
        raise ValueError(f"a positional table of {rows} rows ({num_prefix_tokens} prefix) is not a square patch grid")
    return side


@torch.no_grad()
def replace_head(model: VisionTransformer, num_classes: int) -> VisionTransformer:
    """Give `model` a new last head layer of `num_classes` outputs, zero-initialised (weights and
    bias), so a fine-tune starts from uniform predictions. The rest of an MLP head is kept. The
    model's config records the new class count. Returns the model (changed in place)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    last = model.head[-1]
    ref = last.weight
    new = nn.Linear(last.in_features, num_classes, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    model.head[-1] = new
    model.config = model.config.replace(num_classes=num_classes)
    return model


def head_keys(model: VisionTransformer) -> tuple[str, str]:
    """State-dict keys of the model's last head layer (weight, bias)."""
    i = len(model.head) - 1
    return f"head.{i}.weight", f"head.{i}.bias"


@torch.no_grad()
def load_adapted(model: VisionTransformer, state: Mapping[str, Tensor], source: str = "state dict") -> list[str]:
    """Load `state` (a VisionTransformer state dict, e.g. from another image size or dataset) into
    `model` strictly, adapting three things and nothing else:

    - `pos_embed` of another patch grid is resized with `resize_pos_embed` (class-token row kept);
      both tables must be square grids plus the class-token row (or none, for mean pooling), i.e.
      `pos_embed_rows` unset.
    - the last head layer of another class count is not loaded: the model's gets zeros (see
      `replace_head`); an MLP head's hidden layer still loads.
    - an RGB first layer (patch embedding or first tokenizer convolution) into a 1-channel model
      is summed over its channels: the RGB model of a gray image fed as R = G = B (exactly the
      gray model `rgb_input` was made from, whose weights sum back to it).

    Any other missing, unexpected or differently shaped tensor is a ModelFileError naming it
    (`source` names the file in the message). Returns one line per adaptation made, e.g.
    "pos_embed: 8x8 -> 12x12 patch grid (bicubic)".
    """
    own = model.state_dict()
    state = dict(state)
    notes: list[str] = []
    prefix = 1 if model.cls_token is not None else 0
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and tuple(pos.shape) != tuple(own["pos_embed"].shape) and pos.dim() == 3 \
            and pos.shape[-1] == own["pos_embed"].shape[-1]:
        if model.config.pos_embed_rows is not None:
            raise ModelFileError(f"{source}: pos_embed has {pos.shape[1]} rows, the model {own['pos_embed'].shape[1]}; "
                                 "resizing needs model field pos_embed_rows unset (one row per token)")
        try:
            old = grid_of_rows(pos.shape[1], prefix)
        except ValueError as e:
            raise ModelFileError(f"{source}: pos_embed cannot be resized: {e}") from None
        new = model.config.token_grid
        state["pos_embed"] = resize_pos_embed(pos, old, new, prefix)
        notes.append(f"pos_embed: {old}x{old} -> {new}x{new} patch grid (bicubic)")
    first = "patch_embed.proj.weight" if model.patch_embed is not None else "tokenizer.layers.0.weight"
    w = state.get(first)
    if w is not None and first in own and w.dim() == 4 and w.shape[1] == 3 and own[first].shape[1] == 1:
        state[first] = w.sum(dim=1, keepdim=True)
        notes.append("in_chans: 3 -> 1 (the first layer's RGB weights summed: the model of gray images fed as RGB)")
    wk, bk = head_keys(model)
    if wk in state and bk in state and state[wk].dim() == 2 and state[wk].shape[1] == own[wk].shape[1] \
            and state[wk].shape[0] != own[wk].shape[0]:
        old_classes = state[wk].shape[0]
        del state[wk], state[bk]
        replace_head(model, model.config.num_classes)
        state[wk], state[bk] = model.state_dict()[wk], model.state_dict()[bk]
        notes.append(f"head: {old_classes} -> {model.config.num_classes} classes (new zero-initialised layer)")
    check_tensors(source, model, state)
    model.load_state_dict(state, strict=True)
    return notes


# Pillow's "L" conversion, L = (19595 R + 38470 G + 7471 B + 2**15) >> 16: the weights sum to exactly 1.
PILLOW_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)


def rgb_input(model: VisionTransformer) -> VisionTransformer:
    """A 3-channel copy of a 1-channel model whose first layer (patch embedding or first tokenizer
    convolution, both linear in the image) reads Pillow's luma of its RGB input. With the same mean
    and std on every channel the normalised luma is the luma of the normalised channels (the
    weights sum to 1; zero padding stays zero), so the copy computes the model's function of the
    gray image: exactly on gray RGB images, and on colour files up to the rounding of Pillow's
    "L" conversion to integers."""
    cfg = model.config
    if cfg.in_chans != 1:
        raise ValueError(f"rgb_input takes a 1-channel model, got in_chans={cfg.in_chans}")
    key = "patch_embed.proj.weight" if model.patch_embed is not None else "tokenizer.layers.0.weight"
    out = VisionTransformer(cfg.replace(in_chans=3)).to(next(model.parameters()).device)
    state = dict(model.state_dict())
    w = state[key]  # [out, 1, k, k]
    state[key] = torch.cat([c * w for c in PILLOW_LUMA], dim=1)  # [out, 3, k, k]
    out.load_state_dict(state)
    return out.train(model.training)
