"""pyroflows: normalizing flows as native Pyro transforms."""

from . import transforms
from .flow import Flow

__version__ = "0.1.0"
__all__ = ["Flow", "transforms", "__version__"]
