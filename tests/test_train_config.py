"""TrainConfig: validation returns a checked copy, checks every field the way the model configs do,
and old configs (aux_loss_weight, flat MoE names) still load."""
import math
import re
import warnings

import pytest
from conftest import TINY_MC

from vitmoe.training.config import resolve

from vitmoe.models import ConfigError
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.config.train_config import DATASET_NAMES, EVAL_MODES


def test_validate_returns_a_new_checked_object_and_leaves_the_input_alone():
    raw = TrainConfig(model="switch_vit", dataset="Fashion_MNIST", lr="1e-3", epochs="3", betas="[0.8, 0.9]",
                      grad_clip=0, norm_std=0.5, model_config={"depth": "2", "moe": {"top_k": "1"}})
    before = raw.to_dict()
    cfg = raw.validate()
    assert cfg is not raw and cfg.validated and not raw.validated
    assert raw.to_dict() == before  # nothing coerced in place
    assert (cfg.dataset, cfg.lr, cfg.epochs, cfg.betas, cfg.grad_clip, cfg.norm_std) == \
        ("fashion-mnist", 1e-3, 3, (0.8, 0.9), None, [0.5])
    assert cfg.model_config is not raw.model_config and cfg.model_config["moe"] is not raw.model_config["moe"]
    assert resolve(cfg).model.depth == 2
    # Validating again gives another copy; a changed copy (updated) must be validated again.
    again = cfg.validate()
    assert again is not cfg and again == cfg and again.validated
    changed = cfg.updated({"epochs": 5})
    assert not changed.validated and cfg.epochs == 3


def test_validate_puts_old_flat_model_names_in_the_nested_spelling():
    with pytest.warns(FutureWarning, match="moe.top_k"):
        cfg = TrainConfig(model="switch_vit", model_config={"router": "topk", "top_k": 2, "depth": 2}).validate()
    assert cfg.model_config == {"moe": {"router": "topk", "top_k": 2}, "depth": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the validated copy no longer warns each time it is resolved
        assert resolve(cfg).model.moe.top_k == 2 and resolve(cfg).label == "top2-vit"


def test_trainer_does_not_revalidate_a_validated_config(tmp_path, monkeypatch):
    cfg = TrainConfig(model="vit", dataset="digits", epochs=1, out=str(tmp_path / "run"),
                      model_config={k: v for k, v in TINY_MC.items() if k != "num_experts"}).validate()
    calls = []
    real = TrainConfig.validate
    monkeypatch.setattr(TrainConfig, "validate", lambda self: calls.append(1) or real(self))
    t = Trainer(cfg, log=lambda m: None)
    assert calls == [] and t.cfg is cfg
    # Without an out, the trainer names the run directory on its own copy, not on the caller's.
    cfg2 = real(TrainConfig(model="vit", dataset="digits", epochs=1))
    t2 = Trainer(cfg2, log=lambda m: None)
    assert calls == [] and cfg2.out is None and t2.cfg.out == str(t2.run_dir) and t2.cfg.validated
    # An unvalidated config is validated once, into the trainer's copy.
    raw = TrainConfig(model="vit", dataset="digits", epochs="1", out=str(tmp_path / "raw"))
    t3 = Trainer(raw, log=lambda m: None)
    assert calls == [1] and raw.epochs == "1" and t3.cfg.epochs == 1


@pytest.mark.parametrize("kw, needles", [
    (dict(lr=math.inf), ["lr", "finite"]),
    (dict(lr=".inf"), ["lr", "finite"]),
    (dict(lr="inf"), ["lr", "finite"]),
    (dict(lr=float("nan")), ["lr", "finite"]),
    (dict(weight_decay=-math.inf), ["weight_decay"]),
    (dict(threshold=float("nan")), ["threshold"]),
    (dict(epochs=True), ["epochs", "integer"]),
    (dict(batch_size=False), ["batch_size", "integer"]),
    (dict(seed=2**63), ["seed", str(2**63 - 1)]),
    (dict(seed=-1), ["seed"]),
    (dict(norm_mean=[math.inf]), ["norm_mean"]),
    (dict(betas=[0.9, math.nan]), ["betas"]),
    (dict(dataset="mnist"), ["dataset", "cifar10", "digits"]),
    (dict(eval_mode="average"), ["eval_mode", "merged"]),
    (dict(resume_schedule="cyclic"), ["resume_schedule", "stretch", "restart"]),
    (dict(model_config={"moe": {"top_k": "two"}}), ["moe.top_k"]),
])
def test_every_field_is_checked_like_the_model_configs(kw, needles):
    base = dict(model="switch_vit", dataset="digits", model_config=dict(TINY_MC))
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        TrainConfig(**base).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_one_list_of_datasets_and_eval_modes():
    from vitmoe.data import DATASETS
    from vitmoe.moe import EVAL_MODES as MOE_EVAL_MODES

    assert DATASET_NAMES == tuple(DATASETS) and EVAL_MODES is MOE_EVAL_MODES
    assert TrainConfig(dataset="CIFAR-10").validate().dataset == "cifar10"  # vitmoe.data's aliases


def test_a_run_saved_with_aux_loss_weight_one_resumes(tmp_path):
    from vitmoe.cli.main import build_parser
    from vitmoe.cli.train import build_config

    cfg = TrainConfig(model="switch_vit", dataset="digits", epochs=1, out=str(tmp_path / "run"),
                      model_config=dict(TINY_MC)).validate()
    run = tmp_path / "run"
    run.mkdir()
    resolve(cfg).save_yaml(run / "config.yaml")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("consistency_weight:", "aux_loss_weight: 1.0\nconsistency_weight:"))
    with pytest.warns(FutureWarning, match="aux_loss_weight"):
        resumed = build_config(build_parser().parse_args(["train", "--resume", str(run), "--epochs", "3"]))
    assert resumed.epochs == 3 and resolve(resumed).model == resolve(cfg).model


def test_a_training_run_builds_its_model_config_once(tmp_path, monkeypatch, digits):
    """`vitmoe train` resolves the run once: the model config validate() builds is the one the
    trainer, the loaders, the summary and the checkpoints read (counted at its one builder)."""
    import vitmoe.training.config.train_config as train_config
    from vitmoe.cli.main import main

    built = []
    real = train_config.resolve_model_config
    monkeypatch.setattr(train_config, "resolve_model_config", lambda cfg: built.append(cfg.model) or real(cfg))
    argv = ["train", "--dataset", "digits", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "run"),
            "--router", "topk", "--top-k", "2", "--set", "model.embed_dim=16", "--set", "model.depth=2",
            "--set", "model.num_heads=2", "--set", "model.mlp_hidden=32", "--set", "model.num_experts=4",
            "--set", "log_every=0", "--set", "progress=false"]
    assert main(argv) == 0
    assert built == ["switch_vit"]
    saved = resolve(TrainConfig.from_yaml(tmp_path / "run" / "config.yaml"))
    assert saved.model.moe.top_k == 2 and saved.label == "top2-vit" and len(built) == 2


def test_a_config_file_starts_from_its_base(tmp_path):
    """`base: OTHER.yaml` applies OTHER first (relative to the file), then the file; model_config
    merges key by key, so the variant keeps the base's model settings it does not name."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "dense.yaml").write_text(
        "model: cct_2_3x2\nmodel_config:\n  attn_drop_rate: 0.0\n  moe: {capacity_factor_eval: 2.0}\n"
        "lr: 2.0e-3\nbatch_size: 128\n")
    (tmp_path / "recipes" / "moe.yaml").write_text(
        "base: dense.yaml\nmodel_config:\n  moe_layers: all\n  num_experts: 4\n  moe: {router: topk}\nlr: 1.0e-3\n")
    (tmp_path / "moe2.yaml").write_text("base: recipes/moe.yaml\nbatch_size: 64\n")
    cfg = TrainConfig.from_yaml(tmp_path / "moe2.yaml")
    assert (cfg.model, cfg.lr, cfg.batch_size) == ("cct_2_3x2", 1.0e-3, 64)
    assert cfg.model_config == {"attn_drop_rate": 0.0, "moe_layers": "all", "num_experts": 4,
                                "moe": {"capacity_factor_eval": 2.0, "router": "topk"}}
    # The same as one file holding everything.
    flat = TrainConfig.from_dict(dict(model="cct_2_3x2", lr=1.0e-3, batch_size=64, model_config=cfg.model_config))
    assert cfg.validate().to_dict() == flat.validate().to_dict()
    # A passed-in base stays the lowest layer.
    under = TrainConfig.from_yaml(tmp_path / "moe2.yaml", TrainConfig(epochs=3, lr=5.0))
    assert (under.epochs, under.lr) == (3, 1.0e-3)


@pytest.mark.parametrize("files, needle", [
    ({"a.yaml": "base: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "base: missing.yaml\n"}, "missing.yaml (the base of config file"),
    ({"a.yaml": "base: 3\n"}, "base must be the path of another config file"),
    ({"a.yaml": "base: ''\n"}, "base must be the path of another config file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "- 1\n"}, "must hold a mapping"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "lrr: 1\n"}, "b.yaml, the base of"),
    ({"a.yaml": 'base: "b\\0c.yaml"\n'}, "base must be the path of another config file"),  # a NUL in it
    ({"a.yaml": "base: d\n", "d/x": ""}, "is a directory"),
    ({"a.yaml": "base: loop.yaml\n", "loop.yaml": "->loop.yaml"}, "cannot be followed"),
])
def test_a_bad_base_is_one_line_naming_the_file(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        if text.startswith("->"):
            (tmp_path / name).symlink_to(tmp_path / text[2:])
        else:
            (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        TrainConfig.from_yaml(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


def test_a_long_base_chain_is_refused(tmp_path):
    for i in range(12):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n")
    (tmp_path / "c12.yaml").write_text("lr: 1.0\n")
    with pytest.raises(ConfigError, match="more than 8 files in its base chain"):
        TrainConfig.from_yaml(tmp_path / "c0.yaml")
    with pytest.raises(ConfigError, match="more than 8 files"):
        TrainConfig.from_yaml(tmp_path / "c4.yaml")  # 9 files
    assert TrainConfig.from_yaml(tmp_path / "c5.yaml").lr == 1.0  # 8 files: allowed


def test_dot_dot_in_a_base_is_taken_as_written(tmp_path):
    """configs/recipes is a symlink into the package: `..` from a file there means configs/, as a
    user reads the path, not the package folder the link points into."""
    (tmp_path / "pkg" / "recipes").mkdir(parents=True)
    (tmp_path / "configs" / "studies").mkdir(parents=True)
    (tmp_path / "configs" / "recipes").symlink_to(tmp_path / "pkg" / "recipes")
    (tmp_path / "configs" / "studies" / "s.yaml").write_text("lr: 0.5\n")
    (tmp_path / "pkg" / "recipes" / "v.yaml").write_text("base: ../studies/s.yaml\nbatch_size: 7\n")
    cfg = TrainConfig.from_yaml(tmp_path / "configs" / "recipes" / "v.yaml")
    assert (cfg.lr, cfg.batch_size) == (0.5, 7)
