"""merge_every: randomly routed experts (and their Adam moments) set to their mean every N steps."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DIGITS, TINY_MC

import vitmoe
from vitmoe.models import ConfigError
from vitmoe.moe import seed_random_routers
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint, load_state
from vitmoe.training.recipe.expert_averaging import ExpertAverager

EXPERT_KEYS = ("w1", "b1", "w2", "b2")


def _trained_model(steps=3):
    torch.manual_seed(0)
    model = vitmoe.create_model("random_vit", moe={"expert_init": "independent"}, **TINY_DIGITS)
    seed_random_routers(model, 0, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x


def test_averaging_sets_every_expert_and_its_moments_to_the_mean():
    model, opt, x = _trained_model()
    averager = ExpertAverager(model, opt, every=2)
    experts = {f"{name}.{k}": getattr(m.experts, k) for name, m in model.moe_modules() for k in EXPERT_KEYS}
    means = {n: p.detach().mean(0) for n, p in experts.items()}
    moment_means = {n: {k: opt.state[p][k].mean(0) for k in ("exp_avg", "exp_avg_sq")} for n, p in experts.items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    assert all(not torch.equal(p[0], p[1]) for p in experts.values())  # independent experts, trained apart

    assert averager.after_step(3) is False and all(not torch.equal(p[0], p[1]) for p in experts.values())
    assert averager.after_step(4) is True
    for n, p in experts.items():
        for e in range(4):
            assert torch.equal(p[e], means[n]), (n, e)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][k][e], moment_means[n][k]), (n, k, e)
        assert int(opt.state[p]["step"]) == 3  # the step count is not an expert row
    for n, p in model.named_parameters():
        if ".experts." not in n:
            assert torch.equal(p, others[n]), n
    # All experts equal: every random route computes the merged model.
    model.train()
    routed = model(x)
    model.eval()
    torch.testing.assert_close(model(x), routed, rtol=1e-6, atol=1e-6)


def test_averager_refuses_a_model_without_random_routing():
    model = vitmoe.create_model("switch_vit", **TINY_DIGITS)
    with pytest.raises(ValueError, match="random"):
        ExpertAverager(model, torch.optim.AdamW(model.parameters()), every=3)
    with pytest.raises(ValueError, match="every"):
        ExpertAverager(model, torch.optim.AdamW(model.parameters()), every=0)


def _cfg(tmp_path, name, **kw):
    mc = dict(TINY_MC)
    base = dict(model="random_vit", dataset="digits", epochs=1, batch_size=128, lr=2e-3, optimizer="adamw",
                weight_decay=0.05, model_config=mc, out=str(tmp_path / name), log_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _expert_rows_equal(run_dir):
    ck = latest_checkpoint(run_dir)
    weights, state = vitmoe.load_model(ck / "model.safetensors").state_dict(), load_state(ck)
    same = [bool((w == w[:1]).all()) for k, w in weights.items() if ".experts." in k]
    moments = [bool((v == v[:1]).all()) for s in state["optimizer"]["state"].values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq") and v.ndim >= 2 and v.shape[0] == 4]
    return same, moments


def test_trainer_merges_right_after_every_nth_step(tmp_path, digits):
    tr, te = digits
    # 12 steps per epoch: merged after step 12, the last one; every 5: merged at 5 and 10, not after 12.
    Trainer(_cfg(tmp_path, "m12", merge_every=12), log=lambda m: None, train_data=tr, test_data=te).fit()
    same, moments = _expert_rows_equal(tmp_path / "m12")
    assert len(same) == 2 * 4 and all(same)
    assert len(moments) == 2 * 4 * 2 and all(moments)
    Trainer(_cfg(tmp_path, "m5", merge_every=5), log=lambda m: None, train_data=tr, test_data=te).fit()
    same, moments = _expert_rows_equal(tmp_path / "m5")
    assert not any(s for s, k in zip(same, range(8)) if k % 4 == 0)  # w1 of each layer: two steps apart
    summary = (tmp_path / "m5" / "summary.json").read_text()
    assert '"merge_every": 5' in summary


@pytest.mark.parametrize("kw, needles", [
    (dict(model="switch_vit"), ["merge_every", "router 'switch'", "random"]),
    (dict(model="vit", model_config={}), ["merge_every", "dense"]),
    (dict(merge_every=-1), ["merge_every", ">= 0"]),
    (dict(merge_every=2.5), ["merge_every", "integer"]),
])
def test_merge_every_validation(tmp_path, kw, needles):
    kw.setdefault("merge_every", 4)
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "bad", **kw).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert _cfg(tmp_path, "ok", merge_every="7").validate().merge_every == 7
