"""Model surgery: positional-table resizing, head replacement, loading across sizes and classes."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

import vitmoe
from vitmoe.models import ModelFileError
from vitmoe.models.surgery import grid_of_rows, load_adapted, replace_head, resize_pos_embed


def test_cls_row_kept_and_shape():
    pos = torch.randn(1, 1 + 16, 8)
    new = resize_pos_embed(pos, 4, 6)
    assert new.shape == (1, 1 + 36, 8)
    assert torch.equal(new[:, :1], pos[:, :1])
    # no class token (mean pooling): every row is a patch
    assert resize_pos_embed(torch.randn(1, 16, 8), 4, 2, num_prefix_tokens=0).shape == (1, 4, 8)


def test_identity_when_grid_unchanged():
    pos = torch.randn(1, 1 + 9, 5)
    assert resize_pos_embed(pos, 3, 3) is pos
    assert resize_pos_embed(pos, (3, 3), (3, 3)) is pos
    # bicubic at scale 1 is the identity too, so the short cut changes nothing
    grid = pos[:, 1:].reshape(1, 3, 3, 5).permute(0, 3, 1, 2)
    assert torch.allclose(F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False), grid)


def test_hand_checked_cases():
    # 1x1 -> 2x2: every output samples the single (edge-clamped) value; cubic weights sum to 1.
    pos = torch.tensor([[[9.0, -1.0], [2.0, 3.0]]])  # CLS row, one patch
    new = resize_pos_embed(pos, 1, 2)
    assert torch.allclose(new[0, 1:], torch.tensor([[2.0, 3.0]]).expand(4, 2))
    # 2x2 -> 1x1 with align_corners=False: the output sits at source coordinate 0.5 on each axis;
    # Keys' cubic (A=-0.75) at t=0.5 weighs [-0.09375, 0.59375, 0.59375, -0.09375] over pixels
    # [-1, 0, 1, 2], clamped to [0, 0, 1, 1]: 0.5 each, so the result is the mean of the four.
    patches = torch.tensor([[1.0], [2.0], [4.0], [8.0]])  # row-major 2x2 grid, D=1
    pos = torch.cat([torch.tensor([[7.0]]), patches]).unsqueeze(0)
    new = resize_pos_embed(pos, 2, 1)
    assert new.shape == (1, 2, 1)
    assert new[0, 0, 0] == 7.0
    assert torch.allclose(new[0, 1, 0], torch.tensor(15.0 / 4))


def test_row_major_grid_layout():
    # A table varying along columns only keeps varying along columns only after resizing.
    col = torch.arange(4.0)
    patches = col.repeat(4).reshape(16, 1)  # row r, col c -> c
    new = resize_pos_embed(torch.cat([torch.zeros(1, 1), patches]).unsqueeze(0), 4, 8)[0, 1:, 0].reshape(8, 8)
    assert torch.allclose(new, new[:1].expand(8, 8))
    assert not torch.allclose(new[:, 0], new[:, -1]) and new[0, 0] < new[0, -1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rows"):
        resize_pos_embed(torch.randn(1, 10, 4), 4, 5)
    with pytest.raises(ValueError, match="new_grid"):
        resize_pos_embed(torch.randn(1, 17, 4), 4, 0)
    assert grid_of_rows(65) == 8
    with pytest.raises(ValueError, match="square"):
        grid_of_rows(64)


def test_resize_keeps_dtype():
    pos = torch.randn(1, 17, 4, dtype=torch.bfloat16)
    assert resize_pos_embed(pos, 4, 2).dtype == torch.bfloat16


def test_replace_head_zero_and_config():
    for head in ("linear", "mlp"):
        m = vitmoe.create_model("vit", img_size=16, patch_size=4, head=head, **TINY)
        hidden = [p.clone() for p in m.head[:-1].parameters()]
        replace_head(m, 3)
        assert m.config.num_classes == 3 and m.head[-1].out_features == 3
        assert not m.head[-1].weight.any() and not m.head[-1].bias.any()
        assert all(torch.equal(a, b) for a, b in zip(hidden, m.head[:-1].parameters()))
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError):
        replace_head(m, 0)


def test_load_adapted_other_size_and_classes():
    src = vitmoe.create_model("vit", img_size=16, patch_size=4, num_classes=10, **TINY)
    dst = vitmoe.create_model("vit", img_size=24, patch_size=4, num_classes=5, **TINY)
    notes = load_adapted(dst, src.state_dict(), source="src.safetensors")
    assert any("4x4 -> 6x6" in n for n in notes) and any("10 -> 5" in n for n in notes)
    assert torch.equal(dst.pos_embed, resize_pos_embed(src.pos_embed, 4, 6))
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.head[0].weight, src.head[0].weight)  # MLP head's hidden layer loads
    assert not dst.head[-1].weight.any()
    # same shape: a plain load, nothing adapted
    same = vitmoe.create_model("vit", img_size=16, patch_size=4, num_classes=10, **TINY)
    assert load_adapted(same, src.state_dict()) == []
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(same.eval()(x), src.eval()(x))


def test_load_adapted_refuses_other_differences():
    src = vitmoe.create_model("vit", img_size=16, patch_size=4, **TINY)
    wider = vitmoe.create_model("vit", img_size=16, patch_size=4, **{**TINY, "mlp_hidden": 48})
    with pytest.raises(ModelFileError, match="src.pt.*blocks.0.mlp.fc1"):
        load_adapted(wider, src.state_dict(), source="src.pt")
    rows = vitmoe.create_model("vit", img_size=24, patch_size=4, pos_embed_rows=300, **TINY)
    with pytest.raises(ModelFileError, match="pos_embed_rows"):
        load_adapted(rows, src.state_dict())
