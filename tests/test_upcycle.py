"""Sparse upcycling (`vitmoe.upcycle`, `vitmoe upcycle`, `vitmoe train --init`): the upcycled
model's start is the dense model (or, for switch, p_max times its MLP), merging gives the dense
weights back, Drop-Upcycling re-initialises exactly what it says, and --init errors are one line."""
import copy

import pytest
from conftest import TINY_SETS

from vitmoe.training.config import resolve
import torch

import vitmoe
from vitmoe.cli.main import main
from vitmoe.models import ViTConfig, VisionTransformer
from vitmoe.models.upcycle import drop_upcycle_, upcycled_config
from vitmoe.moe import MoEMlp

TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16, img_size=8, patch_size=4)


@pytest.fixture
def dense():
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(**TINY)).double()
    with torch.no_grad():  # non-zero biases and a non-trivial head, so every copied tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _x():
    return torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _same_output(dense, moe, atol=1e-12):
    x = _x()
    for train in (True, False):
        dense.train(train), moe.train(train)
        torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=atol)


@pytest.mark.parametrize("granularity", ["batch", "sample", "token"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("eval_mode", ["merged", "random", "ensemble"])
def test_randomly_routed_upcycle_is_the_dense_model(dense, granularity, top_k, eval_mode):
    moe = vitmoe.upcycle(dense, moe_layers="all", num_experts=4,
                         moe={"router": "random", "random_granularity": granularity, "top_k": top_k,
                              "eval_mode": eval_mode})
    assert moe.config.moe_block_indices() == [0, 1] and next(moe.parameters()).dtype == torch.float64
    _same_output(dense, moe)


@pytest.mark.parametrize("top_k,experts", [(2, 4), (2, 8), (4, 4)])
def test_topk_upcycle_with_renormalised_gates_is_the_dense_model(dense, top_k, experts):
    moe = vitmoe.upcycle(dense, moe_layers="all", num_experts=experts, moe={"router": "topk", "top_k": top_k})
    for _, layer in moe.moe_modules():
        assert torch.count_nonzero(layer.router.weight) == 0  # uniform router probabilities
    _same_output(dense, moe)


def test_default_upcycle_is_top2_every_other_block_and_exact(dense):
    moe = vitmoe.upcycle(dense)
    cfg = moe.config
    assert (cfg.moe_block_indices(), cfg.num_experts, cfg.moe.router, cfg.moe.top_k) == ([1], 8, "topk", 2)
    _same_output(dense, moe)
    assert not moe.training and not dense.training  # the source's mode is kept (last set: eval)


def test_residual_upcycle_is_the_dense_model(dense):
    moe = vitmoe.upcycle(dense, moe_layers="all", num_experts=4, moe={"router": "topk", "top_k": 2, "residual": True})
    _same_output(dense, moe)


def test_switch_upcycle_scales_the_mlp_by_pmax(dense):
    E = 4
    moe = vitmoe.upcycle(dense, moe_layers="all", num_experts=E, moe={"router": "switch"})
    # Zero router: p_max = 1/E for every token, so each MoE block adds MLP(x) / E: the dense model
    # with fc2 scaled by 1/E computes exactly that.
    scaled = copy.deepcopy(dense)
    with torch.no_grad():
        for block in scaled.blocks:
            block.mlp.fc2.weight /= E
            block.mlp.fc2.bias /= E
    _same_output(scaled, moe)
    with pytest.raises(AssertionError):
        _same_output(dense, moe)

    # The formula with any router: switch output = max_e softmax(W x)_e * MLP(x), per token.
    layer, mlp = moe.blocks[0].mlp, dense.blocks[0].mlp
    assert isinstance(layer, MoEMlp)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, 5, 24, dtype=torch.float64)
    p_max = torch.softmax(h.reshape(-1, 24).float() @ layer.router.weight.float().t(), dim=-1).max(-1).values
    expected = p_max.double().view(2, 5, 1) * mlp(h)
    torch.testing.assert_close(layer(h), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("router", ["random", "topk", "switch"])
def test_merging_an_untrained_upcycled_model_gives_the_dense_weights(dense, router):
    moe = vitmoe.upcycle(dense, moe_layers="every_other", num_experts=4, moe={"router": router})
    with pytest.warns(UserWarning) if router != "random" else _nothing():
        merged = vitmoe.merge_experts(moe)
    a, b = merged.state_dict(), dense.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("rate", [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitialises_round_r_h_units_per_expert(dense, rate):
    E, H = 4, TINY["mlp_hidden"]
    moe = vitmoe.upcycle(dense, moe_layers="all", num_experts=E, drop_upcycling=rate, seed=7)
    again = vitmoe.upcycle(dense, moe_layers="all", num_experts=E, drop_upcycling=rate, seed=7)
    other = vitmoe.upcycle(dense, moe_layers="all", num_experts=E, drop_upcycling=rate, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), again.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), other.state_dict().values()))
    k = round(rate * H)
    for i, block in enumerate(moe.blocks):
        fc1, fc2 = dense.blocks[i].mlp.fc1, dense.blocks[i].mlp.fc2
        ex = block.mlp.experts
        sets = []
        for e in range(E):
            changed_cols = (ex.w1[e] != fc1.weight.t()).any(0)          # [H]: a w1 column differs
            changed_rows = (ex.w2[e] != fc2.weight.t()).any(1)          # [H]: a w2 row differs
            assert torch.equal(changed_cols, changed_rows)
            assert int(changed_cols.sum()) == k
            kept = ~changed_cols
            assert torch.equal(ex.b1[e][kept], fc1.bias[kept]) and torch.equal(ex.b2[e], fc2.bias)
            assert not torch.equal(ex.b1[e][changed_cols], fc1.bias[changed_cols]) or k == 0
            sets.append(frozenset(changed_cols.nonzero().flatten().tolist()))
        if 0 < k < H:
            assert len(set(sets)) > 1  # each expert draws its own units


def test_drop_upcycling_draws_from_the_dense_statistics():
    torch.manual_seed(0)
    cfg = ViTConfig(**{**TINY, "embed_dim": 64, "num_heads": 4, "mlp_hidden": 256})
    dense = VisionTransformer(cfg)
    with torch.no_grad():
        dense.blocks[0].mlp.fc1.weight.mul_(3).add_(0.5)
    moe = vitmoe.upcycle(dense, moe_layers=[0], num_experts=2, drop_upcycling=1.0, seed=0)
    w1 = moe.blocks[0].mlp.experts.w1[0].detach()
    ref = dense.blocks[0].mlp.fc1.weight.detach()
    assert abs(float(w1.mean() - ref.mean())) < 0.01 and abs(float(w1.std() / ref.std()) - 1) < 0.05
    chosen = drop_upcycle_(moe.blocks[0].mlp.experts, 0.5, torch.Generator().manual_seed(0))
    assert [len(c) for c in chosen] == [128, 128]


def test_upcycle_refuses_other_shapes_and_moe_sources(dense):
    with pytest.raises(vitmoe.ConfigError, match="depth 2 \\(source\\) vs 3"):
        vitmoe.upcycle(dense, depth=3)
    with pytest.raises(vitmoe.ConfigError, match="no block"):
        upcycled_config(ViTConfig(**{**TINY, "depth": 1}))
    with pytest.raises(vitmoe.ConfigError, match="already MoE"):
        vitmoe.upcycle(vitmoe.upcycle(dense))


# --- command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dense"
    assert main(["train", "--dataset", "digits", "--noswitch", "--epochs", "1", "--batch", "128", "--out", str(out),
                 *TINY_SETS]) == 0
    return out


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitmoe: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_cli_upcycle_writes_a_model_file(dense_run, tmp_path, capsys):
    out = tmp_path / "up.safetensors"
    assert main(["upcycle", str(dense_run), str(out), "--model", "switch_vit", "--experts", "4",
                 "--set", "model.moe.top_k=2", "--drop-upcycling", "0.5", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    moe = vitmoe.load_model(out)
    cfg = moe.config
    assert (cfg.moe_block_indices(), cfg.num_experts, cfg.moe.router, cfg.moe.top_k) == ([0, 1], 4, "topk", 2)
    meta = vitmoe.models.read_metadata(out)
    assert meta["upcycle"] == {"drop_upcycling": 0.5, "noise_std": 0.0, "seed": 3} and meta["dataset"] == "digits"
    dense = vitmoe.load_model(next(dense_run.glob("checkpoints/epoch-*/model.safetensors")))
    expected = vitmoe.upcycle(dense, cfg, drop_upcycling=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), expected.state_dict().values()))


@pytest.mark.parametrize("argv,needles", [
    (["--set", "model.depth=3"], ["depth 2 (source) vs 3"]),
    (["--drop-upcycling", "1.5"], ["--drop-upcycling"]),
    (["--model", "vit"], ["--model vit is dense"]),
])
def test_cli_upcycle_errors_are_one_line(dense_run, tmp_path, capsys, argv, needles):
    assert main(["upcycle", str(dense_run), str(tmp_path / "x.safetensors"), *argv]) == 2
    _one_error_line(capsys, *needles)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_upcycle_of_a_missing_or_moe_source(dense_run, tmp_path, capsys):
    assert main(["upcycle", str(tmp_path / "nothere"), str(tmp_path / "x.safetensors")]) == 2
    _one_error_line(capsys, "does not exist")
    up = tmp_path / "up.safetensors"
    assert main(["upcycle", str(dense_run), str(up)]) == 0
    capsys.readouterr()
    assert main(["upcycle", str(up), str(tmp_path / "y.safetensors")]) == 2
    _one_error_line(capsys, "already an MoE model")


def test_train_init_upcycles_a_dense_run_into_switch_vit(dense_run, tmp_path, capsys):
    from vitmoe.cli.main import build_parser
    from vitmoe.cli.train import build_config
    from vitmoe.data import load_dataset
    from vitmoe.training import Trainer

    argv = ["--dataset", "digits", "--model", "switch_vit", "--experts", "4", "--epochs", "1", "--batch", "128",
            "--init", str(dense_run), *TINY_SETS]
    cfg = build_config(build_parser().parse_args(["train", *argv, "--out", str(tmp_path / "probe")]))
    trainer = Trainer(cfg, log=lambda m: None, train_data=load_dataset("digits", "train"),
                      test_data=load_dataset("digits", "test"))
    trainer.setup()  # builds the model and applies --init, as fit() does before its first step
    trainer._lock.release()
    dense = vitmoe.load_model(next(dense_run.glob("checkpoints/epoch-*/model.safetensors")))
    expected = vitmoe.upcycle(dense, trainer.model_cfg)
    x = torch.randn(4, 1, 8, 8)
    for train in (True, False):
        trainer.model.train(train), expected.train(train)
        torch.testing.assert_close(trainer.model(x), expected(x), rtol=0, atol=0)

    out = tmp_path / "sw"
    assert main(["train", *argv, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert f"init from {dense_run}" in log and "upcycled" in log
    import json

    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["init"] == str(dense_run)
    assert json.loads((out / "summary.json").read_text())["init"] == str(dense_run)


def test_init_adapts_image_size_and_class_count_while_upcycling(dense_run):
    """A dense 8x8, 10-class digits run as the start of a 16x16, 5-class top-2 MoE model: the
    positional table is interpolated (CLS row kept), the head replaced by zeros, the MLPs upcycled."""
    from vitmoe.models.surgery import resize_pos_embed
    from vitmoe.training.checkpoints.warm_start import init_from

    dense = vitmoe.load_model(next(dense_run.glob("checkpoints/epoch-*/model.safetensors")))
    cfg = dense.config.replace(img_size=16, num_classes=5, moe_layers="all", num_experts=4,
                               moe={"router": "topk", "top_k": 2})
    model = VisionTransformer(cfg)
    notes = init_from(model, str(dense_run), log=lambda m: None)
    assert any("pos_embed: 2x2 -> 4x4" in n for n in notes) and any("head: 10 -> 5" in n for n in notes)
    assert any("upcycled" in n for n in notes)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(dense.pos_embed, 2, 4), rtol=0, atol=0)
    assert torch.equal(model.pos_embed[:, 0], dense.pos_embed[:, 0])
    assert torch.count_nonzero(model.head[-1].weight) == 0 and model.head[-1].weight.shape == (5, 16)
    assert torch.equal(model.blocks[1].mlp.experts.w1[3], dense.blocks[1].mlp.fc1.weight.t())
    assert torch.equal(model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("extra,needles", [
    (["--init", "NOWHERE"], ["--init NOWHERE", "does not exist"]),
    (["--set", "model.depth=3"], ["--init", "depth 2 (SRC) vs 3 (run)"]),
    (["--set", "model.embed_dim=32"], ["--init", "embed_dim 16 (SRC) vs 32 (run)"]),
    (["--set", "model.head=mlp"], ["--init", "head 'linear' (SRC) vs 'mlp' (run)"]),
])
def test_train_init_errors_are_one_line_before_any_data(dense_run, tmp_path, capsys, monkeypatch, extra, needles):
    import vitmoe.data

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the --init check")

    monkeypatch.setattr(vitmoe.data, "load_dataset", no_data)
    init = [] if extra[0] == "--init" else ["--init", str(dense_run)]
    assert main(["train", "--dataset", "digits", "--model", "switch_vit", "--experts", "4", "--epochs", "1",
                 "--out", str(tmp_path / "r"), *TINY_SETS, *init, *extra]) == 2
    _one_error_line(capsys, *needles)


def test_train_init_with_resume_is_an_error(dense_run, capsys):
    assert main(["train", "--resume", str(dense_run), "--init", str(dense_run)]) == 2
    _one_error_line(capsys, "--init cannot be combined with --resume")


def test_train_init_of_an_moe_source_with_another_layout(dense_run, tmp_path, capsys):
    up = tmp_path / "up.safetensors"
    assert main(["upcycle", str(dense_run), str(up), "--experts", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--model", "switch_vit", "--experts", "4", "--epochs", "1",
                 "--out", str(tmp_path / "r"), *TINY_SETS, "--init", str(up)]) == 2
    _one_error_line(capsys, "--init", "MoE blocks [1] with experts [2] (SRC)")


def test_transformers_directory_as_source(dense_run, tmp_path, capsys):
    """A transformers ViT directory (vitmoe export --format hf) works as SRC of upcycle and train --init."""
    from vitmoe.models.upcycle import upcycled_config
    from vitmoe.training.checkpoints.warm_start import init_from

    hf = tmp_path / "hf"
    assert main(["export", str(dense_run), str(hf), "--format", "hf"]) == 0
    out = tmp_path / "up.safetensors"
    assert main(["upcycle", str(hf), str(out), "--experts", "4", "--layers", "all"]) == 0
    capsys.readouterr()
    dense = vitmoe.load_model(next(dense_run.glob("checkpoints/epoch-*/model.safetensors")))
    # the gray digits model was exported as the RGB reader transformers' pipeline feeds (rgb_input)
    from vitmoe.models.surgery import rgb_input

    got = vitmoe.load_model(out)
    meta = vitmoe.models.read_metadata(out)  # what predict and export need, from the directory's configs
    assert meta["classes"] == [str(i) for i in range(10)] and meta["preprocessing"]["channels"] == 3
    rgb_expected = vitmoe.upcycle(rgb_input(dense), moe_layers="all", num_experts=4)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), rgb_expected.state_dict().values()))
    # and --init of a gray run sums its RGB first layer back: the dense model's weights, to rounding
    expected = vitmoe.upcycle(dense, moe_layers="all", num_experts=4)
    model = VisionTransformer(upcycled_config(dense.config, moe_layers="all", num_experts=4))
    init_from(model, str(hf), log=lambda m: None)
    for (k, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7 if k == "patch_embed.proj.weight" else 0)


def test_init_of_a_dense_run_from_an_moe_file_merges_it(dense_run, tmp_path, capsys):
    """An MoE SRC for a dense run is merged: an untrained upcycled file gives back the dense weights;
    building models inside init does not move the global RNG."""
    from vitmoe.training.checkpoints.warm_start import init_from

    up = tmp_path / "up.safetensors"
    assert main(["upcycle", str(dense_run), str(up), "--experts", "4", "--router", "random"]) == 0
    capsys.readouterr()
    dense = vitmoe.load_model(next(dense_run.glob("checkpoints/epoch-*/model.safetensors")))
    model = VisionTransformer(dense.config)
    rng = torch.get_rng_state()
    notes = init_from(model, str(up), log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert any("merged" in n for n in notes)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("shape", [dict(share_blocks=True, moe_layers="all", num_experts=4),
                                   dict(depth=4, moe_layers=[1, 3], num_experts=[2, 4])])
def test_widenet_and_pyramid_upcycles_are_the_dense_model(shape):
    """A dense WideNet (blocks sharing one MLP) upcycles into one shared expert set; a pyramid gets
    its own expert count per block; both start as the dense model with top-2 routing."""
    torch.manual_seed(0)
    dense_fields = {k: v for k, v in shape.items() if k not in ("moe_layers", "num_experts")}
    dense = VisionTransformer(ViTConfig(**{**TINY, **dense_fields})).double()
    moe = vitmoe.upcycle(dense, moe_layers=shape["moe_layers"], num_experts=shape["num_experts"])
    if shape.get("share_blocks"):
        assert moe.blocks[0].mlp is moe.blocks[1].mlp
    _same_output(dense, moe)


def test_init_takes_the_sources_shape_unless_set(tmp_path, capsys):
    from vitmoe.cli.main import build_parser, main
    from vitmoe.cli.train import build_config

    src = tmp_path / "dense.safetensors"
    shape = dict(embed_dim=20, depth=3, num_heads=5, mlp_hidden=24, head="linear", pool="mean", norm_eps=1e-6)
    vitmoe.save_model(vitmoe.create_model("vit", img_size=8, in_chans=1, **shape), src)
    argv = ["train", "--dataset", "digits", "--model", "switch_vit", "--init", str(src), "--out", str(tmp_path / "r")]
    m = resolve(build_config(build_parser().parse_args(argv))).model
    assert {k: getattr(m, k) for k in shape} == shape  # not the switch_vit preset's d 300, 12 layers
    assert m.is_moe and m.num_experts == 32
    assert main([*argv, "--set", "model.depth=2"]) == 2  # an explicit field wins, and must fit SRC
    err = capsys.readouterr().err
    assert "--init" in err and "depth 3 (SRC) vs 2 (run)" in err
