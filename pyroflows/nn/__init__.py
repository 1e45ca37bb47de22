"""Conditioner networks: the ``theta = c(...)`` half of every flow."""

from .conv import ConvNet
from .made import MADE, MaskedLinear
from .mlp import MLP
from .spectral import LipschitzMLP, LipSwish, SpectralLinear

__all__ = ["MADE", "MLP", "ConvNet", "LipSwish", "LipschitzMLP", "MaskedLinear", "SpectralLinear"]
