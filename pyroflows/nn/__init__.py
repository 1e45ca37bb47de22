"""Conditioner networks: the ``theta = c(...)`` half of every flow."""

from .made import MADE, MaskedLinear
from .mlp import MLP

__all__ = ["MADE", "MLP", "MaskedLinear"]
