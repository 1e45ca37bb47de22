"""A plain multi-layer perceptron, the default conditioner."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP"]


class _InPlaceReLU(nn.ReLU):
    """``nn.ReLU(inplace=True)``, out of place while ``torch.jit`` traces (Pyro's
    ``JitTrace_ELBO``): the traced graph's interpreter rejects the in-place op on the first
    layer's output."""

    def __init__(self):
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x, inplace=not torch.jit.is_tracing())


def hidden_activation(activation: type[nn.Module]) -> nn.Module:
    """An instance of ``activation`` for a hidden layer; ``nn.ReLU`` acts in place (its input, a
    fresh ``Linear`` output, is not needed again, and autograd keeps the ReLU's output): no new
    tensor, one pass over memory that is still in cache."""
    return _InPlaceReLU() if activation is nn.ReLU else activation()


class MLP(nn.Sequential):
    r"""Multi-layer perceptron :math:`\mathbb{R}^{n_{in}} \to \mathbb{R}^{n_{out}}`.

    ``Linear -> activation`` for each hidden width, then a final ``Linear``.
    With ``zero_init=True`` the final layer starts at zero, so a flow whose
    parameters it produces starts at its transformer's identity parameters
    (added as an offset by the layer), the usual stable initialisation.

    Args:
        in_features, out_features: input and output widths.
        hidden: widths of the hidden layers (default ``(64, 64)``).
        activation: an ``nn.Module`` class (default ``nn.ReLU``).
        zero_init: start the output layer at zero.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64),
                 activation: type[nn.Module] = nn.ReLU, zero_init: bool = True):
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), hidden_activation(activation)]
        last = nn.Linear(widths[-1], out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
