"""MoEConfig: one object per MoE layer's settings, its spellings, and the model fields around it."""
import dataclasses
import json
import warnings

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

import vitmoe
from vitmoe.models import ConfigError, ViTConfig, load_model, model_config
from vitmoe.moe import MoEConfig, MoEMlp
from vitmoe.moe.experts import ExpertOptions
from vitmoe.moe.routers import RandomOptions, ScoringOptions, TopKOptions


def test_option_groups_make_up_the_config_and_live_beside_their_code():
    groups = {ExpertOptions: "vitmoe.moe.experts", TopKOptions: "vitmoe.moe.routers.topk",
              RandomOptions: "vitmoe.moe.routers.random", ScoringOptions: "vitmoe.moe.routers.scoring"}
    names = set(MoEConfig.field_names())
    for group, module in groups.items():
        assert group.__module__ == module
        own = {f.name for f in dataclasses.fields(group)}
        assert own and own <= names, group
    assert {"second_policy", "second_threshold", "balance_loss_weight", "priority"} == {f.name for f in dataclasses.fields(TopKOptions)}


def test_layer_takes_the_config_whole_and_keywords_override_it():
    cfg = MoEConfig(router="topk", top_k=2, capacity_factor_train=1.25, second_policy="sampling")
    m = MoEMlp(8, 16, num_experts=4, config=cfg)
    assert (m.router.top_k, m.router.second_policy, m.capacity(40)) == (2, "sampling", 25)
    assert m.config == cfg and m.config is not cfg  # checked copy; the caller's object is untouched
    m2 = MoEMlp(8, 16, num_experts=4, config=cfg, top_k=1, second_policy="all")
    assert (m2.router.top_k, m2.capacity(40)) == (1, 13)
    assert m.aux_weights == {"balance": 0.01, "z": 1e-3}


@pytest.mark.parametrize("fields,named", [
    (dict(top_k=5), "moe.top_k"), (dict(top_k=True), "moe.top_k"), (dict(jitter_eps=float("inf")), "moe.jitter_eps"),
    (dict(capacity_factor_train=-1.0), "moe.capacity_factor_train"), (dict(router="switch", top_k=2), "moe.top_k"),
    (dict(balance_loss_weight=float("nan")), "moe.balance_loss_weight"), (dict(min_capacity=1.5), "moe.min_capacity"),
    (dict(router="expert_choice"), "moe.capacity_factor_train"), (dict(dispatch="fast"), "moe.dispatch"),
])
def test_validation_names_the_nested_field(fields, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        MoEConfig(**fields).validate([4])


def test_yaml_strings_are_coerced_to_field_types():
    cfg = MoEConfig(top_k="2", router="TopK", capacity_factor_eval="1e-1", residual="true", z_loss_weight="0").validate([4])
    assert (cfg.top_k, cfg.router, cfg.capacity_factor_eval, cfg.residual, cfg.z_loss_weight) == (2, "topk", 0.1, True, 0.0)


def test_nested_dotted_and_old_flat_spellings_agree():
    nested = model_config("switch_vit", moe={"router": "topk", "top_k": 2})
    dotted = model_config("switch_vit", **{"moe.router": "topk", "moe.top_k": 2})
    with pytest.warns(FutureWarning, match="'top_k' is now 'moe.top_k'"):
        flat = model_config("switch_vit", router="topk", top_k=2)
    assert nested == dotted == flat and nested.moe.top_k == 2 and nested.moe.router == "topk"
    # The other MoE fields keep the preset's values when only some are overridden.
    assert model_config("vit_moe_lite6", moe={"top_k": 1}).moe.router_noise == "gaussian"
    with pytest.raises(ConfigError, match=r"unknown MoE field.*'topk'"):
        model_config("switch_vit", moe={"topk": 2})
    with pytest.raises(ConfigError, match="unknown model field 'routr'"):
        model_config("switch_vit", routr="topk")


def test_to_dict_round_trip_is_nested():
    cfg = model_config("pr_moe_lite6")
    d = cfg.to_dict()
    assert d["moe"]["residual"] is True and d["moe"]["router"] == "switch" and "router" not in d
    assert ViTConfig.from_dict(json.loads(json.dumps(d))).validate() == cfg


def test_checkpoint_with_the_old_flat_config_still_loads(tmp_path):
    m = vitmoe.create_model("switch_vit", num_experts=4, moe={"top_k": 1, "capacity_factor_eval": 2.0}, **TINY).eval()
    path = tmp_path / "m.safetensors"
    vitmoe.save_model(m, path)
    # Rewrite the metadata the way 0.1 wrote it: MoE fields flat in the model config, only those
    # 0.1 had (priority came after the move into `moe`, so no 0.1 file holds it).
    from safetensors import safe_open

    from vitmoe.models.config import LEGACY_MOE_FIELDS

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    old = json.loads(meta["config"])
    moe = old.pop("moe")
    flat = {new: old_name for old_name, new in LEGACY_MOE_FIELDS.items()}
    old.update({flat[k]: v for k, v in moe.items() if k in flat})
    assert "moe_residual" in old and "priority" not in old
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(old)})
    with pytest.warns(FutureWarning):
        loaded = load_model(path).eval()
    assert loaded.config == m.config
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_width_without_heads_keeps_the_presets_head_width():
    assert model_config("vit", embed_dim=400).num_heads == 16  # 12 heads of 25 -> 16 heads of 25
    assert model_config("vit_lite6", embed_dim=128).num_heads == 2  # heads of 64
    assert model_config("vit", embed_dim=64, num_heads=4).num_heads == 4  # explicit heads win
    with pytest.raises(ConfigError, match=r"--heads.*\[1, 2, 4, 8, 16, 32, 64\]"):
        model_config("vit", embed_dim=64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_keeps_dtype_and_equals_merged_evaluation(dtype):
    m = vitmoe.create_model("random_vit", **TINY).to(dtype).eval()
    with torch.no_grad():  # distinct experts, so the average is not one of them
        for _, layer in m.moe_modules():
            layer.experts.w1.add_(torch.randn_like(layer.experts.w1) * 0.02)
    dense = vitmoe.merge_experts(m)
    assert {p.dtype for p in dense.parameters()} == {dtype}
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        tol = 1e-12 if dtype == torch.float64 else 2e-2  # float32 weights would miss float64 by ~1e-8
        torch.testing.assert_close(dense(x), m(x), rtol=tol, atol=tol)


def test_expert_choice_asks_for_both_capacity_factors_at_once():
    # it needs both: naming only the first made a user fix one and meet the second error
    with pytest.raises(ConfigError, match="set both capacity_factor_train and capacity_factor_eval"):
        MoEConfig(router="expert_choice").validate([4])
