"""The training-recipe fields (mixing, EMA, expert averaging, freeze_unrouted): defaults, flags,
and bad values named before any data is loaded, from TrainConfig and from the command line."""
import math

import pytest

from vitmoe.training.config import resolve

from vitmoe.cli.main import build_parser, main
from vitmoe.cli.train import build_config
from vitmoe.models import ConfigError
from vitmoe.training import TrainConfig

SMALL = ["--dataset", "digits", "--model", "random_vit", "--dmodel", "16", "--heads", "2",
         "--set", "model.depth=2", "--set", "model.mlp_hidden=32", "--experts", "4"]


def _config(argv):
    return build_config(build_parser().parse_args(["train", *argv]))


def test_defaults_leave_the_recipe_as_it_was():
    cfg = TrainConfig(dataset="digits").validate()
    assert (cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob) == (0.0, 0.0, 1.0, 0.5)
    assert (cfg.ema_decay, cfg.merge_every, cfg.freeze_unrouted) == (0.0, 0, False)


def test_flags_and_sets_reach_the_fields():
    cfg = _config([*SMALL, "--mixup", "0.8", "--cutmix", "1", "--ema-decay", "0.999", "--merge-every", "50",
                   "--freeze-unrouted", "--set", "mix_prob=0.5", "--set", "mix_switch_prob=0.25"])
    assert (cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob) == (0.8, 1.0, 0.5, 0.25)
    assert (cfg.ema_decay, cfg.merge_every, cfg.freeze_unrouted) == (0.999, 50, True)


@pytest.mark.parametrize("kw, needles", [
    (dict(mixup_alpha=-0.1), ["mixup_alpha", ">= 0"]),
    (dict(cutmix_alpha=math.inf), ["cutmix_alpha", "finite"]),
    (dict(mix_prob=1.5), ["mix_prob", "[0.0, 1.0]"]),
    (dict(mix_switch_prob=-1), ["mix_switch_prob", "[0.0, 1.0]"]),
    (dict(mixup_alpha=True), ["mixup_alpha", "number"]),
    (dict(ema_decay=1), ["ema_decay", "[0.0, 1.0)"]),
    (dict(merge_every=-3), ["merge_every", ">= 0"]),
    (dict(merge_every=5, model="switch_vit"), ["merge_every", "random"]),
    (dict(freeze_unrouted=1.5), ["freeze_unrouted", "true or false"]),
    (dict(freeze_unrouted=True, model="vit"), ["freeze_unrouted", "dense"]),
])
def test_bad_values_name_the_field(kw, needles):
    base = dict(model="random_vit", dataset="digits")
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        TrainConfig(**base).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)


@pytest.mark.parametrize("argv, needles", [
    (["--mixup", "-1"], ["mixup_alpha", ">= 0"]),
    (["--cutmix", "nan"], ["cutmix_alpha", "finite"]),
    (["--ema-decay", "1.5"], ["ema_decay", "[0.0, 1.0)"]),
    (["--merge-every", "-2"], ["merge_every", ">= 0"]),
    (["--set", "mix_prob=2"], ["mix_prob"]),
    (["--noswitch", "--freeze-unrouted"], ["freeze_unrouted", "dense"]),
    (["--model", "switch_vit", "--merge-every", "10"], ["merge_every", "router 'switch'"]),
])
def test_bad_flags_fail_with_one_line_before_training(argv, needles, capsys, no_data, tmp_path):
    code = main(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--dmodel", "16", "--heads", "2",
                 "--set", "model.depth=1", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("vitmoe: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("vitmoe: error: "), err
    assert all(n in lines[0] for n in needles), err
    assert not (tmp_path / "r").exists()


def test_flags_that_take_a_number_refuse_words(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--merge-every", "often"])
    assert e.value.code == 2 and "--merge-every" in capsys.readouterr().err


def test_resume_may_turn_on_ema_but_not_change_mixing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    resolve(TrainConfig(**{"model": "random_vit", "dataset": "digits", "out": str(run)})).save_yaml(
        run / "config.yaml")
    assert _config(["--resume", str(run), "--ema-decay", "0.99"]).ema_decay == 0.99
    with pytest.raises(Exception, match="mixup_alpha"):
        _config(["--resume", str(run), "--mixup", "0.2"])
