"""Crash-safe checkpoints, exact resume, and the NaN stop."""
import json
import os

import pytest
import torch
from conftest import TINY_MC

import vitmoe
from vitmoe.training import NonFiniteLossError, TrainConfig, Trainer
from vitmoe.training.checkpoints import checkpoint as ckpt
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint, load_state, save_checkpoint


def tiny_cfg(tmp_path, name="run", model="switch_vit", **kw):
    base = dict(model=model, dataset="digits", epochs=2, batch_size=128, lr=2e-3, optimizer="adamw",
                weight_decay=0.05, warmup_epochs=0.5, model_config=dict(TINY_MC), out=str(tmp_path / name),
                log_every=5, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _model_state(run_dir):
    return vitmoe.load_model(latest_checkpoint(run_dir) / "model.safetensors").state_dict()


@pytest.mark.parametrize("model", ["switch_vit", "random_vit"])
def test_resume_is_bit_identical(tmp_path, kill_after_epoch, digits, model):
    tr, te = digits
    extra = dict(model_config=dict(TINY_MC, drop_rate=0.1)) if model == "random_vit" else {}
    full = Trainer(tiny_cfg(tmp_path, "full", model, **extra), log=lambda m: None, train_data=tr, test_data=te).fit()

    # The same run, killed right after epoch 1's checkpoint, then resumed.
    kill_after_epoch(Trainer(tiny_cfg(tmp_path, "killed", model, **extra), log=lambda m: None, train_data=tr,
                             test_data=te))
    assert latest_checkpoint(tmp_path / "killed").name == "epoch-0001"
    resumed = Trainer(tiny_cfg(tmp_path, "killed", model, **extra), resume=True, log=lambda m: None,
                      train_data=tr, test_data=te).fit()

    a, b = _model_state(tmp_path / "full"), _model_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = load_state(latest_checkpoint(tmp_path / "full")), load_state(latest_checkpoint(tmp_path / "killed"))
    assert sa["step"] == sb["step"] == 2 * 12
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])
    keys = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "expert_load")
    strip = lambda rows: [{k: r[k] for k in keys} for r in rows]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


@pytest.mark.parametrize("model,dispatch,amp", [("switch_vit", "grouped", "off"), ("switch_vit", "padded", "bf16"),
                                                ("cct_2_3x2_switch", "grouped", "bf16")])
def test_cpu_runs_train_the_same_weights_without_the_nan_fill(tmp_path, digits, monkeypatch, model, dispatch, amp):
    # Deterministic mode's NaN fill of new tensors is off on CPU (1-3 % of the recipe's step): no
    # kernel a run uses may read memory it did not write, or the fill would change the weights.
    import vitmoe.training.loop.trainer as trainer_module

    tr, te = digits
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    mc = dict(TINY_MC, moe=dict(dispatch=dispatch))
    if model.startswith("cct"):
        mc = dict(embed_dim=16, num_heads=2, mlp_hidden=32, moe_layers="all", num_experts=4, moe=dict(dispatch=dispatch))
    seen, original = [], trainer_module.seed_everything
    try:
        for fill in (True, False):
            def seed(*a, fill=fill, **k):
                original(*a, **k)
                if fill:
                    torch.utils.deterministic.fill_uninitialized_memory = True
                seen.append(torch.utils.deterministic.fill_uninitialized_memory)
            monkeypatch.setattr(trainer_module, "seed_everything", seed)
            Trainer(tiny_cfg(tmp_path, f"fill-{fill}", model, epochs=1, amp=amp, model_config=mc), log=lambda m: None,
                    train_data=tr, test_data=te).fit()
            monkeypatch.undo()
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.utils.deterministic.fill_uninitialized_memory = flags[2]
    assert seen == [True, False]
    a, b = _model_state(tmp_path / "fill-True"), _model_state(tmp_path / "fill-False")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _tiny_model():
    return vitmoe.create_model("switch_vit", img_size=8, in_chans=1, **TINY_MC)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = _tiny_model()
    save_checkpoint(run, 1, model, {"epoch": 1, "rng": ckpt.rng_state()}, metadata={"dataset": "digits"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def partial_save(obj, f, *a, **k):
        f.write(b"\x80\x02partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", partial_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run, 2, model, {"epoch": 2})
    monkeypatch.undo()

    ckdir = run / "checkpoints"
    assert latest_checkpoint(run).name == "epoch-0001"
    assert (ckdir / "latest").read_text().strip() == "epoch-0001"
    assert not (ckdir / "epoch-0002").exists()
    assert not [p for p in os.listdir(ckdir) if p.startswith(".")], "temporary files left behind"
    loaded = vitmoe.load_model(ckdir / "epoch-0001" / "model.safetensors").state_dict()
    assert all(torch.equal(loaded[k], before[k]) for k in before)
    assert load_state(ckdir / "epoch-0001")["epoch"] == 1

    # A crash inside the weights writer is just as harmless.
    def broken_save_model(model, path, metadata=None, **kw):
        with open(path, "wb") as f:
            f.write(b"garbage")
        raise RuntimeError("killed (simulated)")

    monkeypatch.setattr(ckpt, "save_model", broken_save_model)
    with pytest.raises(RuntimeError):
        save_checkpoint(run, 2, model, {"epoch": 2})
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "epoch-0001"
    assert not [p for p in os.listdir(ckdir) if p.startswith(".")]


def test_leftover_temp_dir_ignored_and_pruned(tmp_path):
    run = tmp_path / "run"
    model = _tiny_model()
    save_checkpoint(run, 1, model, {"epoch": 1})
    # What SIGKILL during a write leaves behind: a hidden temp dir with a partial file.
    junk = run / "checkpoints" / ".tmp-epoch-0002-abc"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(run).name == "epoch-0001"
    save_checkpoint(run, 2, model, {"epoch": 2}, keep=1, is_best=False)
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["epoch-0002", "latest"]  # keep=1 and no best yet: epoch 1 is pruned
    assert not junk.exists()
    save_checkpoint(run, 3, model, {"epoch": 3}, keep=1, is_best=True)
    assert sorted(os.listdir(run / "checkpoints")) == ["best", "epoch-0003", "latest"]


def test_nan_loss_stops_with_step_and_keeps_last_good(tmp_path, digits):
    tr, te = digits
    cfg = tiny_cfg(tmp_path, "nan", "vit", epochs=3, log_every=4)

    class Poisoned(Trainer):
        def setup(self):
            super().setup()
            inner = self.train_step.forward

            def forward(x, **kw):
                out = inner(x, **kw)
                # the 17th step (epoch 2)
                return out._replace(logits=out.logits * float("nan")) if self.state.step == 16 else out

            self.train_step.forward = forward

    with pytest.raises(NonFiniteLossError) as err:
        Poisoned(cfg, log=lambda m: None, train_data=tr, test_data=te).fit()
    msg = str(err.value)
    assert "epoch 2, step 17" in msg and "epoch-0001" in msg
    run = tmp_path / "nan"
    ck = latest_checkpoint(run)
    assert ck.name == "epoch-0001"
    model = vitmoe.load_model(ck / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
