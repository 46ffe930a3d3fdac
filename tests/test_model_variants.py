"""Model variants: residual MoE (PR-MoE) and WideNet's shared blocks, against their plain equivalents."""
import pytest
import torch
from conftest import TINY

import vitmoe
from vitmoe.models import load_model, model_info, save_model
from vitmoe.models.residual import ResidualMoE
from vitmoe.moe import MoEMlp, collect_moe_outputs

WIDENET_TINY = 1_353_994  # hand-computed in test_presets.py

D, H = 12, 20


def n_params(m):
    return sum(p.numel() for p in m.parameters())  # parameters() yields a shared one once


# --- residual MoE ------------------------------------------------------------------------------
def grads(m, x):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad


def test_residual_moe_with_dense_weight_zero_equals_plain_moe():
    r = ResidualMoE(D, H, num_experts=4, router="switch", expert_init="independent", capacity_factor_train=1.0).double()
    with torch.no_grad():  # softmax([0, -1e4]) = [1, 0] exactly in float64: c1 = 0
        r.coef.weight.zero_()
        r.coef.bias.copy_(torch.tensor([0.0, -1e4]))
        r.mlp.fc2.bias.normal_()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    with collect_moe_outputs(r) as moe:
        y, gx = grads(r, x)
    moe_grads = {n: p.grad.clone() for n, p in r.moe.named_parameters()}
    assert float(moe.stats()["moe"]["dropped_frac"]) > 0  # dropped tokens: zero from both branches here
    plain = MoEMlp(D, H, num_experts=4, router="switch", capacity_factor_train=1.0).double()
    plain.load_state_dict(r.moe.state_dict())
    y_ref, gx_ref = grads(plain, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    for n, p in plain.named_parameters():
        torch.testing.assert_close(moe_grads[n], p.grad, rtol=0, atol=0, msg=n)
    assert (r.mlp.fc1.weight.grad == 0).all()  # the dense branch has weight 0


def test_residual_moe_mixes_per_token():
    r = ResidualMoE(D, H, num_experts=2, router="switch").double()
    with torch.no_grad():
        r.coef.weight.normal_()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    c = torch.softmax(x @ r.coef.weight.t() + r.coef.bias, -1)
    torch.testing.assert_close(r(x), c[..., :1] * r.moe(x) + c[..., 1:] * r.mlp(x))


def test_pr_moe_model_aux_stats_and_merge_refused():
    m = vitmoe.create_model("pr_moe_lite6", **dict(TINY, depth=6))
    with collect_moe_outputs(m) as moe:
        out = m(torch.randn(2, 3, 32, 32), return_aux=True)
    names = [n for n, _ in m.moe_modules()]
    assert names == ["blocks.1.mlp.moe", "blocks.3.mlp.moe", "blocks.5.mlp.moe"]
    assert list(moe.layer_aux()) == names
    expected = sum(0.01 * aux["balance"] + 1e-3 * aux["z"] for aux in moe.layer_aux().values())
    torch.testing.assert_close(out.aux_loss, expected)
    assert list(out.moe_stats) == names
    with pytest.raises(ValueError, match="residual MoE"):
        vitmoe.merge_experts(m)
    with pytest.raises(ValueError, match="Soft MoE"):
        vitmoe.merge_experts(vitmoe.create_model("soft_moe_lite6", **dict(TINY, depth=6)))


# --- WideNet -----------------------------------------------------------------------------------
def test_widenet_shares_modules_and_counts_them_once():
    m = vitmoe.create_model("widenet_tiny")
    b0 = m.blocks[0]
    for b in m.blocks[1:]:
        assert b.attn is b0.attn and b.mlp is b0.mlp and b.mlp.router is b0.mlp.router
        assert b.mlp.experts is b0.mlp.experts
        assert b.norm1 is not b0.norm1 and b.norm2 is not b0.norm2
    c = m.config
    D, L, E = c.embed_dim, c.depth, 4
    embed = 3 * 16 * D + D + 64 * D
    attn = 4 * D * D + 4 * D
    moe = E * (2 * D * c.mlp_hidden + c.mlp_hidden + D) + D * E
    formula = attn + moe + L * 4 * D + embed + 2 * D + (D * 10 + 10)
    unique = {id(p): p.numel() for p in m.parameters()}
    assert n_params(m) == formula == sum(unique.values()) == model_info(c).total_params == WIDENET_TINY
    # Counting every block's use (named_parameters without de-duplication) is what sharing saves.
    every_use = sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    assert every_use == formula + (L - 1) * (attn + moe)
    assert [n for n, _ in m.moe_modules()] == ["blocks.0.mlp"]


def test_widenet_aux_loss_counts_every_block_call():
    m = vitmoe.create_model("widenet_tiny", **dict(TINY, depth=4))
    layer = m.blocks[0].mlp
    seen = []
    layer.router.register_forward_hook(lambda mod, inp, out: seen.append(out.aux))
    out = m(torch.randn(2, 3, 32, 32), return_aux=True)
    assert len(seen) == 4
    expected = sum(0.01 * a["balance"] + 1e-3 * a["z"] for a in seen)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.aux_terms["balance"], torch.stack([a["balance"] for a in seen]).mean().detach())
    assert float(out.moe_stats["blocks.0.mlp"]["load"].sum()) == 4 * 2 * 64 * 2  # depth x tokens x top-2
    again = m(torch.randn(2, 3, 32, 32), return_aux=True)  # a new forward starts over
    assert len(seen) == 8
    torch.testing.assert_close(again.aux_loss, sum(0.01 * a["balance"] + 1e-3 * a["z"] for a in seen[4:]))


def test_widenet_checkpoint_round_trip_and_merge_into_plain_vit(tmp_path):
    m = vitmoe.create_model("widenet_tiny", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    save_model(m, tmp_path / "w.safetensors")
    m2 = load_model(tmp_path / "w.safetensors").eval()
    assert m2.blocks[1].attn is m2.blocks[0].attn
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
        # Shared-init experts are identical copies, top-2 gates sum to 1 and eval capacity
        # (2.0) drops nothing here: the merged, unshared dense ViT computes the same function.
        with pytest.warns(UserWarning, match="learned router"):
            dense = vitmoe.merge_experts(m).eval()
        assert not dense.config.share_blocks and dense.blocks[1].attn is not dense.blocks[0].attn
        assert n_params(dense) == n_params(vitmoe.create_model("vit_lite6", **TINY))
        torch.testing.assert_close(dense(x), m(x), rtol=1e-5, atol=1e-6)
