"""Presets of the ColossalAI recipe (ViT-Lite, ViT-MoE, PR-MoE, WideNet, expert choice, Soft MoE):
hand-computed sizes, recipe settings, accounting, and validation of their fields."""
import warnings

import pytest
import vitmoe
from vitmoe.models import ConfigError, Mlp, model_config, model_info
from vitmoe.models.residual import ResidualMoE
from vitmoe.moe import SoftMoE

D, H = 12, 20


def n_params(m):
    return sum(p.numel() for p in m.parameters())  # parameters() yields a shared one once


# --- hand-computed preset sizes (the ColossalAI ViT-MoE example's shapes) -------------------------
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
        if not m.config.is_moe or m.config.moe.router == "soft":  # every parameter is active
            assert info.active_params_per_token == info.total_params, (name, kw)
        else:
            assert info.active_params_per_token < info.total_params, (name, kw)
        assert info.mergeable == (not m.config.moe.residual and m.config.moe.router != "soft")
        if info.mergeable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert info.merged_params == n_params(vitmoe.merge_experts(m)), (name, kw)
        else:  # deployed as it is
            assert info.merged_params == info.total_params


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
