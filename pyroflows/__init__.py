"""pyroflows: normalizing flows as native Pyro transforms."""

from . import flows, infer, nn, transforms
from .flow import Flow

__version__ = "0.1.0"
__all__ = ["Flow", "__version__", "flows", "infer", "nn", "transforms"]
