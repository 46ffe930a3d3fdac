"""TrainConfig options: augmentation policy, normalisation override, time budget."""
import json

import pytest
from conftest import TINY_MC

from vitmoe.training.config import resolve
import torch

import vitmoe
from vitmoe.models import ConfigError
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint
from vitmoe.training.loop.schedule import lr_factor


def _cfg(tmp_path, name="run", **kw):
    base = dict(model="switch_vit", dataset="digits", epochs=2, batch_size=128, lr=2e-3, optimizer="adamw",
                model_config=dict(TINY_MC), out=str(tmp_path / name), log_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw, needles", [
    (dict(augment_policy="cutmix"), ["augment_policy", "autoaugment", "randaugment"]),
    (dict(augment_policy="autoaugment", augment=False), ["augment_policy", "augment=false"]),
    (dict(norm_std=[0.5, 0.5]), ["norm_std", "1 positive number"]),
    (dict(norm_std=[0.0]), ["norm_std", "positive"]),
    (dict(norm_mean="abc"), ["norm_mean"]),
    (dict(time_budget_s=0), ["time_budget_s", "> 0"]),
    (dict(time_budget_s="soon"), ["time_budget_s"]),
])
def test_option_validation(tmp_path, kw, needles):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **kw).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_normalization_override_and_policy_reach_the_loaders(tmp_path, digits):
    cfg = _cfg(tmp_path, augment_policy="RandAugment", norm_mean=0.5, norm_std="[0.25]").validate()
    assert (cfg.augment_policy, cfg.norm_mean, cfg.norm_std) == ("randaugment", [0.5], [0.25])
    assert resolve(cfg).normalization == ((0.5,), (0.25,))
    cifar = TrainConfig(dataset="cifar10", norm_std=0.5).validate()
    assert cifar.norm_std == [0.5, 0.5, 0.5] and resolve(cifar).normalization[0] == (0.4914, 0.4822, 0.4465)
    t = Trainer(cfg, log=lambda m: None, train_data=digits[0], test_data=digits[1])
    t.setup()
    assert t.train_loader.augment_policy == "randaugment" and t.test_loader.augment_policy == "none"
    for loader in (t.train_loader, t.test_loader):
        assert (loader.mean, loader.std) == ((0.5,), (0.25,))
        assert loader.info == digits[0].info  # the dataset's description is not rewritten
    x, _ = next(iter(t.test_loader))
    raw = digits[1].images[: x.shape[0]].float() / 255.0
    torch.testing.assert_close(x, (raw - 0.5) / 0.25)
    # The default keeps the dataset's statistics.
    t2 = Trainer(_cfg(tmp_path, "plain"), log=lambda m: None, train_data=digits[0], test_data=digits[1])
    t2.setup()
    assert t2.train_loader.std == digits[0].info.std and t2.train_loader.augment_policy == "none"


def test_normalization_is_recorded_for_eval(tmp_path, digits):
    from vitmoe.cli.eval import evaluate_checkpoint

    cfg = _cfg(tmp_path, epochs=1, norm_mean=[0.5], norm_std=[0.5], augment_policy="autoaugment")
    res = Trainer(cfg, log=lambda m: None, train_data=digits[0], test_data=digits[1]).fit()
    ck = latest_checkpoint(tmp_path / "run") / "model.safetensors"
    assert vitmoe.models.read_metadata(ck)["normalization"] == {"mean": [0.5], "std": [0.5]}
    ev = evaluate_checkpoint(str(tmp_path / "run"), device="cpu")
    assert ev["test_acc"] == res.history[-1]["test_acc"]
    assert res.summary["augment_policy"] == "autoaugment"


def test_time_budget_ends_the_epoch_early_and_stops(tmp_path, digits):
    cfg = _cfg(tmp_path, epochs=50, batch_size=64, time_budget_s=1e-9)  # used up by the first step
    res = Trainer(cfg, log=lambda m: None, train_data=digits[0], test_data=digits[1]).fit()
    assert len(res.history) == 1
    row = res.history[0]
    assert row["partial_epoch"] is True and row["steps_in_epoch"] == 1 and row["step"] == 1
    assert 0.0 <= row["test_acc"] <= 100.0 and row["test_loss"] > 0  # the partial epoch was evaluated
    s = res.summary
    assert s["stopped_by_budget"] is True and s["time_budget_s"] == 1e-9 and s["epochs"] == 1
    assert s["steps"] == 1 and s["epochs_planned"] == 50
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["stopped_by_budget"] is True
    assert latest_checkpoint(tmp_path / "run").name == "epoch-0001"
    # Resuming with the budget used up trains nothing more; a larger budget continues.
    again = Trainer(_cfg(tmp_path, epochs=50, batch_size=64, time_budget_s=1e-9), resume=True, log=lambda m: None,
                    train_data=digits[0], test_data=digits[1]).fit()
    assert len(again.history) == 1 and again.summary["stopped_by_budget"] is True
    more = Trainer(_cfg(tmp_path, epochs=2, batch_size=64, time_budget_s=3600), resume=True, log=lambda m: None,
                   train_data=digits[0], test_data=digits[1]).fit()
    assert [r["epoch"] for r in more.history] == [1, 2] and more.history[1]["partial_epoch"] is False
    assert more.summary["stopped_by_budget"] is False


def test_lr_schedule_follows_the_budget():
    # Step progress 10 %, budget 50 % used: the cosine sits at its midpoint.
    assert lr_factor(100, 1000, 0, "cosine", 0.0, min_progress=0.5) == pytest.approx(0.5)
    assert lr_factor(100, 1000, 0, "cosine", 0.0, min_progress=1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 1000, 0, "cosine", 0.0) == lr_factor(100, 1000, 0, "cosine", 0.0, min_progress=0.05)
    assert lr_factor(5, 1000, 10, "cosine", 0.0, min_progress=0.9) == pytest.approx(6 / 11)  # warm-up in steps
    assert lr_factor(100, 1000, 0, "constant", 0.0, min_progress=0.9) == 1.0


def test_a_new_train_config_field_becomes_a_train_flag_without_editing_the_cli(monkeypatch):
    """The `vitmoe train` flags are made from the TrainConfig fields: a field added to the config
    (here in a subclass standing for an edit of train_config.py) is a flag, with its docstring's
    first sentence and its default in --help, and reaches the config when given."""
    import dataclasses

    import vitmoe.training.config.train_config as train_config
    from vitmoe.cli.main import build_parser
    from vitmoe.cli.train import flag_overrides

    @dataclasses.dataclass
    class Extended(train_config.TrainConfig):
        # --- optimisation ---
        warmup_power: float = 1.0
        """Exponent of the warm-up ramp. A second sentence that --help leaves out."""

    monkeypatch.setattr(train_config, "TrainConfig", Extended)
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    assert "--warmup-power WARMUP_POWER Exponent of the warm-up ramp (default 1)" in text
    assert "second sentence" not in text
    args = parser.parse_args(["train", "--warmup-power", "2.5", "--lr", "0.01"])
    assert flag_overrides(args) == {"warmup_power": 2.5, "lr": 0.01}
    assert flag_overrides(parser.parse_args(["train"])) == {}
