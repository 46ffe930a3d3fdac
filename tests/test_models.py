"""ViT, presets, merging, accounting and checkpoints."""
import warnings

import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file

import vitmoe
from vitmoe.moe import collect_moe_outputs
from vitmoe.models import ConfigError, Mlp, load_model, model_config, model_info, read_metadata, save_model


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_dense_vit_parameter_count_matches_source():
    assert n_params(vitmoe.create_model("vit", num_classes=10)) == 12_727_990
    # The source table's 12,798,490: its positional table had d_model = 300 rows, not 65 tokens.
    assert n_params(vitmoe.create_model("vit", pos_embed_rows=300)) == 12_798_490


def test_model_info_matches_counted_parameters_and_formula():
    for name, kw in [("vit", {}), ("switch_vit", dict(num_experts=4, **TINY)), ("random_vit", TINY),
                     ("switch_vit", dict(moe_layers="every_other", num_experts=[2, 8], depth=4, embed_dim=24,
                                         num_heads=2, mlp_hidden=32, head_hidden=16))]:
        m = vitmoe.create_model(name, **kw)
        info = model_info(m.config)
        assert info.total_params == n_params(m), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging routed models warns; tested below
            dense = vitmoe.merge_experts(m) if m.config.moe_layers != "none" else m
        assert info.merged_params == n_params(dense), name
    cfg = model_config("switch_vit", num_experts=64)
    info = model_info(cfg)
    D, H, L = 300, 1024, 12
    mlp = 2 * D * H + H + D
    assert info.total_params == 12_727_990 + L * (63 * mlp + D * 64)
    assert info.active_params_per_token == 12_727_990 + L * D * 64
    # FLOPs: the switch model pays only its routers over the dense one.
    assert info.forward_flops_per_image - model_info(model_config("vit")).forward_flops_per_image == L * 2 * 65 * D * 64


def test_random_vit_merges_to_exactly_the_dense_parameter_count_and_outputs():
    m = vitmoe.create_model("random_vit", **TINY).eval()
    for block in m.blocks:  # make the experts differ, so merging actually averages
        with torch.no_grad():
            block.mlp.experts.w1.add_(torch.randn_like(block.mlp.experts.w1) * 0.1)
            block.mlp.experts.b2.add_(torch.randn_like(block.mlp.experts.b2) * 0.1)
    dense = vitmoe.merge_experts(m).eval()
    assert not list(dense.moe_modules()) and all(isinstance(b.mlp, Mlp) for b in dense.blocks)
    assert n_params(dense) == n_params(vitmoe.create_model("vit", **TINY))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), m(x), rtol=1e-5, atol=1e-6)
        m.set_eval_mode("ensemble")
        assert not torch.allclose(dense(x), m(x), atol=1e-6)


def test_merging_a_routed_model_warns_and_usage_weighting():
    m = vitmoe.create_model("switch_vit", num_experts=4, expert_init="independent", **TINY)
    m(torch.randn(4, 3, 32, 32))
    with pytest.warns(UserWarning, match="learned router"):
        dense = vitmoe.merge_experts(m, weighting="usage")
    mlp = m.blocks[0].mlp
    w = mlp.usage / mlp.usage.sum()
    torch.testing.assert_close(dense.blocks[0].mlp.fc1.weight, torch.einsum("e,edh->hd", w, mlp.experts.w1))
    fresh = vitmoe.create_model("random_vit", **TINY)
    with pytest.raises(ValueError, match="no expert usage"):
        vitmoe.merge_experts(fresh, weighting="usage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitmoe.merge_experts(fresh)  # random routing: nothing to warn about


@pytest.mark.parametrize("name", vitmoe.list_models())
def test_every_preset_builds_runs_and_every_parameter_gets_a_gradient(name):
    kw = dict(TINY)
    blocks = model_config(name).moe_layers
    if isinstance(blocks, list):  # a preset's explicit MoE blocks (the pyramid 1, 3, 5) must exist
        kw["depth"] = max(blocks) + 1
    model = vitmoe.create_model(name, **kw)
    x = torch.randn(4, 3, 32, 32)
    out = model(x, return_aux=True)
    logits = out.logits
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    (torch.nn.functional.cross_entropy(logits, torch.arange(4)) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    if model.config.moe.router == "random":  # one expert per layer per forward: the others legitimately get none
        missing = [n for n in missing if ".experts." not in n]
    assert not missing
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_moe_layer_plan_and_pyramid():
    m = vitmoe.create_model("switch_vit", moe_layers="every_other", num_experts=[4, 8], depth=4, embed_dim=24,
                            num_heads=2, mlp_hidden=32, head_hidden=16)
    kinds = [(type(b.mlp).__name__, getattr(b.mlp, "num_experts", None)) for b in m.blocks]
    assert kinds == [("Mlp", None), ("MoEMlp", 4), ("Mlp", None), ("MoEMlp", 8)]
    assert model_config("vit", moe_layers="last:2", depth=5).moe_block_indices() == [3, 4]
    assert model_config("vit", moe_layers=[0, 2], depth=5).moe_block_indices() == [0, 2]
    assert model_config("vit", moe_layers="all", depth=3).moe_block_indices() == [0, 1, 2]


def test_aux_loss_and_stats_collected_from_layers():
    m = vitmoe.create_model("switch_vit", num_experts=4, **TINY)
    dense = vitmoe.create_model("vit", **TINY)(torch.randn(2, 3, 32, 32), return_aux=True)
    assert float(dense.aux_loss) == 0 and dense.aux_terms == {} and dense.moe_stats == {}
    x = torch.randn(2, 3, 32, 32)
    with collect_moe_outputs(m) as moe:
        out = m(x, return_aux=True)  # the model's own collection nests inside the caller's
    layers = moe.layer_aux()
    expected = sum(0.01 * aux["balance"] + 1e-3 * aux["z"] for aux in layers.values())
    torch.testing.assert_close(out.aux_loss, expected)
    assert set(out.aux_terms) == {"balance", "z"}
    torch.testing.assert_close(out.aux_terms["z"], torch.stack([a["z"] for a in layers.values()]).mean().detach())
    torch.testing.assert_close(m(x), out.logits)  # plain forward: the logits alone
    stats = out.moe_stats
    assert list(stats) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert float(stats["blocks.0.mlp"]["load"].sum()) == 2 * 65


@pytest.mark.parametrize("override,field", [
    (dict(embed_dim=30, num_heads=4), "num_heads"), (dict(patch_size=5), "patch_size"),
    (dict(pool="max"), "pool"), (dict(moe_layers="some"), "moe_layers"), (dict(moe_layers=[0, 99]), "moe_layers"),
    (dict(moe_layers="all", num_experts=[4, 4]), "num_experts"), (dict(moe=dict(router="magic")), "moe.router"),
    (dict(depth=0), "depth"), (dict(embed_dimm=8), "embed_dimm"), (dict(moe=dict(top_k=2)), "moe.top_k"),
    (dict(moe=dict(top_k=True)), "moe.top_k"), (dict(moe=dict(jitter_eps=float("nan"))), "moe.jitter_eps"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        vitmoe.create_model("switch_vit", **override)
    with pytest.raises(ConfigError, match="available: " + ", ".join(vitmoe.list_models())):
        vitmoe.create_model("vit_huge")


def test_mean_pooling_zero_head_and_linear_head():
    m = vitmoe.create_model("vit", pool="mean", head="linear", head_init="zero", **TINY)
    assert m.cls_token is None and m.pos_embed.shape[1] == 64
    assert torch.equal(m(torch.randn(2, 3, 32, 32)), torch.zeros(2, 10))


def test_checkpoint_round_trip_and_errors(tmp_path):
    m = vitmoe.create_model("switch_vit", num_experts=3, **TINY).eval()
    path = tmp_path / "m.safetensors"
    save_model(m, path, metadata={"epoch": 3})
    assert read_metadata(path)["epoch"] == 3
    m2 = load_model(path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_model(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a vitmoe model checkpoint"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(tmp_path / "junk.safetensors")


def test_merged_checkpoint_loads_as_plain_vit(tmp_path):
    m = vitmoe.create_model("random_vit", **TINY).eval()
    save_model(vitmoe.merge_experts(m), tmp_path / "dense.safetensors")
    meta = read_metadata(tmp_path / "dense.safetensors")
    assert meta["config"]["moe_layers"] == "none"
    dense = vitmoe.create_model("vit", checkpoint=str(tmp_path / "dense.safetensors"), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), m(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="does not fit preset"):
        vitmoe.create_model("vit", checkpoint=str(tmp_path / "dense.safetensors"))


@pytest.mark.slow
def test_compiled_moe_model_matches_eager_with_its_aux_loss():
    # torch.compile traces _grouped_mm's shape function, which takes bf16 only: fp32 must fall
    # back to the padded path when compiling instead of failing (vitmoe train --compile).
    m = vitmoe.create_model("switch_vit", num_experts=4, **TINY)
    x = torch.randn(4, 3, 32, 32)
    out = torch.compile(m)(x, return_aux=True)
    ref = m(x, return_aux=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-7)
    assert list(out.moe_stats) == list(ref.moe_stats) == ["blocks.0.mlp", "blocks.1.mlp"]


def test_cpu_low_precision_attention_path_equals_the_fused_kernel():
    # On CPU, bf16/fp16 attention runs as two plain matmuls (the fused kernel was 3-5x slower
    # there): the formula must be SDPA's, and the layer under bf16 autocast must match fp32.
    import torch.nn.functional as F

    from vitmoe.models.vit import Attention, _explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 5, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(_explicit_attention(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)
    attn = Attention(32, 4)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", torch.bfloat16):
        low = attn(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), attn(x), rtol=3e-2, atol=3e-2)
