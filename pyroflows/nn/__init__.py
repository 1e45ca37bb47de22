"""Conditioner networks: the ``theta = c(...)`` half of every flow."""

from .mlp import MLP

__all__ = ["MLP"]
