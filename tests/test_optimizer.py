"""The trainer's optimizer: torch's fused Adam/AdamW where torch has the kernel (training.loop.optim.
adam_kwargs), equal to the reference for-loop within float32 rounding, under a GradScaler, and
resumable from a checkpoint written by another implementation."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import _default_to_fused_or_foreach
from conftest import TINY_DIGITS, TINY_MC

import vitmoe
from vitmoe.training import TrainConfig, Trainer, adam_kwargs, fastest_adam
from vitmoe.training.loop import trainer as trainer_mod
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint, load_state
from vitmoe.training.loop.optim import build_optimizer, keep_implementation_on_load, param_groups

EPS32 = torch.finfo(torch.float32).eps
LOOP = {"foreach": False, "fused": False}


def _cfg(tmp_path=None, name="run", **kw):
    mc = dict(TINY_MC)
    base = dict(model="switch_vit", dataset="digits", epochs=2, batch_size=128, lr=1e-2, optimizer="adamw",
                weight_decay=0.1, model_config=mc, out=str(tmp_path / name) if tmp_path else "unused",
                log_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    torch.manual_seed(0)
    return vitmoe.create_model("switch_vit", **TINY_DIGITS)


def _grads(model, steps):
    """Fixed gradients per step (from the model's own loss at its start weights, scaled per step),
    so two optimizers see the same inputs and differ only by their arithmetic."""
    x, y = torch.randn(16, 1, 8, 8, dtype=next(model.parameters()).dtype), torch.randint(10, (16,))
    out = model(x, return_aux=True)
    (F.cross_entropy(out.logits, y) + out.aux_loss).backward()
    base = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    return [[b * (1 + torch.rand((), generator=g)) + 1e-3 * torch.randn(b.shape, generator=g) for b in base]
            for _ in range(steps)]


def _run(model, opt, grads):
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()


def _bound(ref, steps, lr):
    """What float32 rounding explains: each step both implementations round p, m, v and the update
    m_hat / (sqrt(v_hat) + eps) (|.| <= ~1) a few times, i.e. a few ulps of |p| and of lr; over
    `steps` steps those add up at worst linearly. 8 ulps a step is the margin."""
    return steps * 8 * EPS32 * (ref.abs() + lr)


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_fused_optimizer_equals_the_for_loop_reference_within_float32_rounding(optimizer):
    cfg, steps = _cfg(optimizer=optimizer), 20
    model = _model()
    ref = copy.deepcopy(model)
    grads = _grads(model, steps)
    opt = build_optimizer(cfg, model)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the decay groups are there
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    ref_opt = cls(param_groups(ref, cfg.weight_decay, cfg.no_decay_1d), lr=cfg.lr, betas=tuple(cfg.betas), **LOOP)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _run(model, opt, grads)
    _run(ref, ref_opt, grads)
    worst = 0.0
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        bound = _bound(r.detach(), steps, cfg.lr)
        err = (p.detach() - r.detach()).abs()
        assert (err <= bound).all(), (n, float((err - bound).max()))
        worst = max(worst, float((err / bound).max()))
        for k in ("exp_avg", "exp_avg_sq"):
            # A moment is a sum of terms of either sign: its rounding scales with the terms (at most
            # the tensor's largest value), not with a sum that cancelled to near zero.
            m = ref_opt.state[r][k]
            tol = steps * 8 * EPS32
            torch.testing.assert_close(opt.state[p][k], m, rtol=tol, atol=tol * float(m.abs().max()))
        assert float(opt.state[p]["step"]) == float(ref_opt.state[r]["step"]) == steps
    # The bound is far below what the step does (it would catch a wrong lr, decay or Adam flavour).
    moved = max(float((r.detach() - start[n]).abs().max()) for n, r in ref.named_parameters())
    assert moved > 1e3 * steps * 8 * EPS32 * (1 + cfg.lr)
    assert worst < 1  # and it is reached by rounding, not by chance


class _Sub(torch.Tensor):
    pass


def test_adam_kwargs_follows_torchs_fused_rule():
    """torch's rule (optimizer._default_to_fused_or_foreach with use_fused=True): plain floating-point
    tensors on a fused-kernel device. float64 on the CPU has the kernel too (and it is exact to
    float64 rounding, see the next test)."""
    cases = {
        "cpu float32": [torch.zeros(3, requires_grad=True)],
        "cpu float64": [torch.zeros(3, dtype=torch.float64, requires_grad=True)],
        "cpu bf16": [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)],
        "cpu complex64": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)],
        "meta float32": [torch.zeros(3, device="meta", requires_grad=True)],
        "mixed float32 + complex": [torch.zeros(3, requires_grad=True),
                                    torch.zeros(3, dtype=torch.complex64, requires_grad=True)],
        "tensor subclass": [torch.zeros(3).as_subclass(_Sub).requires_grad_()],
    }
    expected = {"cpu float32": {"fused": True}, "cpu float64": {"fused": True}, "cpu bf16": {"fused": True},
                "cpu complex64": {"foreach": True}, "meta float32": {"foreach": False},
                "mixed float32 + complex": {"foreach": True}, "tensor subclass": {"foreach": False}}
    for name, params in cases.items():
        got = adam_kwargs(params)
        assert got == expected[name], name
        assert got.get("fused", False) == _default_to_fused_or_foreach(params, False, use_fused=True)[0], name
    model = _model()
    groups = param_groups(model, 0.1, True)
    assert adam_kwargs(model) == adam_kwargs(groups) == {"fused": True}
    with pytest.raises(TypeError, match="list"):
        adam_kwargs(model.parameters())


def test_fused_float64_equals_the_for_loop_within_float64_rounding():
    model = _model().double()
    ref, steps, lr = copy.deepcopy(model), 10, 1e-2
    grads = _grads(model, steps)
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=0.1, **adam_kwargs(model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1, **LOOP)
    assert opt.param_groups[0]["fused"] is True
    _run(model, opt, grads)
    _run(ref, ref_opt, grads)
    eps64 = torch.finfo(torch.float64).eps
    for p, r in zip(model.parameters(), ref.parameters()):
        assert ((p - r).abs() <= steps * 8 * eps64 * (r.abs() + lr)).all()


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradscaler_with_the_fused_optimizer_unscales_and_skips_like_the_for_loop(clip):
    """The fused kernel takes the scale and the inf flag from the GradScaler (it unscales inside);
    the for-loop gets unscaled gradients and is skipped. Both see the same scaled gradients (a power
    of two scale unscales exactly): same steps, same skips, the for-loop's values within rounding."""
    model = _model()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, **LOOP)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) for _ in range(2)]
    scalers[0].scale(torch.ones(()))  # its scale is made by the first scale(); the model reuses ref's gradients
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    poisoned = [False, False, True, False]
    for step, poison in enumerate(poisoned):
        before = [p.detach().clone() for p in model.parameters()]
        out = ref(x, return_aux=True)
        ref_opt.zero_grad(set_to_none=True)
        scalers[1].scale(F.cross_entropy(out.logits, y) + out.aux_loss).backward()
        if poison:
            next(ref.parameters()).grad[0] = float("inf")
        for p, r in zip(model.parameters(), ref.parameters()):
            p.grad = r.grad.clone()
        for m, o, scaler in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            if clip:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            scaler.step(o)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** (12 - (step >= 2))
        for p, r, b in zip(model.parameters(), ref.parameters(), before):
            if poison:
                assert torch.equal(p, b)  # the step was skipped
            assert ((p - r).abs() <= _bound(r.detach(), step + 1, 1e-2)).all()
        steps_taken = step + 1 - sum(poisoned[:step + 1])
        assert float(opt.state[next(model.parameters())]["step"]) == steps_taken
    assert not torch.equal(next(model.parameters()), before[0])


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


IMPLS = {"loop": LOOP, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("saved, resumed", [("loop", "fused"), ("foreach", "fused"), ("fused", "foreach"),
                                            ("fused", "loop")])
def test_optimizer_state_resumes_across_implementations(saved, resumed):
    cfg, first, then = _cfg(), 6, 6
    model = _model()
    grads = _grads(model, first + then)
    a = torch.optim.AdamW(param_groups(model, 0.1, True), lr=cfg.lr, **IMPLS[saved])
    _run(model, a, grads[:first])
    state, weights = _roundtrip(a.state_dict()), copy.deepcopy(model.state_dict())
    _run(model, a, grads[first:])  # the uninterrupted run

    twin = _model()
    twin.load_state_dict(weights)
    b = keep_implementation_on_load(torch.optim.AdamW(param_groups(twin, 0.1, True), lr=cfg.lr, **IMPLS[resumed]))
    b.load_state_dict(state)
    for g in b.param_groups:  # the saved groups' flags did not replace this optimizer's implementation
        assert bool(g["fused"]) == (resumed == "fused") and bool(g["foreach"]) == (resumed == "foreach")
    for p in twin.parameters():
        s = b.state[p]["step"]
        assert float(s) == first and s.dtype == torch.float32 and s.device.type == "cpu"
    _run(twin, b, grads[first:])
    for p, r in zip(twin.parameters(), model.parameters()):
        assert ((p - r).abs() <= _bound(r.detach(), first + then, cfg.lr)).all()
        assert float(b.state[p]["step"]) == first + then


def test_a_fused_step_is_seen_by_the_merged_expert_cache():
    """The fused kernels write the weights without bumping their version counters; fastest_adam
    bumps them, or a random-routed model would evaluate its merged experts from before the step."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(10, (4,))
    results = {}
    for name in ("fastest_adam", "plain fused"):
        torch.manual_seed(0)
        model = vitmoe.create_model("random_vit", moe={"expert_init": "independent"}, **TINY_DIGITS)
        opt = (fastest_adam(model, lr=1e-2) if name == "fastest_adam"
               else torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
        assert opt.param_groups[0]["fused"]
        with torch.no_grad():  # as evaluation runs: the merged experts are cached
            model.eval()
            model(x)
        model.train()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            model.eval()
            fresh = copy.deepcopy(model)  # no cache: merges the weights as they are now
            results[name] = (model(x), fresh(x))
    after, truth = results["fastest_adam"]
    assert torch.equal(after, truth)
    after, truth = results["plain fused"]
    assert not torch.equal(after, truth)  # the stale cache that fastest_adam avoids


def test_plain_load_state_dict_would_switch_the_implementation():
    """Why keep_implementation_on_load exists: torch takes the implementation flags from the saved groups."""
    model = _model()
    grads = _grads(model, 1)
    a = torch.optim.AdamW(model.parameters(), lr=1e-2, **LOOP)
    _run(model, a, grads)
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    fused.load_state_dict(a.state_dict())
    assert not fused.param_groups[0]["fused"]
    kept = keep_implementation_on_load(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
    kept.load_state_dict(a.state_dict())
    assert kept.param_groups[0]["fused"] is True


def _todays_optimizer(cfg, model):
    """build_optimizer as it was before the fused default: torch's defaults (the for-loop on a CPU)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups(model, cfg.weight_decay, cfg.no_decay_1d), lr=cfg.lr, betas=tuple(cfg.betas))


def test_a_checkpoint_of_todays_optimizer_resumes_under_the_fused_one(tmp_path, digits, kill_after_epoch,
                                                                      monkeypatch):
    tr, te = digits
    kw = dict(lr=2e-3, weight_decay=0.05)
    monkeypatch.setattr(trainer_mod, "build_optimizer", _todays_optimizer)
    full = Trainer(_cfg(tmp_path, "full", **kw), log=lambda m: None, train_data=tr, test_data=te)
    full.fit()
    assert not full.optimizer.param_groups[0]["fused"]
    kill_after_epoch(Trainer(_cfg(tmp_path, "killed", **kw), log=lambda m: None, train_data=tr, test_data=te))
    monkeypatch.setattr(trainer_mod, "build_optimizer", build_optimizer)
    resumed = Trainer(_cfg(tmp_path, "killed", **kw), resume=True, log=lambda m: None, train_data=tr, test_data=te)
    resumed.fit()
    assert all(g["fused"] is True for g in resumed.optimizer.param_groups)
    sa, sb = load_state(latest_checkpoint(tmp_path / "full")), load_state(latest_checkpoint(tmp_path / "killed"))
    assert sa["step"] == sb["step"] == 24
    assert [float(s["step"]) for s in sb["optimizer"]["state"].values()] == [24.0] * len(sb["optimizer"]["state"])
    a = vitmoe.load_model(latest_checkpoint(tmp_path / "full") / "model.safetensors").state_dict()
    b = vitmoe.load_model(latest_checkpoint(tmp_path / "killed") / "model.safetensors").state_dict()
    # 12 steps through forward and backward after the switch: the rounding differences pass through
    # the model (and could flip a near-tie route) before they reach the weights, so the bound is
    # looser than the optimizer's alone: still 100x below one step's move (lr 2e-3).
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
