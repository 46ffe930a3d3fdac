import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A width every preset accepts, small enough that a forward/backward takes milliseconds.
TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16)
