"""Compact Convolutional Transformers (Hassani et al. 2021): the conv tokenizer, sequence pooling,
stochastic depth, the CCT presets (dense and MoE) and everything around them (accounting,
merging, upcycling, checkpoints, the transformers export's refusal, the info command)."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitmoe
from vitmoe.cli.main import main
from vitmoe.models import (ConfigError, ModelFileError, ViTConfig, export_hf, load_model, model_config, model_info,
                           save_model)
from vitmoe.models.droppath import DropPath, drop_path, drop_path_rates
from vitmoe.models.seqpool import SeqPool
from vitmoe.models.surgery import load_adapted
from vitmoe.models.tokenizer import ConvTokenizer

CCT = [n for n in vitmoe.list_models() if n.startswith("cct_")]
FMNIST = dict(img_size=28, in_chans=1)  # what the Fashion-MNIST dataset sets


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- tokenizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("side,chans,layers,kernel,tokens", [
    (28, 1, 2, 3, 49),   # 28 -conv-> 28 -pool-> 14 -conv-> 14 -pool-> 7
    (32, 3, 2, 3, 64),   # 32 -> 16 -> 8
    (28, 1, 1, 3, 196),  # 28 -> 14
    (32, 3, 1, 3, 256),  # 32 -> 16
    (32, 3, 1, 7, 64),   # k 7: stride 2, padding 3: 32 -conv-> 16 -pool-> 8
])
def test_conv_tokenizer_token_counts(side, chans, layers, kernel, tokens):
    tok = ConvTokenizer(side, chans, 40, layers, kernel)
    out = tok(torch.randn(2, chans, side, side))
    assert tuple(out.shape) == (2, tokens, 40) and tok.num_tokens == tokens
    cfg = ViTConfig(tokenizer="conv", img_size=side, in_chans=chans, conv_layers=layers, conv_kernel=kernel,
                    embed_dim=40, num_heads=4, pool="seq")
    assert (cfg.num_patches, cfg.num_tokens) == (tokens, tokens)
    assert ViTConfig(tokenizer="conv", img_size=side, conv_layers=layers, conv_kernel=kernel, pool="cls").num_tokens == tokens + 1


def test_conv_tokenizer_layers_are_cct_s():
    tok = ConvTokenizer(28, 1, 128, layers=2, kernel=3)
    convs = [m for m in tok.layers if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in tok.layers if isinstance(m, torch.nn.MaxPool2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) for c in convs] == [
        (1, 64, (3, 3), (1, 1), (1, 1), None), (64, 128, (3, 3), (1, 1), (1, 1), None)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 2
    assert sum(isinstance(m, torch.nn.ReLU) for m in tok.layers) == 2
    # Kaiming normal (fan-in, gain sqrt 2): std sqrt(2 / (64 * 9)) = 0.0589 for the second layer.
    assert abs(float(convs[1].weight.std()) - (2 / (64 * 9)) ** 0.5) < 0.003
    x = torch.randn(2, 1, 28, 28)
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, convs[0].weight, padding=1)), 3, 2, 1)
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(ref, convs[1].weight, padding=1)), 3, 2, 1)
    torch.testing.assert_close(tok(x), ref.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="expected 28x28"):
        tok(torch.randn(1, 1, 32, 32))



@pytest.mark.parametrize("side,chans,layers,kernel", [(28, 1, 2, 3), (32, 3, 2, 3), (28, 1, 1, 3), (32, 3, 1, 7)])
def test_channels_last_tokenizer_equals_the_nchw_float64_reference_with_gradients(side, chans, layers, kernel):
    # The tokenizer runs its pooling in channels-last (NCHW max pooling is a scalar loop on CPUs);
    # outputs and gradients must be those of the plain NCHW network, and the tokens a dense [B, N, D].
    tok = ConvTokenizer(side, chans, 48, layers=layers, kernel=kernel).double()
    pooled_layouts, conv_layouts = [], []
    for m in tok.layers:
        if isinstance(m, torch.nn.MaxPool2d):
            m.register_forward_hook(lambda mod, inp, out: pooled_layouts.append(
                inp[0].is_contiguous(memory_format=torch.channels_last)))
        if isinstance(m, torch.nn.Conv2d):  # each convolution writes NHWC itself: no layout copy after it
            m.register_forward_hook(lambda mod, inp, out: conv_layouts.append(
                (inp[0].stride(1), out.stride(1))))
    x = torch.randn(4, chans, side, side, dtype=torch.float64, requires_grad=True)
    out = tok(x)
    assert out.is_contiguous() and pooled_layouts == [True] * layers
    assert conv_layouts == [(1, 1)] * layers  # channel stride 1: NHWC in and out, also for 1 channel
    ref_tok = ConvTokenizer(side, chans, 48, layers=layers, kernel=kernel).double()
    ref_tok.load_state_dict(tok.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    h = x_ref
    for layer in ref_tok.layers:
        h = layer(h)
        assert h.is_contiguous()  # the reference stays NCHW throughout
    ref = h.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(tok.named_parameters(), ref_tok.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
        assert p.is_contiguous() and p.grad.is_contiguous()  # layouts kept: checkpoints, optimizers unchanged


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokenizer_convolutions_read_and_write_nhwc_in_the_training_dtypes(chans, dtype):
    # float64 convolutions do not go through oneDNN, whose choice of output layout follows the input's
    # strides: in float32 and bf16 autocast each convolution too must see and write channel stride 1.
    tok = ConvTokenizer(28, chans, 48, layers=2)
    strides = []
    for m in tok.layers:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: strides.append((inp[0].stride(1), out.stride(1))))
    x = torch.randn(8, chans, 28, 28)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = tok(x)
    assert out.dtype == dtype and out.is_contiguous() and strides == [(1, 1), (1, 1)]


# --- sequence pooling ----------------------------------------------------------------------------
def test_seq_pool_weights_sum_to_one_and_pool_by_hand():
    pool = SeqPool(6).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    pooled, w = pool(x, return_weights=True)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, dtype=torch.float64))
    scores = x @ pool.attention.weight[0] + pool.attention.bias[0]  # [3, 5]
    by_hand = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
    torch.testing.assert_close(w, by_hand)
    expected = torch.stack([sum(by_hand[b, n] * x[b, n] for n in range(5)) for b in range(3)])
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, x.mean(dim=1))  # not mean pooling in disguise


def test_model_with_seq_pool_classifies_the_pooled_vector():
    m = vitmoe.create_model("cct_2_3x2", **FMNIST).eval()
    x = torch.randn(2, 1, 28, 28)
    tokens = m.forward_features(x)
    assert tokens.shape[1] == 49 and m.cls_token is None
    torch.testing.assert_close(m(x), m.head(m.seq_pool(tokens)))


# --- stochastic depth ----------------------------------------------------------------------------
def test_drop_path_is_identity_in_eval_and_a_scaled_sample_mask_in_training():
    x = torch.randn(16, 5, 4)
    assert drop_path(x, 0.3, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(3)
    y = DropPath(0.3).train()(x)
    torch.manual_seed(3)
    mask = torch.empty(16, 1, 1).bernoulli_(0.7)
    assert 0 < int(mask.sum()) < 16  # both kinds of sample occur
    torch.testing.assert_close(y, x * mask / 0.7, rtol=0, atol=0)
    kept = (y != 0).flatten(1).all(dim=1)
    assert torch.equal(kept, mask.flatten().bool())  # whole samples, not elements
    assert torch.equal(DropPath(0.3).eval()(x), x)


def test_drop_path_rates_rise_linearly_over_the_blocks():
    assert drop_path_rates(0.1, 1) == [0.0]
    torch.testing.assert_close(torch.tensor(drop_path_rates(0.3, 4)), torch.tensor([0.0, 0.1, 0.2, 0.3]))
    m = vitmoe.create_model("cct_7_3x2", **FMNIST)
    rates = [b.drop_path.rate for b in m.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 7, dtype=torch.float64).float())
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


def test_block_drops_both_residual_branches_per_sample():
    block = vitmoe.models.Block(8, 2, 16, drop_path=0.5).train()
    x = torch.randn(64, 3, 8)
    torch.manual_seed(0)
    y = block(x)
    torch.manual_seed(0)
    m1, m2 = torch.empty(64, 1, 1).bernoulli_(0.5), torch.empty(64, 1, 1).bernoulli_(0.5)
    h = x + block.attn(block.norm1(x)) * m1 / 0.5
    torch.testing.assert_close(y, h + block.mlp(block.norm2(h)) * m2 / 0.5)
    skipped = ((m1 == 0) & (m2 == 0)).flatten()
    assert skipped.any() and torch.equal(y[skipped], x[skipped])  # both branches dropped: the identity
    assert torch.equal(block.eval()(x), x + block.attn(block.norm1(x)) + block.mlp(block.norm2(x + block.attn(block.norm1(x)))))


# --- presets -------------------------------------------------------------------------------------
def test_cct_presets_exist_with_the_recipe_settings():
    assert {"cct_2_3x2", "cct_7_3x2", "cct_7_3x1"} <= set(CCT)
    for base in ("cct_2_3x2", "cct_7_3x2"):
        assert {f"{base}_{s}" for s in ("switch", "top2", "random", "pr")} <= set(CCT)
    for name in CCT:
        c = model_config(name)
        assert (c.tokenizer, c.conv_kernel, c.pool, c.head, c.pos_embed, c.qkv_bias) == ("conv", 3, "seq", "linear",
                                                                                         "learned", False), name
        assert (c.drop_rate, c.attn_drop_rate, c.drop_path_rate) == (0.0, 0.1, 0.1), name
    shapes = {n: (c.embed_dim, c.depth, c.num_heads, c.mlp_hidden, c.conv_layers)
              for n in ("cct_2_3x2", "cct_7_3x2", "cct_7_3x1") for c in [model_config(n)]}
    assert shapes == {"cct_2_3x2": (128, 2, 2, 128, 2), "cct_7_3x2": (256, 7, 4, 512, 2), "cct_7_3x1": (256, 7, 4, 512, 1)}
    sw, t2, rr, pr = (model_config(f"cct_7_3x2_{s}") for s in ("switch", "top2", "random", "pr"))
    assert (sw.moe_block_indices(), sw.experts_per_moe_block(), sw.moe.router, sw.moe.top_k) == ([1, 3, 5], [8] * 3, "switch", 1)
    assert (sw.moe.capacity_factor_train, sw.moe.capacity_factor_eval, sw.moe.min_capacity) == (1.25, 2.0, 4)
    assert (t2.moe.router, t2.moe.top_k, t2.experts_per_moe_block()) == ("topk", 2, [8] * 3)
    assert (rr.moe.router, rr.moe.random_granularity, rr.moe.eval_mode, rr.moe.expert_init) == ("random", "batch", "merged", "shared")
    assert rr.experts_per_moe_block() == [4] * 3 and rr.moe.capacity_factor_train is None  # dropless: one expert takes all
    assert (pr.moe.residual, pr.moe.router, pr.moe.top_k, pr.moe.router_noise) == (True, "switch", 1, "jitter")
    assert pr.experts_per_moe_block() == [4, 4, 8]  # pr_moe_lite6's pyramid
    assert model_config("cct_2_3x2_switch").moe_block_indices() == [1]
    assert model_config("cct_2_3x2_pr").experts_per_moe_block() == [8]


@pytest.mark.parametrize("name", CCT)
def test_every_cct_preset_trains_with_gradients_where_they_belong(name):
    # Drop path off here: it zeroes whole images' branches, so an expert fed only by dropped
    # images would have tokens (load) but no gradient; it is tested on its own above.
    m = vitmoe.create_model(name, drop_path_rate=0.0, **FMNIST).train()
    out = m(torch.randn(4, 1, 28, 28), return_aux=True)
    assert out.logits.shape == (4, 10)
    (torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])) + out.aux_loss).backward()
    experts = {}
    for layer_name, layer in m.moe_modules():
        got_tokens = out.moe_stats[layer_name]["load"] > 0
        for pname, p in layer.experts.named_parameters():
            experts[f"{layer_name}.experts.{pname}"] = (p, got_tokens)
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname in experts:  # an expert's slice has a gradient exactly when it got tokens
            _, got_tokens = experts[pname]
            assert torch.equal(p.grad.flatten(1).abs().sum(1) > 0, got_tokens), pname
        elif pname == "seq_pool.attention.bias":  # softmax ignores a shift shared by every score
            assert float(p.grad.abs().max()) < 1e-6
        else:
            assert p.grad.abs().sum() > 0, pname
    assert m.config.is_moe == bool(experts)


# Hand counts at 28x28x1 (Fashion-MNIST). cct_2_3x2: D 128, MLP 128, 2 heads, 49 tokens.
#   tokenizer  1*64*9 + 64*128*9 (no bias)          =  74,304
#   pos table  49*128                               =   6,272
#   attention  128*384 (qkv, no bias) + 128*128+128 =  65,664
#   2 norms    2*(128 + 128)                        =     512
#   MLP        128*128+128 + 128*128+128            =  33,024
#   block      65,664 + 512 + 33,024                =  99,200  (x2 = 198,400)
#   final norm 256, seq pool 128+1 = 129, head 128*10+10 = 1,290
CCT2 = 74_304 + 6_272 + 2 * 99_200 + 256 + 129 + 1_290
# cct_2_3x2_switch: block 1's MLP becomes 8 experts plus a bias-free router Linear(128, 8).
CCT2_SWITCH = CCT2 - 33_024 + 8 * 33_024 + 128 * 8
# cct_7_3x1 at 32x32x3 (the paper's CIFAR model, 3.76M there): D 256, MLP 512, 256 tokens.
#   tokenizer 3*256*9 = 6,912; pos 256*256 = 65,536; block 256*768 + 256*256+256 + 2*512
#   + 256*512+512 + 512*256+256 = 526,336 (x7); final norm 512, seq pool 257, head 2,570
CCT7_3X1_CIFAR = 6_912 + 65_536 + 7 * 526_336 + 512 + 257 + 2_570


@pytest.mark.parametrize("name,kw,expected", [
    ("cct_2_3x2", FMNIST, 280_651), ("cct_2_3x2_switch", FMNIST, 512_843), ("cct_7_3x1", {}, 3_760_139)])
def test_parameter_counts_match_hand_computation(name, kw, expected):
    assert {"cct_2_3x2": CCT2, "cct_2_3x2_switch": CCT2_SWITCH, "cct_7_3x1": CCT7_3X1_CIFAR}[name] == expected
    m = vitmoe.create_model(name, **kw)
    assert n_params(m) == expected
    info = model_info(m.config)
    assert info.total_params == expected
    if name == "cct_2_3x2_switch":  # a token meets the router and one expert of block 1
        assert info.active_params_per_token == CCT2 + 128 * 8 and info.merged_params == CCT2


def test_model_info_follows_tokenizer_pooling_and_positions():
    for name, kw in [(n, FMNIST) for n in CCT] + [
            ("cct_2_3x2", dict(pos_embed="none")), ("cct_7_3x2", dict(conv_kernel=7, conv_layers=1)),
            ("vit_lite6", dict(pool="seq", pos_embed="none")), ("cct_2_3x2", dict(tokenizer="patch", patch_size=4))]:
        m = vitmoe.create_model(name, **kw)
        info = model_info(m.config)
        assert info.total_params == n_params(m), (name, kw)
        if info.mergeable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert info.merged_params == n_params(vitmoe.merge_experts(m)), (name, kw)
    # FLOPs: 2 x multiply-adds. cct_2_3x2 at 28: convs 2*(28^2*1*64*9 + 14^2*64*128*9), per block
    # projections 2*49*4*128^2 + attention 2*2*49^2*128 + MLP 2*49*2*128*128, seq pool 2*2*49*128,
    # head 2*128*10.
    convs = 2 * (28**2 * 64 * 9 + 14**2 * 64 * 128 * 9)
    block = 2 * 49 * 4 * 128**2 + 4 * 49**2 * 128 + 2 * 49 * 2 * 128 * 128
    flops = convs + 2 * block + 4 * 49 * 128 + 2 * 128 * 10
    assert model_info(model_config("cct_2_3x2", **FMNIST)).forward_flops_per_image == flops == 51_558_400
    assert "pos_embed" not in dict(vitmoe.create_model("cct_2_3x2", pos_embed="none").named_parameters())


# --- merging, upcycling, checkpoints, export -----------------------------------------------------
def test_merged_random_routing_cct_equals_averaging_the_experts_by_hand():
    m = vitmoe.create_model("cct_2_3x2_random", **FMNIST).eval()
    layer = m.blocks[1].mlp
    with torch.no_grad():  # shared init makes the experts equal; make them differ, as training would
        for p in layer.experts.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hand = vitmoe.create_model("cct_2_3x2", **FMNIST).eval()
    state = {k: v for k, v in m.state_dict().items() if ".experts." not in k}
    e = layer.experts
    state.update({"blocks.1.mlp.fc1.weight": e.w1.mean(0).t(), "blocks.1.mlp.fc1.bias": e.b1.mean(0),
                  "blocks.1.mlp.fc2.weight": e.w2.mean(0).t(), "blocks.1.mlp.fc2.bias": e.b2.mean(0)})
    hand.load_state_dict(state, strict=True)
    merged = vitmoe.merge_experts(m)
    assert (merged.config.tokenizer, merged.config.conv_layers, merged.config.pool, n_params(merged)) == ("conv", 2, "seq", CCT2)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(merged(x), hand(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), hand(x), rtol=1e-5, atol=1e-6)  # the MoE model's merged eval
    m.set_eval_mode("ensemble")  # the mean of the experts' outputs: another function once they differ
    assert not torch.allclose(m(x), hand(x), atol=1e-4)


def test_upcycled_dense_cct_starts_as_the_dense_model():
    dense = vitmoe.create_model("cct_7_3x2", **FMNIST).double().eval()
    moe = vitmoe.upcycle(dense)  # top-2, 8 experts, blocks 1, 3, 5, dropless
    assert (moe.config.tokenizer, moe.config.moe_block_indices(), moe.config.moe.top_k) == ("conv", [1, 3, 5], 2)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigError, match="tokenizer 'conv' .source. vs 'patch'"):
        vitmoe.upcycle(dense, tokenizer="patch")


def test_cct_checkpoint_round_trip_and_older_checkpoints_load(tmp_path):
    m = vitmoe.create_model("cct_2_3x2_pr", **FMNIST).eval()
    save_model(m, tmp_path / "pr.safetensors")
    back = load_model(tmp_path / "pr.safetensors").eval()
    assert back.config == m.config
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    # A file written before the CCT fields existed: its config lacks them and means today's defaults.
    old = vitmoe.create_model("vit_lite6", embed_dim=24, num_heads=2, mlp_hidden=32, depth=2).eval()
    save_model(old, tmp_path / "new.safetensors")
    cfg = old.config.to_dict()
    for name in ("tokenizer", "conv_layers", "conv_kernel", "pos_embed", "drop_path_rate"):
        del cfg[name]
    save_file(load_file(str(tmp_path / "new.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={"format": "vitmoe-model-1", "config": json.dumps(cfg)})
    loaded = load_model(tmp_path / "old.safetensors").eval()
    assert (loaded.config.tokenizer, loaded.config.pos_embed, loaded.config.drop_path_rate) == ("patch", "learned", 0.0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)


def test_cct_positional_table_follows_the_token_grid_at_another_image_size():
    src = vitmoe.create_model("cct_2_3x2")  # 32x32: 8x8 tokens
    dst = vitmoe.create_model("cct_2_3x2", img_size=28)  # 7x7
    assert load_adapted(dst, src.state_dict()) == ["pos_embed: 8x8 -> 7x7 patch grid (bicubic)"]
    torch.testing.assert_close(dst.tokenizer.layers[0].weight, src.tokenizer.layers[0].weight)


@pytest.mark.parametrize("kw,field", [
    (dict(), "model field tokenizer='conv' has no transformers ViT equivalent"),
    (dict(tokenizer="patch", pool="cls"), "model field pos_embed='none' has no transformers ViT equivalent"),
    (dict(tokenizer="patch", pos_embed="learned"), "model field pool='seq'"),
])
def test_transformers_export_refuses_what_it_cannot_hold(tmp_path, kw, field):
    m = vitmoe.create_model("cct_2_3x2", **{"pos_embed": "none", **kw})
    with pytest.raises(ModelFileError) as e:
        export_hf(m, tmp_path / "hf")
    assert field in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kw,field", [
    (dict(tokenizer="convolution"), "tokenizer"), (dict(conv_layers=0), "conv_layers"),
    (dict(conv_kernel=2.5), "conv_kernel"), (dict(pool="max"), "pool"), (dict(pos_embed="sine"), "pos_embed"),
    (dict(pos_embed="none", pos_embed_rows=64), "pos_embed_rows"), (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(drop_path_rate=-0.1), "drop_path_rate"),
])
def test_new_fields_are_validated_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"model field {field}="):
        model_config("cct_2_3x2", **kw)


def test_conv_tokenizer_ignores_patch_size_and_yaml_strings_coerce():
    c = model_config("cct_2_3x2", img_size=28, patch_size=5, conv_layers="1", tokenizer="CONV", drop_path_rate="0.2")
    assert (c.conv_layers, c.tokenizer, c.drop_path_rate, c.num_tokens) == (1, "conv", 0.2, 196)
    with pytest.raises(ConfigError, match="model field patch_size=5"):
        model_config("cct_2_3x2", img_size=28, patch_size=5, tokenizer="patch")


def test_info_command_takes_a_cct_preset_by_flag(capsys):
    assert main(["info", "--model", "cct_7_3x2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == n_params(vitmoe.create_model("cct_7_3x2")) == 3_853_259
    assert main(["info", "--model", "cct_7_3x2", "--dataset", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert "2 conv 3x3 layers (49 tokens, pool seq), 28x28x1" in out and "3,848,267" in out
    assert main(["info", "cct_7_3x2", "--model", "cct_7_3x2"]) == 2
    assert "give the model once" in capsys.readouterr().err


def test_run_labels_name_the_cct_family():
    from vitmoe.models import model_config
    from vitmoe.training.config.model import model_label

    assert model_label(model_config("cct_2_3x2")) == "cct"
    assert model_label(model_config("cct_2_3x2_switch")) == "switch-cct"
    assert model_label(model_config("cct_2_3x2_pr")) == "pr-switch-cct"
    assert model_label(model_config("vit")) == "vit"
