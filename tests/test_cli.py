"""The vitmoe command line: source flags, validation before training, info, train/eval/merge round trip."""
import json
from pathlib import Path

import pytest
from conftest import TINY_SETS

from vitmoe.training.config import TrainConfig, resolve
import torch

import vitmoe
from vitmoe.cli.main import build_parser, main
from vitmoe.cli.train import build_config

README_SWITCH = ("--batch 256 --experts 64 --epochs 500 --gpu 4 --dmodel 300 "
                 "--out vit_model_rtx_4_dmodel_300_experts_64_batch_256_cifar10").split()
README_DENSE = ("--batch 256 --experts 64 --epochs 500 --gpu 4 --dmodel 300 --noswitch "
                "--out vit_noswitch_model_rtx_4_dmodel_300_batch_256_cifar10").split()


def _config(argv):
    return build_config(build_parser().parse_args(["train", *argv]))


def test_readme_command_lines_resolve_like_the_source():
    cfg = _config(README_SWITCH)
    m = resolve(cfg).model
    assert (cfg.batch_size, cfg.epochs, cfg.nproc, cfg.model, cfg.dataset) == (256, 500, 4, "switch_vit", "cifar10")
    assert cfg.out == "vit_model_rtx_4_dmodel_300_experts_64_batch_256_cifar10"
    assert (m.embed_dim, m.num_experts, m.moe.router, m.moe_block_indices()) == (300, 64, "switch", list(range(12)))
    assert (m.img_size, m.num_classes, m.patch_size) == (32, 10, 4)

    cfg = _config(README_DENSE)
    m = resolve(cfg).model
    assert (cfg.batch_size, cfg.epochs, cfg.nproc, cfg.model, cfg.dataset) == (256, 500, 4, "vit", "cifar10")
    assert cfg.out == "vit_noswitch_model_rtx_4_dmodel_300_batch_256_cifar10"
    assert m.embed_dim == 300 and m.moe_block_indices() == []

    assert resolve(_config(["--cifar100"])).model.num_classes == 100


def test_precedence_config_flags_set(tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text("epochs: 7\nlr: 1e-3\nbatch_size: 64\nmodel_config:\n  depth: 3\n  embed_dim: 48\n  num_heads: 4\n")
    cfg = _config(["--config", str(conf), "--epochs", "9", "--set", "model.depth=5", "--dataset", "digits"])
    m = resolve(cfg).model
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (9, 1e-3, 64)
    assert (m.depth, m.embed_dim, m.img_size, m.in_chans) == (5, 48, 8, 1)
    assert _config(["--lr", "0.1", "--set", "lr=0.2"]).lr == 0.2


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        _config(["--config", str(f)])


@pytest.mark.parametrize("argv, needles", [
    (["--router", "nope"], ["--router", "switch"]),
    (["--dataset", "imagenet"], ["--dataset", "digits"]),
    (["--amp", "fp8"], ["--amp", "bf16"]),
    (["--epochs", "x"], ["--epochs"]),
])
def test_bad_flags_rejected_by_argparse(argv, needles, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err


@pytest.mark.parametrize("argv, needles", [
    (["--set", "model.depth=-1"], ["depth", "an integer in [1, "]),
    (["--set", "lr=abc"], ["lr", "number"]),
    (["--set", "optimizer=sgd"], ["optimizer", "adam", "adamw"]),
    (["--set", "nope=1"], ["nope", "allowed"]),
    (["--set", "model.nope=1"], ["nope", "model field"]),
    (["--epochs", "0"], ["epochs", ">= 1"]),
    (["--dmodel", "110"], ["embed_dim=110", "--heads"]),  # 110 does not keep switch_vit's head width 25
    (["--dmodel", "96", "--heads", "5"], ["num_heads", "embed_dim"]),
    (["--experts", "0"], ["num_experts", ">= 1"]),
    (["--router", "topk", "--top-k", "40"], ["top_k"]),
    (["--set", "model.patch_size=3"], ["patch_size", "img_size"]),
    (["--noswitch", "--router", "topk"], ["--router", "dense"]),
    (["--cifar100", "--dataset", "digits"], ["--cifar100"]),
    (["--config", "/nonexistent/run.yaml"], ["run.yaml"]),
    (["--amp", "fp16", "--device", "cpu"], ["fp16"]),
])
def test_bad_values_fail_before_training(argv, needles, capsys, no_data, tmp_path):
    code = main(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), *argv]
                if "--dataset" not in argv and "--cifar100" not in argv else ["train", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    # (the default switch_vit on digits also gets a one-line size warning first)
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("vitmoe: warning: "))
    assert err.startswith("vitmoe: error: ") and "Traceback" not in err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "r").exists()


def test_info_vit_prints_dense_count(capsys):
    assert main(["info", "vit"]) == 0
    assert "12,727,990" in capsys.readouterr().out
    assert main(["info", "random_vit", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["merged_params"] == 12_727_990 and info["total_params"] > info["merged_params"]
    assert main(["info", "switch_vit", "--set", "num_experts=64"]) == 0
    assert main(["info", "vit", "--set", "depth=0"]) == 2
    assert "depth" in capsys.readouterr().err


def _eval_json(argv, capsys):
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_merge_eval_roundtrip(tmp_path, capsys):
    run = tmp_path / "rv"
    assert main(["train", "--model", "random_vit", "--dataset", "digits", "--epochs", "2", "--batch", "128",
                 "--lr", "2e-3", "--out", str(run), *TINY_SETS]) == 0
    capsys.readouterr()
    moe = _eval_json([str(run)], capsys)
    assert moe["mode"] == "merged" and moe["images"] == 359
    merged_file = tmp_path / "merged.safetensors"
    assert main(["merge", str(run), str(merged_file)]) == 0
    capsys.readouterr()
    dense = _eval_json([str(merged_file)], capsys)
    assert dense["test_acc"] == moe["test_acc"]
    assert dense["test_loss"] == pytest.approx(moe["test_loss"], rel=1e-4, abs=1e-5)
    assert dense["params"] == vitmoe.model_info(vitmoe.load_model(merged_file).config).merged_params

    plain = vitmoe.load_model(merged_file)
    assert not list(plain.moe_modules())
    same = vitmoe.create_model("vit", checkpoint=str(merged_file), img_size=8, in_chans=1, embed_dim=16, depth=2,
                               num_heads=2, mlp_hidden=32, head="linear")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(plain.eval()(x), same.eval()(x))
    # Other eval modes of the MoE run still work.
    assert _eval_json([str(run), "--mode", "ensemble"], capsys)["mode"] == "ensemble"


def test_train_writes_run_dir_and_learns(tmp_path, capsys):
    run = tmp_path / "vit"
    assert main(["train", "--noswitch", "--dataset", "digits", "--epochs", "5", "--batch", "16", "--lr", "3e-3",
                 "--out", str(run), "--set", "optimizer=adamw", "--set", "weight_decay=0.05", "--set", "augment=false",
                 "--set", "warmup_epochs=1", "--set", "model_config.pool=mean",
                 "--set", "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
                 "--set", "model.mlp_hidden=64", "--set", "model.head=linear", "--set", "threshold=50"]) == 0
    out = capsys.readouterr().out
    assert "epoch 5/5" in out
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == "vit" and cfg["epochs"] == 5 and cfg["model_config"]["embed_dim"] == 32
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
                "images_per_s", "aux_loss", "aux_terms", "expert_load", "dropped_frac", "router_entropy"):
        assert key in rows[0], key
    s = json.loads((run / "summary.json").read_text())
    for key in ("name", "model", "experts", "params", "active_params", "best_acc", "best_epoch", "threshold",
                "epochs_to_threshold", "train_time_s", "time_per_epoch_s", "train_time_60k_s",
                "inference_time_60k_s", "epochs", "dataset"):
        assert key in s, key
    assert (s["name"], s["experts"], s["epochs"], s["dataset"]) == ("vit", None, 5, "digits")
    assert s["best_acc"] > 50.0, rows  # chance is 10 %
    assert s["epochs_to_threshold"] == next(r["epoch"] for r in rows if r["test_acc"] >= s["threshold"])
    from vitmoe.training import latest_checkpoint

    model = vitmoe.load_model(latest_checkpoint(run) / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == s["params"]

    # Resume: raising --epochs continues; structural changes are refused.
    assert main(["train", "--resume", str(run), "--epochs", "6"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    assert "lr" in capsys.readouterr().err
    # A fresh run into a used directory is refused.
    assert main(["train", "--noswitch", "--dataset", "digits", "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_nan_exit_code(tmp_path, capsys):
    run = tmp_path / "nan"
    code = main(["train", "--noswitch", "--dataset", "digits", "--epochs", "2", "--batch", "128", "--lr", "1e30",
                 "--out", str(run), *TINY_SETS])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite loss" in err and "step" in err and "epoch 1" in err


def test_report_command(tmp_path, capsys):
    run = tmp_path / "sw"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch", "256", "--experts", "4",
                 "--out", str(run), *TINY_SETS]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "switch-vit" in out and (tmp_path / "rep" / "results.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_module_entry_point_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vitmoe", "train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--gpu", "--epochs", "--experts", "--batch", "--noswitch", "--cifar100", "--out", "--dmodel",
                 "--model", "--router", "--top-k", "--dataset", "--data-dir", "--config", "--set", "--lr", "--seed",
                 "--resume", "--amp", "--compile", "--eval-mode", "--augment-policy", "--consistency-weight",
                 "--time-budget"):
        assert flag in r.stdout, flag


@pytest.mark.slow
def test_multiprocess_cpu_training(tmp_path, capsys):
    """--gpu 2 on a CPU machine: two gloo worker processes, DistributedDataParallel, one run directory."""
    run = tmp_path / "ddp"
    assert main(["train", "--gpu", "2", "--dataset", "digits", "--epochs", "1", "--batch", "128", "--experts", "4",
                 "--out", str(run), *TINY_SETS]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["epochs"] == 1 and s["experts"] == 4
    row = json.loads((run / "metrics.jsonl").read_text())
    assert sum(sum(v) for v in row["expert_load"].values()) > 0
    loaded = vitmoe.load_model(tmp_path / "ddp" / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert sum(p.numel() for p in loaded.parameters()) == s["params"]
    assert loaded.blocks[0].mlp.experts.w1.shape[0] == 4  # every expert, gathered from both ranks


def test_training_option_flags_resolve(tmp_path):
    cfg = _config(["--model", "random_vit", "--augment-policy", "autoaugment", "--consistency-weight", "1",
                   "--time-budget", "30", "--set", "consistency_stopgrad=false"])
    assert (cfg.augment_policy, cfg.consistency_weight, cfg.time_budget_s, cfg.consistency_stopgrad) == \
        ("autoaugment", 1.0, 30.0, False)
    assert cfg.forwards_per_step == 2 and resolve(cfg).label == "random-vit+cr"


def test_a_field_named_as_a_negation_gets_a_positive_flag_not_a_double_negative():
    assert _config(["--no-decay-1d"]).no_decay_1d is True
    assert _config(["--decay-1d"]).no_decay_1d is False
    assert _config([]).no_decay_1d is TrainConfig().no_decay_1d
    with pytest.raises(SystemExit):
        _config(["--no-no-decay-1d"])


@pytest.mark.parametrize("argv, needles", [
    (["--consistency-weight", "1"], ["consistency_weight", "switch_vit", "random"]),
    (["--noswitch", "--consistency-weight", "1"], ["consistency_weight", "dense"]),
    (["--augment-policy", "autoaugment", "--set", "augment=false"], ["augment_policy", "augment=false"]),
    (["--time-budget", "-5"], ["time_budget_s"]),
])
def test_training_option_bad_values_fail_before_training(argv, needles, capsys, no_data, tmp_path):
    code = main(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("vitmoe: error: ") and all(n in err for n in needles), err
    assert not (tmp_path / "r").exists()


def test_train_with_consistency_logs_it(tmp_path, capsys):
    run = tmp_path / "cr"
    assert main(["train", "--model", "random_vit", "--dataset", "digits", "--epochs", "1", "--batch", "256",
                 "--consistency-weight", "1", "--out", str(run), *TINY_SETS]) == 0
    out = capsys.readouterr().out
    assert "consistency" in out and "2 forwards/step" in out
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["forwards_per_step"] == 2 and row["consistency_loss"] >= 0


def test_demo_time_budget_comparison(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["demo", "--time-budget", "0.3", "--models", "vit", "random_vit_cr", "pr_moe_lite6",
                 "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "| model | dataset | experts |" in text  # the report table
    assert "What each family did with 0.3s of training" in text and "| random_vit_cr | random-vit+cr |" in text
    for fam in ("vit", "random_vit_cr", "pr_moe_lite6"):
        s = json.loads((out / fam / "summary.json").read_text())
        assert s["time_budget_s"] == 0.3 and s["dataset"] == "digits"
        assert s["epochs"] < 1000 and s["stopped_by_budget"] is True
    assert (out / "report" / "results.md").is_file() and (out / "report" / "cost.md").is_file()
    # The default demo is unchanged: three source models, 20 epochs, digits.
    args = build_parser().parse_args(["demo"])
    assert (args.dataset, args.time_budget, args.models, args.epochs) == ("digits", None, None, None)


def test_demo_with_a_recipe_trains_the_recipe_and_its_moe_variants(monkeypatch, tmp_path):
    from vitmoe.cli import demo

    m, cfgs = demo.recipe_configs("fashion-mnist", tmp_path, None, None, seed=3)
    assert m == ["cct_2_3x2", "cct_2_3x2_switch", "cct_2_3x2_random"]
    assert all((c.time_budget_s, c.amp, c.seed, c.batch_size) == (600.0, "auto", 3, 128) for c in cfgs)
    assert all(c.model_config == {"attn_drop_rate": 0.0} for c in cfgs)  # the MoE variants train as the recipe does
    assert [c.out for c in cfgs] == [str(tmp_path / n) for n in m]
    assert demo.recipe_path("digits") is None
    seen = []
    monkeypatch.setattr(demo, "run_recipe", lambda args: seen.append(args.dataset) or 0)
    assert main(["demo", "--dataset", "fashion-mnist", "--out", str(tmp_path / "d")]) == 0
    assert seen == ["fashion-mnist"]
