"""The recipe files in configs/ reproduce the reference runs (switch-vit, ColossalAI ViT-MoE) and run."""
import json
from pathlib import Path

import pytest

from vitmoe.training.config import resolve

import vitmoe
from vitmoe.cli.main import build_parser, main
from vitmoe.cli.train import build_config
from vitmoe.training import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COLOSSAL = ("pr_moe_lite6_cifar10.yaml", "vit_lite7_cifar10.yaml", "widenet_tiny_cifar10.yaml")
TINY_SETS = ["--set", "model.embed_dim=16", "--set", "model.num_heads=2", "--set", "model.mlp_hidden=32",
             "--set", "log_every=0", "--set", "progress=false"]


def _config(*argv):
    return build_config(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("name, model", [("vit_cifar10.yaml", "vit"), ("switch_vit_cifar10.yaml", "switch_vit"),
                                         ("random_vit_cifar10.yaml", "random_vit")])
def test_source_recipes(name, model):
    cfg = _config("--config", str(CONFIGS / name))
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.weight_decay) == \
        (model, "cifar10", 350, 256, "adam", 2.5e-4, 1e-4)
    assert (cfg.schedule, cfg.augment, cfg.augment_policy, cfg.consistency_weight) == ("cosine", True, "none", 0.0)
    assert resolve(cfg).normalization == ((0.5,) * 3, (0.5,) * 3)  # the source's Normalize((0.5,), (0.5,))
    m = resolve(cfg).model
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_hidden, m.patch_size) == (300, 12, 12, 1024, 4)


@pytest.mark.parametrize("name", COLOSSAL)
def test_colossalai_recipes(name):
    cfg = _config("--config", str(CONFIGS / name))
    assert cfg.model == {"pr_moe_lite6_cifar10.yaml": "pr_moe_lite6", "vit_lite7_cifar10.yaml": "vit_lite7",
                         "widenet_tiny_cifar10.yaml": "widenet_tiny"}[name]
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.warmup_epochs) == ("cifar10", 200, 512, 40.0)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule) == ("adamw", 2e-3, 3e-2, "cosine")
    assert (cfg.grad_clip, cfg.label_smoothing, cfg.augment, cfg.augment_policy) == (1.0, 0.1, True, "autoaugment")
    assert resolve(cfg).normalization == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    m = resolve(cfg).model
    if m.moe_block_indices():
        # "aux-loss weight 0.01" on the balance loss: one weight per term, in the model's MoE settings.
        assert m.moe.balance_loss_weight == pytest.approx(0.01)
        assert m.moe.z_loss_weight == 0.0
        assert "aux_loss_weight" not in cfg.to_dict()
    if cfg.model == "pr_moe_lite6":
        assert (m.moe_block_indices(), m.experts_per_moe_block(), m.moe.residual) == ([1, 3, 5], [4, 4, 8], True)
        assert (m.embed_dim, m.depth, m.num_heads, m.mlp_hidden, m.pool, m.norm_eps) == (256, 6, 4, 512, "mean", 1e-6)


def test_pr_moe_recipe_smoke_run_on_digits(tmp_path):
    run = tmp_path / "pr"
    assert main(["train", "--config", str(CONFIGS / "pr_moe_lite6_cifar10.yaml"), "--dataset", "digits",
                 "--epochs", "1", "--batch", "512", "--out", str(run), "--set", "norm_mean=null",
                 "--set", "norm_std=null", *TINY_SETS]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert (s["model"], s["name"], s["experts"], s["augment_policy"]) == ("pr_moe_lite6", "pr-switch-vit", [4, 4, 8],
                                                                        "autoaugment")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["expert_load"]) == {"blocks.1.mlp.moe", "blocks.3.mlp.moe", "blocks.5.mlp.moe"}
    loaded = vitmoe.load_model(run / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert sum(p.numel() for p in loaded.parameters()) == s["params"]
    assert loaded.config.moe.residual and loaded.config.experts_per_moe_block() == [4, 4, 8]


def test_recipe_norm_needs_matching_channels():
    # The CIFAR normalisation cannot silently apply to a one-channel dataset.
    code = main(["train", "--config", str(CONFIGS / "pr_moe_lite6_cifar10.yaml"), "--dataset", "digits",
                 "--epochs", "1"])
    assert code == 2


# An old recipe put the source's "aux-loss weight" on TrainConfig (a second weight on the model's
# weighted total); it now lives in model.moe, one weight per term.
OLD_RECIPE = """\
model: pr_moe_lite6
dataset: cifar10
aux_loss_weight: {weight}
model_config:
  moe:
    balance_loss_weight: 0.02
"""


def test_old_recipe_with_aux_loss_weight_one_loads_and_ignores_it(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_RECIPE.format(weight=1.0))
    with pytest.warns(FutureWarning, match="aux_loss_weight is deprecated and ignored"):
        cfg = _config("--config", str(path))
    m = resolve(cfg).model
    assert (m.moe.balance_loss_weight, m.moe.z_loss_weight) == (0.02, model_preset_z("pr_moe_lite6"))
    assert "aux_loss_weight" not in cfg.to_dict()


def test_old_recipe_with_another_aux_loss_weight_folds_it_into_the_terms(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_RECIPE.format(weight=0.5))
    with pytest.warns(FutureWarning, match="folded"):
        cfg = _config("--config", str(path))
    m = resolve(cfg).model
    # balance: the recipe's 0.02 x 0.5; z: the preset's weight x 0.5 (the old total times 0.5).
    assert m.moe.balance_loss_weight == pytest.approx(0.01)
    assert m.moe.z_loss_weight == pytest.approx(0.5 * model_preset_z("pr_moe_lite6"))
    assert cfg.model_config["moe"]["balance_loss_weight"] == pytest.approx(0.01)
    # Saved runs keep the folded weights and no aux_loss_weight: resuming does not fold twice.
    resolve(cfg).save_yaml(tmp_path / "config.yaml")
    again = TrainConfig.from_yaml(tmp_path / "config.yaml").validate()
    assert resolve(again).model.moe == m.moe and "aux_loss_weight" not in again.to_dict()


@pytest.mark.parametrize("value", ["heavy", -1.0, float("nan")])
def test_bad_aux_loss_weight_is_named(value):
    with pytest.raises(vitmoe.ConfigError, match="aux_loss_weight"):
        TrainConfig.from_dict({"aux_loss_weight": value})


def model_preset_z(name):
    return vitmoe.models.model_config(name).moe.z_loss_weight


def test_the_moe_recipe_is_the_dense_recipe_with_experts_and_they_pair_as_twins(tmp_path):
    """fashion_mnist_moe.yaml starts from fashion_mnist.yaml (base:) and changes the model alone, so
    every training setting is the dense recipe's and `vitmoe report` judges one against the other;
    the packaged copy (what `pip install` ships) reads the same."""
    from importlib.resources import files

    from vitmoe.models import model_info
    from vitmoe.report.groups import Group
    from vitmoe.report.runs import RunResult
    from vitmoe.report.verdict import _training

    dense, moe = (TrainConfig.from_yaml(CONFIGS / "recipes" / f).validate()
                  for f in ("fashion_mnist.yaml", "fashion_mnist_moe.yaml"))
    d, m = dense.to_dict(), moe.to_dict()
    assert [k for k in d if d[k] != m[k]] == ["model_config"]
    assert moe.model_config == {**dense.model_config, "moe_layers": "last:1", "num_experts": 4,
                                "moe": {"router": "switch"}}
    mc = moe.checked_model
    assert (mc.moe_block_indices(), mc.num_experts, mc.moe.router, mc.attn_drop_rate) == ([1], 4, "switch", 0.0)
    assert (model_info(dense.checked_model).total_params, model_info(mc).total_params) == (280_651, 380_235)
    packaged = TrainConfig.from_yaml(files("vitmoe") / "recipes" / "fashion_mnist_moe.yaml").validate()
    assert packaged.to_dict() == m
    runs = [RunResult(path=tmp_path / n, name=n, config=c, model=c["model"], dataset=c["dataset"])
            for n, c in (("dense", d), ("moe", m))]
    assert _training(Group("dense", [runs[0]])) == _training(Group("moe", [runs[1]]))
