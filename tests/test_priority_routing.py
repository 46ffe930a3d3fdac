"""Batch Prioritized Routing (V-MoE): which copies an overflowing expert keeps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitmoe.moe import MoEMlp
from vitmoe.moe.dispatch import dispatch
from vitmoe.validation import ConfigError


def kept_reference(probs_TE, k: int, capacity: int, priority: str) -> set[tuple[int, int]]:
    """A float64 transcription of the V-MoE paper's procedure: every token's top-k experts; for
    each choice level in turn (all first choices before any second choice), visit the tokens by
    descending largest probability ("score") or by position, and keep a copy while its expert
    has a free slot. Returns the kept (token, level) pairs."""
    probs = probs_TE.double().tolist()
    T, E = len(probs), len(probs[0])
    choices = [sorted(range(E), key=lambda e: -p[e])[:k] for p in probs]
    order = sorted(range(T), key=lambda t: -max(probs[t])) if priority == "score" else list(range(T))
    used, kept = [0] * E, set()
    for level in range(k):
        for t in order:
            e = choices[t][level]
            if used[e] < capacity:
                used[e] += 1
                kept.add((t, level))
    return kept


def kept_pairs(d, T: int) -> set[tuple[int, int]]:
    """(token, level) of the copies a Dispatch keeps: rows below kept_E.sum()."""
    n = int(d.kept_E.sum())
    tokens, experts = d.token_S[:n].tolist(), d.expert_S[:n].tolist()
    return {(t, e) for t, e in zip(tokens, experts)}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_score_priority_keeps_what_the_float64_transcription_keeps(k, capacity):
    torch.manual_seed(k * 10 + capacity)
    T, E = 24, 4
    probs_TE = torch.randn(T, E, dtype=torch.float64).mul(2).softmax(-1).float()
    gates_TK, experts_TK = probs_TE.topk(k, dim=-1)
    for priority in ("position", "score"):
        d = dispatch(gates_TK, experts_TK, E, capacity,
                     priority_T=probs_TE.amax(-1) if priority == "score" else None)
        ref = kept_reference(probs_TE, k, capacity, priority)
        want = {(t, int(experts_TK[t, level])) for t, level in ref}
        assert kept_pairs(d, T) == want, priority
        assert int(d.dropped) == T * k - len(ref)


def test_score_priority_keeps_the_most_confident_tokens_of_one_expert():
    # Six tokens all choose expert 0 (capacity 2): BPR keeps the two with the largest probability.
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.7, 0.3], [0.55, 0.45]])
    experts = torch.zeros(6, 1, dtype=torch.int64)
    d = dispatch(probs[:, :1], experts, 2, 2, priority_T=probs.amax(-1))
    assert sorted(d.token_S[:2].tolist()) == [1, 3]
    d = dispatch(probs[:, :1], experts, 2, 2)
    assert d.token_S[:2].tolist() == [0, 1]


@pytest.mark.parametrize("router,k", [("switch", 1), ("topk", 2)])
def test_score_priority_changes_nothing_when_nothing_overflows(router, k):
    torch.manual_seed(0)
    a = MoEMlp(16, 32, num_experts=4, router=router, top_k=k, capacity_factor_train=4.0)
    b = MoEMlp(16, 32, num_experts=4, router=router, top_k=k, capacity_factor_train=4.0, priority="score")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    # Same copies kept and same output; rows reach the expert matmuls in another order, which
    # may round differently in the last bit.
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-7)
    ra, rb = a.router(x, a.capacity(12)), b.router(x, b.capacity(12))
    assert ra.priority_T is None and rb.priority_T is not None
    da = dispatch(ra.gates_TK, ra.experts_TK, 4, a.capacity(12))
    db = dispatch(rb.gates_TK, rb.experts_TK, 4, b.capacity(12), priority_T=rb.priority_T)
    assert int(da.dropped) == int(db.dropped) == 0 and kept_pairs(da, 12) == kept_pairs(db, 12)


def test_layer_output_with_score_priority_equals_a_float64_reference():
    torch.manual_seed(3)
    T, D, H, E, C = 12, 8, 16, 3, 2
    m = MoEMlp(D, H, num_experts=E, router="topk", top_k=2, capacity_factor_train=C * E / (2 * T),
               priority="score", expert_init="independent").double()
    assert m.capacity(T) == C
    x = torch.randn(1, T, D, dtype=torch.float64)
    y = m(x)[0]
    probs = (x[0] @ m.router.weight.t()).softmax(-1)
    gates, experts = probs.topk(2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    w1, b1, w2, b2 = (p.detach() for p in (m.experts.w1, m.experts.b1, m.experts.w2, m.experts.b2))
    want = torch.zeros(T, D, dtype=torch.float64)
    for t, level in kept_reference(probs, 2, C, "score"):
        e = int(experts[t, level])
        want[t] += gates[t, level] * (F.gelu(x[0, t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
    # The router scores in fp32 whatever the input dtype (its probabilities agree to ~1e-8).
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-8)


def test_score_priority_needs_a_scoring_router():
    with pytest.raises(ConfigError, match="priority"):
        MoEMlp(8, 16, num_experts=4, router="random", priority="score")
    with pytest.raises(ConfigError, match="priority"):
        MoEMlp(8, 16, num_experts=4, priority="bogus")
