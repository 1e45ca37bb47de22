"""A small convolutional network: the conditioner of image coupling layers."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvNet"]


class ConvNet(nn.Sequential):
    r"""Convolutional network :math:`(\ldots, C_{in}, H, W) \to (\ldots, C_{out}, H, W)`.

    Glow's coupling network (Kingma & Dhariwal, 2018): a 3x3 convolution, 1x1
    convolutions for the further hidden layers, and a 3x3 output convolution,
    all with "same" padding so the spatial size is kept.  With
    ``zero_init=True`` the output layer starts at zero, so the coupling layer
    it feeds starts at its transformer's identity.  Any leading batch
    dimensions are allowed (flattened for ``conv2d`` and restored).

    Args:
        in_channels, out_channels: channel counts of input and output.
        hidden_channels: widths of the hidden layers (default ``(64, 64)``).
        activation: an ``nn.Module`` class (default ``nn.ReLU``).
        zero_init: start the output layer at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: Sequence[int] = (64, 64),
                 activation: type[nn.Module] = nn.ReLU, zero_init: bool = True):
        widths = [in_channels, *hidden_channels]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            k = 3 if i == 0 else 1
            layers += [nn.Conv2d(a, b, k, padding=k // 2), activation()]
        last = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        y = super().forward(x.reshape(-1, *x.shape[-3:]))
        return y.reshape(*batch, *y.shape[-3:])
