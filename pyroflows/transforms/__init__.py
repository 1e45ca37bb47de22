"""Every invertible layer of pyroflows, as Pyro ``TransformModule`` objects.

Each family lives in its own module; this package re-exports the public
classes and their lowercase helpers (Pyro's convention: ``helper(input_dim,
**kw)`` returns a ready layer, ``conditional_helper(input_dim, context_dim,
**kw)`` a conditional one).  ``__all__`` lists them all, and the exactness
harness in ``tests/`` walks it.  As in Pyro, a helper may share its name with
its module (``elementwise``); import from the module with ``from ... import``.
"""

import importlib as _importlib

from .base import Bijector, ConditionalBijector, ConditionedBijector

_FAMILIES = ["elementwise", "linear", "normalization", "residual", "planar", "permutation", "coupling",
             "autoregressive", "neural_autoregressive", "polynomial", "block_autoregressive",
             "matrix_exponential", "continuous", "image", "multiscale", "compose"]

__all__ = ["Bijector", "ConditionalBijector", "ConditionedBijector"]
for _name in _FAMILIES:
    _module = _importlib.import_module(f".{_name}", __name__)
    for _public in _module.__all__:
        globals()[_public] = getattr(_module, _public)
    __all__ += _module.__all__
del _name, _module, _public
