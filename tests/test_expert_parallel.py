"""Expert parallelism on gloo CPU processes: EP=2 equals EP=1, in outputs and gradients."""
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_workers

from vitmoe.moe import MoEMlp, SoftMoE
from vitmoe.moe.parallel import ExpertParallel, init_expert_parallel
from vitmoe.training.distributed.expert_parallel import (
    expert_param_names, full_state_dict, local_state_dict, reduce_expert_grads, shard_experts,
)

D, H, E = 8, 12, 4
CASES = {
    "top1": dict(router="switch"),
    "top2-capacity": dict(router="topk", top_k=2, capacity_factor_train=1.0),
    "random-token": dict(router="random", random_granularity="token"),
    "random-batch": dict(router="random", random_granularity="batch"),
    "expert-choice": dict(router="expert_choice", capacity_factor_train=1.0, capacity_factor_eval=1.0),
    # threshold 1.0: every second copy unsent, so EP must skip them in its counts and exchange
    "top2-threshold": dict(router="topk", top_k=2, second_policy="random", second_threshold=1.0,
                           capacity_factor_train=1.0),
}


def _layer(kw):
    torch.manual_seed(0)  # identical on every rank: EP slices one whole layer
    m = MoEMlp(D, H, num_experts=E, expert_init="independent", **kw).double()
    with torch.no_grad():
        m.experts.b1.normal_(); m.experts.b2.normal_()
    return m


def _run(m, x, seed):
    if hasattr(m.router, "generator"):
        m.router.generator = torch.Generator().manual_seed(seed)
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _ep_vs_local(rank, world, case):
    kw = CASES[case]
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
    ref = _layer(kw)
    y_ref, gx_ref, g_ref = _run(ref, x, seed=7)

    m = _layer(kw)
    ep = init_expert_parallel(world)
    shard_experts(m, ep)
    assert m.experts.w1.shape[0] == E // world
    y, gx, g = _run(m, x, seed=7)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    if "router.weight" in g_ref:  # dense: this rank's own loss only
        torch.testing.assert_close(g["router.weight"], g_ref["router.weight"])
    # Expert grads: the owner sums every rank's contribution to its experts.
    start, n = ep.local_range(E)
    for p in ("w1", "b1", "w2", "b2"):
        total = g_ref.get(f"experts.{p}", torch.zeros_like(getattr(ref.experts, p))).clone()
        dist.all_reduce(total)
        got = g.get(f"experts.{p}", torch.zeros_like(getattr(m.experts, p)))
        torch.testing.assert_close(got, total[start:start + n], rtol=1e-12, atol=1e-12)
    # And the averaged grads match DDP's convention (mean over ranks).
    reduce_expert_grads(m, world)
    if "experts.w1" in g:
        torch.testing.assert_close(m.experts.w1.grad, total_w1(g_ref, ref)[start:start + n] / world)
    # Whole-expert state: identical to the unsharded layer's, and slices back exactly.
    full = full_state_dict(m)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)
    assert set(local_state_dict(m, full)) == set(m.state_dict())
    m.load_state_dict(local_state_dict(m, full))
    assert expert_param_names(m) == [f"experts.{p}" for p in ("w1", "b1", "w2", "b2")]
    # Eval through gathered weights equals the unsharded layer.
    m.eval(); ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)


def total_w1(g_ref, ref):
    t = g_ref.get("experts.w1", torch.zeros_like(ref.experts.w1)).clone()
    dist.all_reduce(t)
    return t


@pytest.mark.parametrize("case", list(CASES))
def test_ep2_equals_ep1(case):
    run_workers(_ep_vs_local, 2, case, timeout=120)


def test_expert_parallel_refuses_soft_moe():
    with pytest.raises(ValueError, match="Soft MoE"):
        shard_experts(SoftMoE(D, H, num_experts=4), ExpertParallel(size=2, rank=0, group=None, replica_group=None))
