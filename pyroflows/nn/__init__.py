"""Conditioner networks: the ``theta = c(...)`` half of every flow."""

from .mlp import MLP
from .spectral import LipschitzMLP, LipSwish, SpectralLinear

__all__ = ["MLP", "LipSwish", "LipschitzMLP", "SpectralLinear"]
