"""The weights' EMA: the update by hand, merged evaluation of the copy, checkpoints, exact resume."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from conftest import TINY_MC

import vitmoe
from vitmoe.models import ConfigError, merge_experts
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints import checkpoint as ckpt
from vitmoe.training.checkpoints.checkpoint import checkpoint_problem, latest_checkpoint, load_state
from vitmoe.training.recipe.ema import ModelEMA


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.register_buffer("seen", torch.zeros(()))


def test_ema_update_equals_a_hand_computation_over_three_steps():
    m = _Tiny()
    with torch.no_grad():
        m.fc.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.fc.bias.fill_(0.0)
    ema = ModelEMA(m, decay=0.5)
    assert not any(p.requires_grad for p in ema.module.parameters())
    # ema <- 0.5 ema + 0.5 w:  (1, 2) -> (2, 2) -> (3.5, 4) -> (1.25, 2);  bias 0 -> 2 -> 1 -> 2.5
    for w, b, seen in (((3.0, 2.0), 4.0, 1.0), ((5.0, 6.0), 0.0, 2.0), ((-1.0, 0.0), 4.0, 3.0)):
        with torch.no_grad():
            m.fc.weight.copy_(torch.tensor([w]))
            m.fc.bias.fill_(b)
            m.seen.fill_(seen)
        ema.update()
    assert ema.module.fc.weight.tolist() == [[1.25, 2.0]]
    assert ema.module.fc.bias.tolist() == [2.5]
    assert float(ema.module.seen) == 3.0 and ema.updates == 3  # buffers are copied, not averaged
    # Any decay: the same recurrence in float64 by hand.
    torch.manual_seed(0)
    m2 = _Tiny()
    ema2 = ModelEMA(m2, decay=0.9)
    hand = m2.fc.weight.detach().double().clone()
    for _ in range(3):
        with torch.no_grad():
            m2.fc.weight.add_(torch.randn(1, 2))
        ema2.update()
        hand = 0.9 * hand + 0.1 * m2.fc.weight.detach().double()
    torch.testing.assert_close(ema2.module.fc.weight.double(), hand, rtol=0, atol=1e-6)


def test_merged_evaluation_of_the_ema_equals_merging_the_ema_weights():
    torch.manual_seed(0)
    model = vitmoe.create_model("random_vit", img_size=8, in_chans=1, moe={"expert_init": "independent"}, **TINY_MC)
    ema = ModelEMA(model, decay=0.5)
    x = torch.randn(5, 1, 8, 8)

    def perturb():
        with torch.no_grad():
            for _, m in model.moe_modules():
                for p in (m.experts.w1, m.experts.b1, m.experts.w2, m.experts.b2):
                    p.add_(0.1 * torch.randn_like(p))

    perturb()
    ema.update()
    assert ema.module.config.moe.eval_mode == "merged" and not ema.module.training
    first = ema.module(x)  # fills the layers' merged-weight cache
    perturb()
    ema.update()  # in-place updates must invalidate that cache
    out = ema.module(x)
    assert not torch.allclose(out, first)
    dense = merge_experts(ema.module).eval()
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)
    model.eval()
    assert not torch.allclose(model(x), out)  # the EMA is not the model


def _cfg(tmp_path, name, **kw):
    base = dict(model="random_vit", dataset="digits", epochs=2, batch_size=128, lr=2e-3, optimizer="adamw",
                weight_decay=0.05, model_config=dict(TINY_MC, expert_init="independent"), out=str(tmp_path / name),
                log_every=5, progress=False, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _files(run_dir, name):
    return load_file(str(latest_checkpoint(run_dir) / name))


def test_ema_resumes_bit_exactly_and_does_not_change_training(tmp_path, kill_after_epoch, digits512):
    tr, te = digits512
    quiet = dict(log=lambda m: None, train_data=tr, test_data=te)
    full = Trainer(_cfg(tmp_path, "full"), **quiet).fit()
    kill_after_epoch(Trainer(_cfg(tmp_path, "killed"), **quiet))
    resumed = Trainer(_cfg(tmp_path, "killed"), resume=True, **quiet).fit()

    for name in ("ema.safetensors", "model.safetensors"):
        a, b = _files(tmp_path / "full", name), _files(tmp_path / "killed", name)
        assert a.keys() == b.keys() and any(".experts." in k for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    state = load_state(latest_checkpoint(tmp_path / "killed"))  # weights_only: plain data
    assert state["ema"] == {"decay": 0.9, "updates": 8}
    keys = ("test_acc", "ema_test_acc", "ema_test_loss")
    assert [[r[k] for k in keys] for r in full.history] == [[r[k] for k in keys] for r in resumed.history]

    ema, model = _files(tmp_path / "full", "ema.safetensors"), _files(tmp_path / "full", "model.safetensors")
    assert not torch.equal(ema["blocks.0.mlp.experts.w1"], model["blocks.0.mlp.experts.w1"])
    loaded = vitmoe.load_model(latest_checkpoint(tmp_path / "full") / "ema.safetensors")  # a model file
    assert torch.equal(loaded.state_dict()["head.0.weight"], ema["head.0.weight"])
    # The EMA only watches: the model trains exactly as without it.
    Trainer(_cfg(tmp_path, "off", ema_decay=0.0), **quiet).fit()
    off = _files(tmp_path / "off", "model.safetensors")
    assert all(torch.equal(off[k], model[k]) for k in model)
    assert not (latest_checkpoint(tmp_path / "off") / "ema.safetensors").exists()

    s = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s["best_acc"] == max(s["model_best_acc"], s["ema_best_acc"])
    assert s["best_model"] == ("ema" if s["ema_best_acc"] > s["model_best_acc"] else "model")
    assert s["ema_decay"] == 0.9 and s["best_epoch"] in (1, 2)
    best = (tmp_path / "full" / "checkpoints" / "best").read_text().strip()
    assert best == f"epoch-{s['best_epoch']:04d}"


def test_a_checkpoint_without_ema_resumes_with_ema_turned_on(tmp_path, digits512):
    tr, te = digits512
    logs = []
    Trainer(_cfg(tmp_path, "old", epochs=1, ema_decay=0.0), log=lambda m: None, train_data=tr, test_data=te).fit()
    r = Trainer(_cfg(tmp_path, "old", ema_decay=0.99), resume=True, log=logs.append, train_data=tr, test_data=te).fit()
    assert any("holds no EMA" in line for line in logs)
    assert "ema_test_acc" not in r.history[0] and r.history[1]["ema_test_acc"] is not None
    assert (latest_checkpoint(tmp_path / "old") / "ema.safetensors").is_file()
    assert r.summary["ema_best_epoch"] == 2


def test_a_damaged_or_missing_ema_file_fails_verification(tmp_path):
    model = vitmoe.create_model("random_vit", img_size=8, in_chans=1, **TINY_MC)
    ema = ModelEMA(model, 0.9)
    state = {"epoch": 1, "step": 1, "best_acc": 0.0, "best_epoch": 1, "optimizer": {}, "scheduler": {}, "rng": {}}
    d = ckpt.save_checkpoint(tmp_path, 1, model, state,
                             extra_models={"ema.safetensors": (ema.module, ema.module.state_dict(), {})})
    assert checkpoint_problem(d) is None
    assert "ema.safetensors" in json.loads((d / "manifest.json").read_text())["files"]
    raw = bytearray((d / "ema.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "ema.safetensors").write_bytes(bytes(raw))
    assert "ema.safetensors" in checkpoint_problem(d) and "sha256" in checkpoint_problem(d)
    assert checkpoint_problem(d, files=("model.safetensors",)) is None  # eval/merge read the model alone
    (d / "ema.safetensors").unlink()
    assert "ema.safetensors is missing" in checkpoint_problem(d)
    with pytest.raises(ValueError, match="optional"):
        ckpt.save_checkpoint(tmp_path, 2, model, state, extra_models={"x.safetensors": (model, None, {})})


@pytest.mark.parametrize("value, needle", [(1.0, "[0.0, 1.0)"), (-0.1, "[0.0, 1.0)"), ("often", "number")])
def test_ema_decay_validation(tmp_path, value, needle):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "bad", ema_decay=value).validate()
    assert "ema_decay" in str(e.value) and needle in str(e.value), str(e.value)


def test_eval_merge_and_analyze_read_the_ema_with_ema_flag(tmp_path, digits512, capsys):
    from vitmoe.cli.main import main
    from vitmoe.training.checkpoints.checkpoint import CheckpointError, resolve_model_file

    tr, te = digits512  # te is the whole digits test split, what `vitmoe eval` reads for the run
    quiet = dict(log=lambda m: None, train_data=tr, test_data=te)
    run = tmp_path / "run"
    r = Trainer(_cfg(tmp_path, "run"), **quiet).fit()
    last = latest_checkpoint(run)
    assert resolve_model_file(run, weights="ema") == last / "ema.safetensors"
    best = run / "checkpoints" / (run / "checkpoints" / "best").read_text().strip()
    assert resolve_model_file(run, which="best", weights="ema") == best / "ema.safetensors"

    def ev(*flags):
        capsys.readouterr()
        assert main(["eval", str(run), "--json", "--device", "cpu", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    ema, raw = ev("--ema"), ev()
    assert ema["test_acc"] == pytest.approx(r.history[-1]["ema_test_acc"], abs=1e-9)
    assert raw["test_acc"] == pytest.approx(r.history[-1]["test_acc"], abs=1e-9)
    # Two files, not one read twice (their accuracies may coincide on 360 test images).
    assert (ema["checkpoint"], raw["checkpoint"]) == (str(last / "ema.safetensors"), str(last / "model.safetensors"))
    best_ema = ev("--ema", "--checkpoint", "best")
    assert best_ema["test_acc"] == pytest.approx(r.history[r.summary["best_epoch"] - 1]["ema_test_acc"], abs=1e-9)

    assert main(["merge", str(run), str(tmp_path / "m.safetensors"), "--ema"]) == 0
    want = merge_experts(vitmoe.load_model(last / "ema.safetensors")).state_dict()
    got = load_file(str(tmp_path / "m.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # A run whose best accuracy was its EMA's: reading the raw weights of `best` says so.
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**s, "best_model": "ema"}))
    capsys.readouterr()
    assert main(["analyze", str(run), "--images", "0", "--out", str(tmp_path / "a")]) == 0
    assert "was its EMA's: pass --ema" in capsys.readouterr().err
    assert main(["analyze", str(run), "--ema", "--images", "0", "--out", str(tmp_path / "a"), "--force"]) == 0
    assert "pass --ema" not in capsys.readouterr().err

    Trainer(_cfg(tmp_path, "plain", epochs=1, ema_decay=0.0), **quiet).fit()
    assert main(["eval", str(tmp_path / "plain"), "--ema"]) == 2
    assert "holds no ema.safetensors in its checkpoints: the run trained without ema_decay" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is a model file"):
        resolve_model_file(last / "model.safetensors", weights="ema")
