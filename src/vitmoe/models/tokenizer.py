"""The convolutional tokenizer of Compact Convolutional Transformers (Hassani et al. 2021,
"Escaping the Big Data Paradigm with Compact Transformers").

`n` layers of Conv2d(k, stride max(1, k//2 - 1), padding max(1, k//2), no bias) -> ReLU ->
MaxPool2d(3, stride 2, padding 1); the layers in between have 64 channels (CCT's `in_planes`),
the last has the model width. The pixels of each output position become one token. Overlapping
kernels and pooling give the transformer a locality prior a patch embedding lacks, which is what
lets CCT train from scratch on small datasets.

`conv_tokenizer_layers` is the one place that defines the layer arithmetic: the module, the
config's token count and the FLOP accounting all read it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

HIDDEN_CHANNELS = 64
"""Channels of every layer but the last (CCT's `in_planes`)."""
POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1


class ConvLayerShape(NamedTuple):
    in_chans: int
    out_chans: int
    kernel: int
    stride: int
    padding: int
    conv_side: int
    """Side of the convolution's output (what its FLOPs scale with)."""
    pooled_side: int
    """Side after the max pooling: the next layer's input."""


def conv_stride_padding(kernel: int) -> tuple[int, int]:
    """CCT's choice: a 3x3 kernel keeps the size (stride 1, padding 1), a 7x7 one halves it."""
    return max(1, kernel // 2 - 1), max(1, kernel // 2)


def _out_side(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


def conv_tokenizer_layers(img_size: int, in_chans: int, embed_dim: int, layers: int, kernel: int) -> list[ConvLayerShape]:
    """Each layer's channels, stride, padding and output sides for `img_size` x `img_size` inputs."""
    stride, padding = conv_stride_padding(kernel)
    chans = [in_chans] + [HIDDEN_CHANNELS] * (layers - 1) + [embed_dim]
    shapes, side = [], img_size
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        conv = _out_side(side, kernel, stride, padding)
        side = _out_side(conv, POOL_KERNEL, POOL_STRIDE, POOL_PADDING)
        shapes.append(ConvLayerShape(c_in, c_out, kernel, stride, padding, conv, side))
    return shapes


class ConvTokenizer(nn.Module):
    """`(B, C, H, W) -> (B, N, D)` with N = side**2 of the last pooled map (e.g. 28x28 with two
    3x3 layers: 7x7 = 49 tokens)."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, layers: int = 1, kernel: int = 3):
        super().__init__()
        self.img_size = img_size
        self.shapes = conv_tokenizer_layers(img_size, in_chans, embed_dim, layers, kernel)
        stages: list[nn.Module] = []
        for s in self.shapes:
            stages += [nn.Conv2d(s.in_chans, s.out_chans, s.kernel, stride=s.stride, padding=s.padding, bias=False),
                       nn.ReLU(), nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE, POOL_PADDING)]
        self.layers = nn.Sequential(*stages)
        for m in self.layers:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # CCT's initialisation (fan-in, ReLU gain)

    @property
    def num_tokens(self) -> int:
        return self.shapes[-1].pooled_side ** 2

    def forward(self, x_BCHW: Tensor) -> Tensor:
        if x_BCHW.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x_BCHW.shape[-2:])}")
        # Channels-last throughout: CPU max pooling over NCHW is a scalar loop (27 against 1.6 ms NHWC
        # for 128 x 64 x 28 x 28 bf16, BENCHMARKS.md s.8), oneDNN's convolutions prefer NHWC, and the
        # NHWC map flattens to (B, N, D) tokens without a copy. The input goes in NHWC strides (cheap:
        # C channels). A contiguous 1-channel image already passes as channels-last, but with NCHW
        # strides, which the convolution reads as NCHW; converting its 64-channel output instead costs
        # a copy forward and backward (4.5 ms of the recipe's step, BENCHMARKS.md s.9), so 1-channel
        # images get the NHWC strides as a view.
        B, C, H, W = x_BCHW.shape
        x = (x_BCHW.reshape(B, H, W, 1).permute(0, 3, 1, 2) if C == 1
             else x_BCHW.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = x.contiguous(memory_format=torch.channels_last)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
