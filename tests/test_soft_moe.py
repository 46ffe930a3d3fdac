"""Soft MoE layer against a naive float64 reference (loops over images and slots)."""
import copy

import pytest
import torch
from conftest import grads
import torch.nn.functional as F

from vitmoe.moe import SoftMoE, collect_moe_outputs

D, H = 12, 20


def make(E=3, s=2, path="padded"):
    m = SoftMoE(D, H, num_experts=E, slots_per_expert=s, expert_init="independent", dispatch=path).double()
    with torch.no_grad():
        m.experts.b1.normal_()
        m.experts.b2.normal_()
    return m


def naive_soft(m, x_BND):
    """Per image: slot m = sum_n softmax_n(x phi)[n, m] x_n; y_n = sum_m softmax_m(x phi)[n, m] f_{m//s}(slot_m)."""
    e, s = m.experts, m.slots_per_expert
    out = []
    for x in x_BND:  # one image: [N, D]
        logits = x @ m.phi
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        ys = []
        for j in range(logits.shape[1]):
            slot = (dispatch[:, j, None] * x).sum(0)
            k = j // s
            ys.append(F.gelu(slot @ e.w1[k] + e.b1[k]) @ e.w2[k] + e.b2[k])
        out.append(combine @ torch.stack(ys))
    return torch.stack(out)


def test_dispatch_and_combine_weights_are_distributions():
    m = make(E=4, s=2)
    x = torch.randn(3, 7, D, dtype=torch.float64) * 3
    dispatch_BNM, combine_BNM = m.weights(x)
    assert dispatch_BNM.shape == combine_BNM.shape == (3, 7, 8)
    torch.testing.assert_close(dispatch_BNM.sum(1), torch.ones(3, 8, dtype=torch.float64))  # each slot: over tokens
    torch.testing.assert_close(combine_BNM.sum(2), torch.ones(3, 7, dtype=torch.float64))  # each token: over slots
    assert (dispatch_BNM > 0).all() and (combine_BNM > 0).all()


@pytest.mark.parametrize("path", ["padded", "grouped"])
@pytest.mark.parametrize("E,s", [(3, 1), (3, 2), (1, 4)])
def test_matches_naive_reference_in_output_and_gradients(path, E, s):
    ref = make(E, s)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    # No float64 grouped kernel: that path runs in float32 against the float64 reference.
    m, tol = (ref, 1e-10) if path == "padded" else (copy.deepcopy(ref).float(), 2e-5)
    m.experts.dispatch_path = path
    with collect_moe_outputs(m) as moe:
        y, gx, gp = grads(m, x.to(m.phi.dtype), m)
    y_ref, gx_ref, gp_ref = grads(ref, x, lambda x: naive_soft(ref, x))
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=tol, atol=tol)
    assert set(gp) == {"phi", "experts.w1", "experts.b1", "experts.w2", "experts.b2"}
    for name in gp:
        torch.testing.assert_close(gp[name].double(), gp_ref[name], rtol=tol, atol=tol, msg=name)
    assert moe.layer_aux() == {"": {}} and float(moe.aux_loss()) == 0  # no aux loss
    stats = moe.stats()[""]
    assert stats["load"].tolist() == [2.0 * s] * E and float(stats["dropped_frac"]) == 0


def test_permutation_equivariant_over_tokens_and_images_independent():
    m = make(E=4, s=2)
    x = torch.randn(3, 9, D, dtype=torch.float64)
    perm = torch.randperm(9)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], rtol=1e-12, atol=1e-12)
    # Slots mix only their own image's tokens: an image's output ignores the rest of the batch.
    torch.testing.assert_close(m(x[1:2]), m(x)[1:2], rtol=1e-12, atol=1e-12)


def test_router_math_in_fp32_under_autocast_and_bad_arguments():
    # Width 16: bf16 rows of torch._grouped_mm must be 16-byte aligned (D=12, H=20 are not).
    m = SoftMoE(16, 32, num_experts=2)
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d, c = m.weights(x)
        y = m(x)
    assert d.dtype == c.dtype == torch.float32 and y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(D, H, num_experts=2, slots_per_expert=0)
