import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A width every preset accepts, small enough that a forward/backward takes milliseconds.
TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16)


def grads(m, x, fn):
    """(output, input grad, grads of the parameters that got one) of `fn(x)` against a fixed
    float64 upstream gradient, so runs in different dtypes see the same numbers."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
