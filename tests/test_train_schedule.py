"""The training step (one path for fp32/bf16/fp16) and the lr schedule when a run is extended
(`resume_schedule`: "stretch" one cosine over the new total, "restart" a new cycle for the added epochs)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MC

from vitmoe.data import ImageData, load_dataset
from vitmoe.models import ConfigError
from vitmoe.training import TrainConfig, Trainer, fastest_adam
from vitmoe.training.loop.schedule import cyclic_lr_factor, extend_cycles, lr_factor

BATCH, IMAGES = 32, 96  # 3 steps per epoch
WARMUP = 2


@pytest.fixture(scope="module")
def data():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return ImageData(train.images[:IMAGES], train.labels[:IMAGES], train.info), ImageData(
        test.images[:40], test.labels[:40], test.info)


def _cfg(out, **kw):
    base = dict(model="switch_vit", dataset="digits", epochs=2, batch_size=BATCH, lr=1e-2, min_lr=1e-3,
                optimizer="adamw", warmup_steps=WARMUP, out=str(out), log_every=0, progress=False,
                model_config=dict(TINY_MC))
    base.update(kw)
    return TrainConfig(**base)


class _LrRecorder(Trainer):
    """Records the lr each optimizer step used."""

    def setup(self):
        super().setup()
        self.used_lrs = []
        self.optimizer.register_step_pre_hook(lambda opt, a, k: self.used_lrs.append(opt.param_groups[0]["lr"]))


def test_cycles_and_factors():
    assert extend_cycles([0, 6], 12, "stretch") == [0, 12]
    assert extend_cycles([0, 6], 12, "restart") == [0, 6, 12]
    assert extend_cycles([0, 6, 12], 20, "restart") == [0, 6, 12, 20]
    assert extend_cycles([0, 6, 12], 20, "stretch") == [0, 6, 20]
    assert extend_cycles([0, 6, 12], 4, "restart") == [0, 4]  # a shorter plan ends earlier
    assert extend_cycles([0, 6], 6, "restart") == [0, 6]
    with pytest.raises(ValueError):
        extend_cycles([0, 6], 12, "cyclic")
    for step in range(14):  # one cycle is exactly lr_factor
        assert cyclic_lr_factor(step, [0, 12], 2, "cosine", 0.1) == lr_factor(step, 12, 2, "cosine", 0.1)
        expected = lr_factor(step, 6, 2, "cosine", 0.1) if step < 6 else lr_factor(step - 6, 6, 2, "cosine", 0.1)
        assert cyclic_lr_factor(step, [0, 6, 12], 2, "cosine", 0.1) == expected
    # The time-budget floor only moves the last cycle.
    assert cyclic_lr_factor(3, [0, 6, 12], 0, "cosine", 0.0, min_progress=1.0) == lr_factor(3, 6, 0, "cosine", 0.0)
    assert cyclic_lr_factor(9, [0, 6, 12], 0, "cosine", 0.0, min_progress=1.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mode", ["stretch", "restart"])
def test_extending_a_finished_run(tmp_path, data, mode):
    first = _LrRecorder(_cfg(tmp_path / "run"), log=lambda m: None, train_data=data[0], test_data=data[1]).fit()
    spe, base, ratio = IMAGES // BATCH, 1e-2, 0.1
    assert first.history[-1]["lr"] == pytest.approx(base * ratio)  # the cosine has ended at min_lr
    logs = []
    more = _LrRecorder(_cfg(tmp_path / "run", epochs=4, resume_schedule=mode), resume=True, log=logs.append,
                       train_data=data[0], test_data=data[1])
    res = more.fit()
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    steps = range(2 * spe, 4 * spe)
    if mode == "stretch":  # one warm-up + cosine over all 4 epochs, continued at step 6
        expected = [base * lr_factor(s, 4 * spe, WARMUP, "cosine", ratio) for s in steps]
    else:  # a fresh warm-up + cosine over the 2 added epochs
        expected = [base * lr_factor(s - 2 * spe, 2 * spe, WARMUP, "cosine", ratio) for s in steps]
    assert more.used_lrs == pytest.approx(expected, rel=1e-12)
    assert more.used_lrs[0] > 2 * base * ratio  # the lr went up again in both modes, from the first step
    if mode == "restart":
        assert more.used_lrs[0] == pytest.approx(base / (WARMUP + 1))  # warm-up step 1 of 2
        assert res.history[-1]["lr"] == pytest.approx(base * ratio)  # the new cycle ends at min_lr too
    assert any(mode in m for m in logs)
    # Resuming the extended run again keeps its plan (the checkpoint holds the cycles).
    again = _LrRecorder(_cfg(tmp_path / "run", epochs=4, resume_schedule="stretch"), resume=True, log=lambda m: None,
                        train_data=data[0], test_data=data[1])
    again.setup()
    assert again.lr_schedule.cycles == ([0, 4 * spe] if mode == "stretch" else [0, 2 * spe, 4 * spe])


def test_resume_schedule_is_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match="resume_schedule"):
        TrainConfig(resume_schedule="sgdr").validate()
    cfg = TrainConfig(resume_schedule="Restart").validate()
    assert cfg.resume_schedule == "restart" and cfg.structural_diff(cfg.updated({"resume_schedule": "stretch"})) == []


def _manual_step(model, optimizer, x, y, clip):
    """The plain fp32 step written out: what the GradScaler path must equal when disabled."""
    out = model(x, return_aux=True)
    loss = F.cross_entropy(out.logits.float(), y, reduction="sum") / y.numel() + out.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def test_one_step_path_without_loss_scaling_is_the_plain_step(tmp_path, data):
    t = Trainer(_cfg(tmp_path / "run", grad_clip=0.5), log=lambda m: None, train_data=data[0], test_data=data[1])
    t.setup()
    assert not t.train_step.scaler.is_enabled() and t.train_step.state_dict() == {"scaler": {}}
    model = copy.deepcopy(t.model)
    # The trainer's implementation (fused on a CPU): implementations differ in the last bits.
    opt = fastest_adam(model, lr=t.optimizer.param_groups[0]["lr"], weight_decay=0.0)
    for g in t.optimizer.param_groups:
        g["weight_decay"] = 0.0
    x, y = next(iter(t.train_loader.iter_epoch(1)))
    torch.manual_seed(1)
    t.train_step(x, y, 1.0 / y.numel())  # 1/32: a power of two, so the scaled sum is the mean exactly
    torch.manual_seed(1)
    _manual_step(model, opt, x, y, 0.5)
    for (name, a), b in zip(t.model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_fp16_needs_cuda_and_bf16_takes_the_same_step(tmp_path, data):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16"):
            Trainer(_cfg(tmp_path / "fp16", amp="fp16"), log=lambda m: None)
    res = Trainer(_cfg(tmp_path / "bf16", amp="bf16", epochs=1), log=lambda m: None, train_data=data[0],
                  test_data=data[1]).fit()
    assert res.history[0]["steps_in_epoch"] == IMAGES // BATCH and res.history[0]["train_loss"] > 0
