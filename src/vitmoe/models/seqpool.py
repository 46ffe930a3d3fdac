"""Sequence pooling (Hassani et al. 2021, Compact Convolutional Transformers): the image vector is
an attention-weighted sum of the output tokens, with one learned score per token,
softmax over tokens of Linear(D, 1)(x). It replaces the class token (one token fewer through
every block) and lets the model choose which tokens to read, unlike mean pooling.

The Linear's bias adds the same number to every score, which the softmax cancels: it never
gets a gradient. It is kept so that parameter counts and checkpoints match CCT's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SeqPool(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def weights(self, x_BND: Tensor) -> Tensor:
        """Each token's weight [B, N]; every row sums to 1."""
        return self.attention(x_BND).squeeze(-1).softmax(dim=-1)

    def forward(self, x_BND: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The pooled [B, D], with the weights [B, N] when `return_weights`."""
        w_BN = self.weights(x_BND)
        pooled_BD = torch.einsum("bn,bnd->bd", w_BN.to(x_BND.dtype), x_BND)
        return (pooled_BD, w_BN) if return_weights else pooled_BD
