"""Router options: top-2 second-expert policies, expert-choice routing, noise (float64 references)."""
import copy
import math

import pytest
import torch
from conftest import grads
import torch.nn.functional as F

from vitmoe.moe import MoEMlp, collect_moe_outputs, dispatch_routing
from vitmoe.moe.routers.scoring import router_logits

D, H = 12, 20


def assert_same(a, b, tol):
    y, gx, gp = a
    y_ref, gx_ref, gp_ref = b
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=tol, atol=tol)
    assert gp.keys() == gp_ref.keys() and "router.weight" in gp
    for name in gp:
        torch.testing.assert_close(gp[name].double(), gp_ref[name], rtol=tol, atol=tol, msg=name)


def make(router="topk", k=1, E=4, cf=None, path="padded", **kw):
    m = MoEMlp(D, H, num_experts=E, router=router, top_k=k, capacity_factor_train=cf, capacity_factor_eval=cf,
               expert_init="independent", dispatch=path, **kw).double()
    with torch.no_grad():
        m.experts.b1.normal_()
        m.experts.b2.normal_()
    return m


def expert(m, j, x):
    e = m.experts
    return F.gelu(x @ e.w1[j] + e.b1[j]) @ e.w2[j] + e.b2[j]


# --- second-expert policies -------------------------------------------------------------------
def test_second_policy_all_keeps_every_second_copy():
    m = make(k=2, second_policy="all")
    ref = make(k=2)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    assert m.router(x).keep_TK is None
    with collect_moe_outputs(m) as moe:
        y = m(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    assert float(moe.stats()[""]["load"].sum()) == 2 * 18


def naive_first_only(m, x_BND):
    """Every token through its first expert only, with the GShard gate p1 / (p1 + p2)."""
    r = m.router(x_BND)
    x = x_BND.reshape(-1, D)
    rows = [r.gates_TK[t, 0].double() * expert(m, int(r.experts_TK[t, 0]), x[t]) for t in range(x.shape[0])]
    return torch.stack(rows).view(x_BND.shape)


@pytest.mark.parametrize("path", ["padded", "grouped"])
def test_threshold_one_drops_every_second_copy_and_equals_first_expert_only(path):
    ref = make(k=2, second_policy="random", second_threshold=1.0)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    m, tol = (ref, 1e-10) if path == "padded" else (copy.deepcopy(ref).float(), 2e-5)
    m.experts.dispatch_path = path
    r = ref.router(x)
    assert not r.keep_TK[:, 1].any() and r.keep_TK[:, 0].all()
    # Gates are renormalised over both choices before the second is dropped (GShard's order).
    probs = r.probs_TE.topk(2, dim=-1).values
    torch.testing.assert_close(r.gates_TK[:, 0], probs[:, 0] / probs.sum(-1))
    with collect_moe_outputs(m) as moe:
        out = grads(m, x.to(m.experts.w1.dtype), m)
    assert float(moe.stats()[""]["load"].sum()) == 21  # unsent copies are not load
    assert_same(out, grads(ref, x, lambda x: naive_first_only(ref, x)), tol)


def test_unsent_second_copies_take_no_capacity():
    m = make(k=2, second_policy="random", second_threshold=1.0, cf=1.0, E=2)
    x = torch.randn(1, 10, D, dtype=torch.float64)
    r = m.router(x)
    C = m.capacity(10)  # ceil(1.0 * 10 * 2 / 2) = 10: room for every first copy
    d = dispatch_routing(r, 2, C)
    assert C == 10 and int(d.dropped) == 0 and int(d.kept_E.sum()) == 10
    assert (d.gate_S[10:] == 0).all()  # the unsent copies sit behind the kept ones, gate 0
    with collect_moe_outputs(m) as moe:
        m(x)
    assert float(moe.stats()[""]["dropped_frac"]) == 0


def test_threshold_keeps_exactly_the_second_gates_above_it():
    m = make(k=2, second_policy="random", second_threshold=0.3)
    x = torch.randn(4, 16, D, dtype=torch.float64) * 5  # spread the gates
    r = m.router(x)
    torch.testing.assert_close(r.keep_TK[:, 1], r.gates_TK[:, 1] > 0.3)
    assert 0 < int(r.keep_TK[:, 1].sum()) < 64
    with collect_moe_outputs(m) as moe:
        m(x)
    assert float(moe.stats()[""]["load"].sum()) == 64 + int(r.keep_TK[:, 1].sum())


def test_sampling_keeps_second_copies_with_probability_twice_their_gate():
    torch.manual_seed(123)
    m = MoEMlp(D, H, num_experts=6, router="topk", top_k=2, second_policy="sampling")
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)
    x = torch.randn(1, 40000, D)
    r = m.router(x)
    p_T = (2 * r.gates_TK[:, 1].detach()).clamp(max=1).double()  # gate2 <= 0.5, so 2*gate2 is a probability
    kept = float(r.keep_TK[:, 1].double().sum())
    mean, sd = float(p_T.sum()), float((p_T * (1 - p_T)).sum().sqrt())
    assert abs(kept - mean) < 5 * sd  # sum of independent Bernoullis
    assert 0.2 < mean / 40000 < 0.9
    m.eval()
    assert m.router(x).keep_TK is None  # evaluation is deterministic: every second copy is sent


def test_second_policy_needs_top2():
    with pytest.raises(ValueError, match="second_policy"):
        MoEMlp(D, H, num_experts=4, router="switch", second_policy="sampling")
    with pytest.raises(ValueError, match="second_policy"):
        MoEMlp(D, H, num_experts=4, router="topk", top_k=2, second_policy="often")


# --- expert choice -----------------------------------------------------------------------------
def naive_expert_choice(m, x_BND):
    """Each expert in turn takes its C highest-scoring tokens (a Python sort per expert)."""
    B, N, _ = x_BND.shape
    T = B * N
    probs = m.router(x_BND, m.capacity(T)).probs_TE  # the layer's own fp32 scores (differentiable)
    C = m.capacity(T)
    x = x_BND.reshape(T, -1)
    out = [torch.zeros(m.experts.w2.shape[-1], dtype=x.dtype) for _ in range(T)]
    for e in range(m.num_experts):
        chosen = sorted(range(T), key=lambda t: -float(probs[t, e].detach()))[:C]
        for t in chosen:
            out[t] = out[t] + probs[t, e].double() * expert(m, e, x[t])
    return torch.stack(out).view(B, N, -1)


@pytest.mark.parametrize("path", ["padded", "grouped"])
@pytest.mark.parametrize("cf,E", [(1.0, 4), (0.5, 4), (2.0, 3)])
def test_expert_choice_matches_naive_reference(path, cf, E):
    ref = make("expert_choice", E=E, cf=cf)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    m, tol = (ref, 1e-10) if path == "padded" else (copy.deepcopy(ref).float(), 2e-5)
    m.experts.dispatch_path = path
    C = math.ceil(cf * 21 / E)
    assert m.capacity(21) == C
    with collect_moe_outputs(m) as moe:
        out = grads(m, x.to(m.experts.w1.dtype), m)
    assert_same(out, grads(ref, x, lambda x: naive_expert_choice(ref, x)), tol)
    # Exactly C copies per expert: never more, and balanced by construction.
    assert moe.stats()[""]["load"].tolist() == [float(C)] * E
    assert float(moe.stats()[""]["dropped_frac"]) == 0
    assert set(moe.layer_aux()[""]) == {"z"}  # no balance loss


def test_expert_choice_a_token_is_taken_by_zero_to_all_experts():
    E = 4
    m = make("expert_choice", E=E, cf=1.0)
    with torch.no_grad():
        m.router.weight.normal_(0, 2.0)
    x = torch.randn(1, 16, D, dtype=torch.float64)
    C = m.capacity(16)
    r = m.router(x, C)
    taken_T = torch.bincount(r.copies.token_S, minlength=16)
    assert torch.bincount(r.copies.expert_S, minlength=E).tolist() == [C] * E
    assert int(taken_T.max()) >= 2 and int(taken_T.min()) == 0 and int(taken_T.sum()) == E * C
    with collect_moe_outputs(m) as moe:
        y = m(x)
    assert (y[0, taken_T == 0] == 0).all()  # untouched tokens: zero from the MoE branch
    assert float(moe.stats()[""]["untouched_frac"]) == pytest.approx(float((taken_T == 0).double().mean()))
    # Capacity factor E: every expert takes every token, the layer is the dense mixture.
    m = make("expert_choice", E=E, cf=float(E))
    probs = m.router(x, 16).probs_TE.double()
    dense = sum(probs[:, e, None] * expert(m, e, x[0]) for e in range(E))
    torch.testing.assert_close(m(x)[0], dense)


def test_expert_choice_capacity_is_capped_by_token_count_and_required():
    m = make("expert_choice", E=2, cf=2.0, min_capacity=100)
    assert m.capacity(10) == 10
    with collect_moe_outputs(m) as moe:
        m(torch.randn(2, 5, D, dtype=torch.float64))
    assert moe.stats()[""]["load"].tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEMlp(D, H, num_experts=4, router="expert_choice")
    with pytest.raises(ValueError, match="top_k"):
        MoEMlp(D, H, num_experts=4, router="expert_choice", top_k=2, capacity_factor_train=1, capacity_factor_eval=1)


# --- noise -------------------------------------------------------------------------------------
@pytest.mark.parametrize("router,k", [("topk", 2), ("expert_choice", 1)])
@pytest.mark.parametrize("noise", ["jitter", "gaussian"])
def test_noise_only_in_training(router, k, noise):
    m = MoEMlp(D, H, num_experts=4, router=router, top_k=k, router_noise=noise, jitter_eps=0.5,
               capacity_factor_train=1.0, capacity_factor_eval=1.0)
    x = torch.randn(2, 8, D)
    m.eval()
    torch.testing.assert_close(m.router(x, 4).probs_TE, m.router(x, 4).probs_TE, rtol=0, atol=0)
    m.train()
    assert not torch.equal(m.router(x, 4).probs_TE, m.router(x, 4).probs_TE)


@pytest.mark.parametrize("E", [2, 4, 8])
def test_gaussian_noise_std_is_one_over_e_squared(E):
    torch.manual_seed(0)
    w = torch.zeros(E, D)  # logits are the noise alone
    noise = router_logits(torch.randn(1, 50000, D), w, "gaussian", 0.01, training=True)
    assert float(noise.std()) == pytest.approx(1 / E**2, rel=0.02)
    assert float(router_logits(torch.randn(1, 10, D), w, "gaussian", 0.01, training=False).abs().max()) == 0
