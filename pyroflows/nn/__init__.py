"""Conditioner networks: the ``theta = c(...)`` half of every flow."""

from .made import MADE, MaskedLinear
from .mlp import MLP
from .spectral import LipschitzMLP, LipSwish, SpectralLinear

__all__ = ["MADE", "MLP", "LipSwish", "LipschitzMLP", "MaskedLinear", "SpectralLinear"]
