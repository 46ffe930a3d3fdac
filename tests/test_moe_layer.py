"""MoEMlp against naive references: float64, per token, Python loops (tests only)."""
import copy
import math

import pytest
import torch
from conftest import grads

from vitmoe.models import Mlp
from vitmoe.moe import MoEMlp, collect_moe_outputs, dispatch, expert_capacity, load_balancing_loss, router_z_loss

D, H = 12, 20
PATHS = ["grouped", "padded"]


def naive_moe(m: MoEMlp, x_BND: torch.Tensor) -> torch.Tensor:
    """Route with the layer's own router, then loop over tokens in GShard priority order."""
    B, N, _ = x_BND.shape
    T = B * N
    r = m.router(x_BND)
    x = x_BND.reshape(T, -1)
    cap = m.capacity(T)
    e = m.experts
    taken = [0] * m.num_experts
    out = [torch.zeros(e.w2.shape[-1], dtype=x.dtype) for _ in range(T)]
    for k in range(r.experts_TK.shape[1]):  # all first choices before any second choice
        for t in range(T):
            j = int(r.experts_TK[t, k])
            if cap is not None and taken[j] >= cap:
                continue
            taken[j] += 1
            h = torch.nn.functional.gelu(x[t] @ e.w1[j] + e.b1[j])
            out[t] = out[t] + r.gates_TK[t, k].to(x.dtype) * (h @ e.w2[j] + e.b2[j])
    return torch.stack(out).view(B, N, -1)


def make(router="topk", k=1, cf=None, E=4, path="grouped", **kw):
    m = MoEMlp(D, H, num_experts=E, router=router, top_k=k, capacity_factor_train=cf, capacity_factor_eval=cf,
               expert_init="independent", dispatch=path, **kw).double()
    with torch.no_grad():  # non-zero biases, so a wrong bias gather would show
        m.experts.b1.normal_()
        m.experts.b2.normal_()
    return m


@pytest.mark.parametrize("path", PATHS + ["grouped-static"])
@pytest.mark.parametrize("k,cf", [(1, None), (2, None), (1, 1.0), (2, 0.75), (1, 0.5)])
def test_dispatch_matches_naive_reference(path, k, cf):
    ref = make("topk", k, cf, path=path.replace("-static", ""))
    # "grouped-static": the GPU layout (padding rows computed in the last group, then zeroed).
    ref.experts.static_shapes = path.endswith("-static") or None
    x = torch.randn(3, 7, D, dtype=torch.float64)
    # torch._grouped_mm has no float64 kernel: the grouped path runs in float32 against the
    # float64 reference (routing is identical: the router computes in float32 either way).
    m, tol = (ref, 1e-10) if path == "padded" else (copy.deepcopy(ref).float(), 2e-5)
    with collect_moe_outputs(m) as moe:
        y, gx, gp = grads(m, x.to(m.experts.w1.dtype), m)
    if cf is not None and cf < 1:  # the case must actually drop copies to test dropping
        assert float(moe.stats()[""]["dropped_frac"]) > 0
    y_ref, gx_ref, gp_ref = grads(ref, x, lambda x: naive_moe(ref, x))
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=tol, atol=tol)
    assert gp.keys() == gp_ref.keys() and "router.weight" in gp
    for name in gp:
        torch.testing.assert_close(gp[name].double(), gp_ref[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("path,dtype", [("grouped", torch.float32), ("padded", torch.float64)])
def test_one_expert_equals_dense_mlp(path, dtype):
    moe = MoEMlp(D, H, num_experts=1, router="switch", dispatch=path).to(dtype)
    dense = Mlp(D, H).to(dtype)
    with torch.no_grad():
        dense.fc1.weight.copy_(moe.experts.w1[0].t()); dense.fc1.bias.normal_()
        dense.fc2.weight.copy_(moe.experts.w2[0].t()); dense.fc2.bias.normal_()
        moe.experts.b1.copy_(dense.fc1.bias[None]); moe.experts.b2.copy_(dense.fc2.bias[None])
    x = torch.randn(2, 5, D, dtype=dtype)
    y, gx, gp = grads(moe, x, moe)
    y_ref, gx_ref, gd = grads(dense, x, dense)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp["experts.w1"][0], gd["fc1.weight"].t())
    torch.testing.assert_close(gp["experts.b1"][0], gd["fc1.bias"])
    torch.testing.assert_close(gp["experts.w2"][0], gd["fc2.weight"].t())
    torch.testing.assert_close(gp["experts.b2"][0], gd["fc2.bias"])
    # One expert: the gate is softmax over a single logit, exactly 1, so the router gets no gradient.
    assert gp["router.weight"].abs().max() == 0


@pytest.mark.parametrize("path", PATHS)
def test_capacity_respected_and_dropped_copies_are_zero(path):
    E, cf = 4, 1.0
    m = make("switch", 1, cf, E=E, path=path).float()
    with torch.no_grad():  # everyone prefers expert 2
        m.router.weight.zero_(); m.router.weight[2, 0] = 50.0
    x = torch.randn(2, 10, D)
    x[..., 0] = x[..., 0].abs() + 1
    T = 20
    C = expert_capacity(T, 1, E, cf)
    assert C == 5
    with collect_moe_outputs(m) as moe:
        y = m(x).reshape(T, -1)
    stats = moe.stats()[""]
    r = m.router(x)
    d = dispatch(r.gates_TK, r.experts_TK, E, C)
    assert int(d.kept_E.max()) <= C and d.kept_E.tolist() == [0, 0, 5, 0]
    assert float(stats["dropped_frac"]) == pytest.approx(15 / 20)
    assert stats["load"].tolist() == [0, 0, 20, 0]
    # The first C tokens (in order) are kept; every later copy contributes exactly zero.
    assert (y[C:] == 0).all() and (y[:C].abs().sum(-1) > 0).all()


def test_min_capacity_and_dropless():
    assert expert_capacity(10, 1, 8, 1.0) == 2
    assert expert_capacity(10, 1, 8, 1.0, minimum=4) == 4
    assert expert_capacity(10, 2, 8, 1.25) == 4  # ceil(1.25 * 10 * 2 / 8)
    assert expert_capacity(10, 1, 8, None) is None and expert_capacity(10, 1, 8, 0) is None


def test_balance_loss_is_one_at_perfect_balance_and_matches_hand_computation():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    first = torch.arange(T) % E
    assert float(load_balancing_loss(probs, first)) == pytest.approx(1.0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    first = torch.tensor([0, 0, 1])
    f = [2 / 3, 1 / 3, 0, 0]
    P = [(0.7 + 0.6 + 0.1) / 3, (0.1 + 0.2 + 0.5) / 3, 0.4 / 3, 0.4 / 3]
    assert float(load_balancing_loss(probs, first)) == pytest.approx(E * sum(a * b for a, b in zip(f, P)))


def test_z_loss_hand_computation_and_aux_terms_on_layer():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = (math.log(1 + 3) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)
    m = MoEMlp(D, H, num_experts=4, router="switch", balance_loss_weight=0.5, z_loss_weight=0.25)
    with collect_moe_outputs(m) as moe:
        m(torch.randn(2, 3, D))
    aux = moe.layer_aux()[""]
    assert set(aux) == {"balance", "z"}
    assert float(moe.aux_loss()) == pytest.approx(float(0.5 * aux["balance"] + 0.25 * aux["z"]))
    # Outside a collection block nothing is recorded, so the layer holds no graph between steps.
    assert m._collectors == []


def test_topk_gates_renormalised_and_router_in_fp32_under_autocast():
    m = MoEMlp(D, H, num_experts=6, router="topk", top_k=3)
    x = torch.randn(2, 4, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = m.router(x)
        y = m(x)
    assert r.probs_TE.dtype == torch.float32 and r.gates_TK.dtype == torch.float32
    torch.testing.assert_close(r.gates_TK.sum(-1), torch.ones(8))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("noise", ["jitter", "gaussian"])
def test_router_noise_only_in_training(noise):
    m = MoEMlp(D, H, num_experts=4, router="topk", top_k=2, router_noise=noise, jitter_eps=0.5)
    x = torch.randn(2, 8, D)
    m.eval()
    a, b = m.router(x), m.router(x)
    torch.testing.assert_close(a.probs_TE, b.probs_TE, rtol=0, atol=0)
    m.train()
    c, d = m.router(x), m.router(x)
    assert not torch.equal(c.probs_TE, d.probs_TE)


def test_random_routing_uniform_token_granularity():
    E, T = 8, 40000
    g = torch.Generator().manual_seed(123)
    m = MoEMlp(D, H, num_experts=E, router="random", random_granularity="token")
    m.router.generator = g
    r = m.router(torch.zeros(1, T, D))
    counts = torch.bincount(r.experts_TK.view(-1), minlength=E).double()
    chi2 = float(((counts - T / E) ** 2 / (T / E)).sum())
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001
    assert r.aux is None and not list(m.router.parameters())


def test_random_routing_top2_distinct_and_sample_granularity():
    m = MoEMlp(D, H, num_experts=5, router="random", top_k=2, random_granularity="sample")
    r = m.router(torch.zeros(6, 3, D))
    e = r.experts_TK.view(6, 3, 2)
    assert (e[..., 0] != e[..., 1]).all()
    assert (e == e[:, :1]).all()  # every token of an image shares its image's draw
    torch.testing.assert_close(r.gates_TK, torch.full((18, 2), 0.5))


def test_random_batch_granularity_one_expert_per_forward():
    m = make("random", E=4)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    seen = set()
    for _ in range(20):
        with collect_moe_outputs(m) as moe:
            y = m(x)
        load = moe.stats()[""]["load"]
        assert int((load > 0).sum()) == 1 and float(load.sum()) == 15
        j = int(load.argmax())
        seen.add(j)
        e = m.experts
        ref = torch.nn.functional.gelu(x @ e.w1[j] + e.b1[j]) @ e.w2[j] + e.b2[j]
        torch.testing.assert_close(y, ref)
    assert seen == {0, 1, 2, 3}


def test_eval_modes_of_random_routing():
    m = make("random", E=3)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    e = m.experts
    m.eval()
    merged = torch.nn.functional.gelu(x @ e.w1.mean(0) + e.b1.mean(0)) @ e.w2.mean(0) + e.b2.mean(0)
    torch.testing.assert_close(m(x), merged)
    m.eval_mode = "ensemble"
    outs = [torch.nn.functional.gelu(x @ e.w1[j] + e.b1[j]) @ e.w2[j] + e.b2[j] for j in range(3)]
    torch.testing.assert_close(m(x), torch.stack(outs).mean(0))
    m.eval_mode = "random"
    assert any(torch.allclose(m(x), o) for o in outs)


def test_merged_cache_follows_weight_updates():
    m = make("random", E=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        before = m(x)
        assert torch.equal(m(x), before)  # served from the cache
    m.train()
    m(x).sum().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)
    e = m.experts
    ref = torch.nn.functional.gelu(x @ e.w1.mean(0) + e.b1.mean(0)) @ e.w2.mean(0) + e.b2.mean(0)
    torch.testing.assert_close(after, ref)
    assert not torch.allclose(after, before)


def test_shared_init_makes_identical_experts_and_moe_equals_merged():
    m = MoEMlp(D, H, num_experts=4, router="switch", expert_init="shared")
    assert all(torch.equal(m.experts.w1[0], m.experts.w1[j]) for j in range(4))
    x = torch.randn(2, 6, D)
    routed = m(x)
    gates = m.router(x).gates_TK.view(2, 6, 1)
    m2 = MoEMlp(D, H, num_experts=4, router="random", expert_init="shared")
    m2.load_state_dict(m.state_dict(), strict=False)
    m2.eval()
    torch.testing.assert_close(routed, gates * m2(x))
    ind = MoEMlp(D, H, num_experts=4, expert_init="independent")
    assert not torch.equal(ind.experts.w1[0], ind.experts.w1[1])


def test_usage_is_counted_in_training_only():
    m = MoEMlp(D, H, num_experts=4, router="switch")
    m(torch.randn(2, 5, D))
    assert float(m.usage.sum()) == 10
    m.eval()
    m(torch.randn(2, 5, D))
    assert float(m.usage.sum()) == 10


@pytest.mark.parametrize("kwargs,field", [
    (dict(router="nope"), "router"), (dict(router="switch", top_k=2), "top_k"),
    (dict(eval_mode="avg"), "eval_mode"), (dict(expert_init="x"), "expert_init"),
    (dict(router="random", random_granularity="pixel"), "random_granularity"),
    (dict(router_noise="loud"), "noise"), (dict(dispatch="fast"), "dispatch"),
    (dict(capacity_factor_train=-1.0), "capacity_factor_train"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEMlp(D, H, num_experts=4, **kwargs)


def test_grouped_path_pads_unaligned_widths_and_matches_padded_path():
    # 12 and 20 bf16 columns are 24- and 40-byte rows, which _grouped_mm rejects: the grouped
    # path zero-pads them; outputs and every gradient must equal the padded-bmm path's.
    torch.manual_seed(0)
    grouped = MoEMlp(12, 20, num_experts=3, router="topk", top_k=2, dispatch="grouped", expert_init="independent")
    padded = MoEMlp(12, 20, num_experts=3, router="topk", top_k=2, dispatch="padded")
    padded.load_state_dict(grouped.state_dict())
    grouped, padded = grouped.to(torch.bfloat16), padded.to(torch.bfloat16)
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    outs = []
    for m in (grouped, padded):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (yg, xg, gg), (yp, xp, gp) = outs
    assert yg.shape == (2, 5, 12)
    torch.testing.assert_close(yg, yp, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(xg, xp, atol=2e-2, rtol=2e-2)
    assert gg.keys() == gp.keys()
    for name in gg:
        assert gg[name].shape == gp[name].shape, name
        torch.testing.assert_close(gg[name], gp[name], atol=3e-2, rtol=3e-2, msg=name)


def test_bucket_sizes_are_few_and_waste_at_most_an_eighth():
    from vitmoe.moe.experts import _bucket

    sizes = _bucket(torch.arange(5000)).tolist()
    assert sizes[0] == 0 and sizes[1] == 8 and sizes[16] == 16 and sizes[17] == 18 and sizes[800] == 832
    assert all(b >= r for r, b in enumerate(sizes)) and sizes == sorted(sizes)
    assert all(b - r <= r / 8 for r, b in enumerate(sizes) if r > 16)
    # Whatever the routing gives an expert between 1 and 4,999 rows, its matmul takes one of 68
    # shapes (8 per octave; a new shape is a new oneDNN primitive, built and JIT-compiled).
    assert len(set(sizes[1:])) == 68


@pytest.mark.parametrize("router,k,E", [("switch", 1, 16), ("topk", 2, 6), ("expert_choice", 1, 4)])
def test_rounded_rows_change_nothing_but_the_shapes(router, k, E):
    # bf16 on the CPU rounds each expert's rows up (zero rows, dropped after the matmuls): outputs
    # and every gradient equal the unrounded computation bit for bit, experts with no row included.
    torch.manual_seed(0)
    m = MoEMlp(300, 96, num_experts=E, router=router, top_k=k, expert_init="independent",
               **({"capacity_factor_train": 1.0, "capacity_factor_eval": 1.0} if router == "expert_choice" else {}))
    with torch.no_grad():
        m.experts.b1.normal_()
        m.experts.b2.normal_()
    plain = copy.deepcopy(m)
    m.experts.bucket_rows, plain.experts.bucket_rows = None, False
    x = torch.randn(1, 10, 300)  # 10 tokens: some of 16 experts get none
    outs = []
    for layer in (m, plain):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16), collect_moe_outputs(layer) as moe:
            y = layer(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}, moe.stats()[""]["load"]))
    (y1, g1, p1, load), (y2, g2, p2, _) = outs
    assert m.experts._bucket_rows(y1.new_empty(0, dtype=torch.bfloat16))  # the default rounds here
    if router == "switch":
        assert (load == 0).any() and (load % 8 != 0).any()  # empty experts and uneven counts occur
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert p1.keys() == p2.keys()
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name


@pytest.mark.parametrize("dispatch_path", ["grouped", "padded"])
def test_autocast_bf16_runs_the_experts_in_bf16_and_keeps_fp32_master_grads(dispatch_path):
    # _grouped_mm and bmm on stacked weights are not on autocast's cast lists: the layer casts
    # for them, so the experts pay bf16 prices like the dense layers around them.
    torch.manual_seed(0)
    m = MoEMlp(300, 64, num_experts=4, router="switch", dispatch=dispatch_path, expert_init="independent")
    x = torch.randn(2, 9, 300)
    seen = []
    hook = m.experts.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        y = m(x)
    hook.remove()
    assert seen == [torch.bfloat16] and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    ref = m(x)
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
