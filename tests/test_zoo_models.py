"""PR-MoE, WideNet, the ColossalAI-recipe presets, and their accounting."""
import warnings

import pytest
import torch
from conftest import TINY

import vitmoe
from vitmoe.models import ConfigError, Mlp, load_model, model_config, model_info, save_model
from vitmoe.models.residual import ResidualMoE
from vitmoe.moe import MoEMlp, SoftMoE, collect_moe_outputs

D, H = 12, 20


def n_params(m):
    return sum(p.numel() for p in m.parameters())  # parameters() yields a shared one once


# --- hand-computed preset sizes (REFERENCE.md s.2 shapes) ----------------------------------------
# Lite shape: D = 256, MLP 512, patch 4 on 32x32x3 -> 64 tokens, mean pooling (no class token),
# linear head to 10 classes.
#   patch embed  3*4*4*256 + 256            =    12,544
#   pos table    64*256                     =    16,384   -> embeddings 28,928
#   attention    256*768 + 768 + 256*256 + 256 = 263,168
#   2 LayerNorms 2*(256 + 256)              =     1,024
#   dense MLP    256*512 + 512 + 512*256 + 256 = 262,912
#   dense block  263,168 + 1,024 + 262,912  =   527,104
#   final norm 512, head 256*10 + 10 = 2,570
LITE6 = 28_928 + 6 * 527_104 + 512 + 2_570
EXPECTED = {
    "vit_lite6": 3_194_634,                       # = LITE6
    "vit_lite7": 3_194_634 + 527_104,             # one more dense block = 3,721,738
    # Pyramid 4 + 4 + 8 = 16 experts replace 3 dense MLPs, plus routers Linear(256, E), no bias:
    # 3,194,634 - 3*262,912 + 16*262,912 + 256*16 = 6,616,586
    "vit_moe_lite6": 6_616_586,
    "ec_moe_lite6": 6_616_586,                    # same router size, different policy
    "soft_moe_lite6": 6_616_586,                  # Phi [256, 4*1 slots] has the router's size
    # + per MoE block a dense MLP branch and Linear(256, 2): 3*(262,912 + 512 + 2) = 790,278
    "pr_moe_lite6": 6_616_586 + 790_278,          # = 7,406,864
    # One attention + one MoE (4 experts + router) + 6 blocks x 2 LayerNorms + embeddings + head:
    # 28,928 + 263,168 + 4*262,912 + 256*4 + 6*1,024 + 512 + 2,570 = 1,353,994
    "widenet_tiny": 1_353_994,
}


def test_lite_arithmetic():
    assert LITE6 == EXPECTED["vit_lite6"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts_match_hand_computation(name):
    m = vitmoe.create_model(name)
    assert n_params(m) == EXPECTED[name]
    assert model_info(m.config).total_params == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_settings_of_presets(name):
    c = model_config(name)
    assert (c.embed_dim, c.num_heads, c.mlp_hidden, c.patch_size, c.img_size) == (256, 4, 512, 4, 32)
    assert (c.pool, c.head, c.head_init, c.drop_rate, c.norm_eps) == ("mean", "linear", "zero", 0.1, 1e-6)
    assert (c.moe.capacity_factor_train, c.moe.capacity_factor_eval, c.moe.min_capacity) == (1.25, 2.0, 4)
    m = vitmoe.create_model(name)
    assert m.cls_token is None and (m.head[-1].weight == 0).all()
    assert all(b.norm1.eps == 1e-6 for b in m.blocks)


def test_moe_presets_routing_choices():
    moe = model_config("vit_moe_lite6")
    assert (moe.moe_block_indices(), moe.experts_per_moe_block()) == ([1, 3, 5], [4, 4, 8])
    assert (moe.moe.router, moe.moe.top_k, moe.moe.router_noise, moe.moe.residual) == ("topk", 2, "gaussian", False)
    pr = model_config("pr_moe_lite6")
    assert (pr.moe_block_indices(), pr.experts_per_moe_block()) == ([1, 3, 5], [4, 4, 8])
    assert (pr.moe.router, pr.moe.top_k, pr.moe.router_noise, pr.moe.residual) == ("switch", 1, "jitter", True)
    wn = model_config("widenet_tiny")
    assert (wn.depth, wn.share_blocks, wn.moe_block_indices(), wn.moe.top_k) == (6, True, list(range(6)), 2)
    kinds = [type(b.mlp) for b in vitmoe.create_model("pr_moe_lite6").blocks]
    assert kinds == [Mlp, ResidualMoE, Mlp, ResidualMoE, Mlp, ResidualMoE]
    assert isinstance(vitmoe.create_model("soft_moe_lite6").blocks[1].mlp, SoftMoE)


def test_model_info_matches_counted_parameters_for_every_preset_and_variant():
    for name, kw in [(n, {}) for n in sorted(EXPECTED)] + [
        ("widenet_tiny", dict(depth=3, moe=dict(residual=True))), ("soft_moe_lite6", dict(moe=dict(slots_per_expert=3))),
        ("widenet_tiny", dict(moe=dict(router="soft", top_k=1))), ("vit_lite6", dict(share_blocks=True)),
    ]:
        m = vitmoe.create_model(name, **kw)
        info = model_info(m.config)
        assert info.total_params == n_params(m), (name, kw)
        assert info.active_params_per_token <= info.total_params or m.config.moe.router == "soft"
        assert info.mergeable == (not m.config.moe.residual and m.config.moe.router != "soft")
        if info.mergeable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert info.merged_params == n_params(vitmoe.merge_experts(m)), (name, kw)
        else:  # deployed as it is
            assert info.merged_params == info.total_params


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
    assert n_params(m) == formula == sum(unique.values()) == model_info(c).total_params == EXPECTED["widenet_tiny"]
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


# --- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("override,field", [
    (dict(moe=dict(second_policy="maybe")), "moe.second_policy"),
    (dict(moe=dict(second_policy="sampling", router="switch", top_k=1)), "moe.second_policy"),
    (dict(moe=dict(second_threshold=1.5)), "moe.second_threshold"),
    (dict(moe=dict(router="soft", top_k=2)), "moe.top_k"),
    (dict(moe=dict(router="expert_choice", top_k=1, capacity_factor_eval=None)), "moe.capacity_factor_eval"),
    (dict(moe=dict(slots_per_expert=0)), "moe.slots_per_expert"),
    (dict(moe_layers="none", num_experts=4), "moe.residual"),
    (dict(share_blocks=True), "moe_layers"),
    (dict(moe=dict(router="fancy")), "soft"),
])
def test_new_fields_validated_with_the_field_named(override, field):
    base = "pr_moe_lite6" if field == "moe.residual" else "vit_moe_lite6"
    with pytest.raises(ConfigError, match=field):
        model_config(base, **override)
    assert model_config("widenet_tiny", num_experts=[4] * 6).share_blocks
    with pytest.raises(ConfigError, match="num_experts"):
        model_config("widenet_tiny", num_experts=[4, 4, 4, 4, 4, 8])
