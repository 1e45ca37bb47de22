"""pyroflows: normalizing flows as native Pyro transforms."""

from . import data, flows, infer, nn, train, transforms
from .flow import Flow, StudentTBase, TailMixtureBase

__version__ = "0.1.0"
__all__ = ["Flow", "StudentTBase", "TailMixtureBase", "__version__", "data", "flows", "infer", "nn", "train", "transforms"]
