r"""Composition: one loop through a list of layers, for both directions.

:class:`Composed` is a plain Pyro ``Transform`` over a list of transforms
(pyroflows layers, layers bound to a context, or any Pyro/torch transform);
:class:`ComposedModule` is the same as an ``nn.Module`` that owns its layers
(Pyro's ``ComposeTransformModule``), with ``condition(context)`` when some
layers are conditional.  Both run every pass through :func:`cascade`, built on
each layer's public ``call_and_ladj`` / ``inverse_and_ladj`` (nflows'
``_cascade``, zuko's composed ``call_and_ladj``):

.. math::

    f = f_K \circ \dots \circ f_1, \qquad
    \log|\det J_f(x)| = \sum_k \log|\det J_{f_k}(x_{k-1})|.

``cache=False`` recomputes every layer (no cached pass is read or written):
what a density evaluated under swapped-in parameters needs (AutoFlow's
path-derivative estimator uses ``torch.func.functional_call``).
"""

from __future__ import annotations

import itertools

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import identity_transform
from torch.distributions.utils import _sum_rightmost

from .base import CachedPasses, TensorList

__all__ = ["Composed", "ComposedModule", "identity_transform", "iterated"]


def _composed_domain(parts):
    """The domain of ``parts[-1] o ... o parts[0]`` with torch's event-dim rule."""
    domain = parts[0].domain
    event_dim = parts[-1].codomain.event_dim
    for part in reversed(parts):
        event_dim = max(event_dim + part.domain.event_dim - part.codomain.event_dim, part.domain.event_dim)
    return constraints.independent(domain, event_dim - domain.event_dim) if event_dim > domain.event_dim else domain


def _composed_codomain(parts):
    codomain = parts[-1].codomain
    event_dim = parts[0].domain.event_dim
    for part in parts:
        event_dim = max(event_dim + part.codomain.event_dim - part.domain.event_dim, part.codomain.event_dim)
    if event_dim > codomain.event_dim:
        return constraints.independent(codomain, event_dim - codomain.event_dim)
    return codomain


def _step(t, v, inverse: bool, cache: bool):
    """One layer's ``(output, log|det J|)``, through its public pass when it has one."""
    # ours, by type: other libraries (zuko) patch a ``call_and_ladj`` of their own onto torch's Transform
    if isinstance(t, CachedPasses):
        return t.inverse_and_ladj(v, cache=cache) if inverse else t.call_and_ladj(v, cache=cache)
    if not cache:  # any other Pyro / torch transform, without its cache
        try:
            t = t.with_cache(0)
        except NotImplementedError:
            pass
    if inverse:
        x = t.inv(v)
        return x, t.log_abs_det_jacobian(x, v)
    y = t(v)
    return y, t.log_abs_det_jacobian(v, y)


def cascade(parts, v, event_dim: int, *, inverse: bool = False, cache: bool = True):
    """Run ``v`` through ``parts`` (in reverse for ``inverse``), summing the log-determinants,
    each reduced to the composition's ``event_dim`` (that of its domain, or of its codomain
    for ``inverse``).  Returns ``(output, log|det J|)`` of the forward composition."""
    total = None
    for t in reversed(parts) if inverse else parts:
        v, ladj = _step(t, v, inverse, cache)
        d_in, d_out = (t.codomain.event_dim, t.domain.event_dim) if inverse else (t.domain.event_dim,
                                                                                   t.codomain.event_dim)
        ladj = _sum_rightmost(ladj, event_dim - d_in)
        total = ladj if total is None else total + ladj
        event_dim += d_out - d_in
    if total is None:  # no parts: the identity
        total = v.new_zeros(v.shape[: v.dim() - event_dim])
    return v, total


def _dependencies(t):
    """The tensors a cached pass of ``t`` depends on."""
    if hasattr(t, "_cache_dependencies"):
        return t._cache_dependencies()
    if isinstance(t, nn.Module):
        return (*t.parameters(), *t.buffers())
    return ()


def _training(t):
    if hasattr(t, "_training_flag"):
        return t._training_flag()
    return getattr(t, "training", None)


class _Cascade(CachedPasses):
    """Passes, cache and Pyro interface of a composition; subclasses provide ``_steps()``."""

    bijective = True

    def _forward_pass(self, x):
        return cascade(self._steps(), x, self.domain.event_dim)

    def _inverse_pass(self, y):
        return cascade(self._steps(), y, self.codomain.event_dim, inverse=True)

    def call_and_ladj(self, x, *, cache: bool = True):
        """``(y, log|det dy/dx|)`` through every layer (see :func:`cascade`)."""
        if not cache:
            return cascade(self._steps(), x, self.domain.event_dim, cache=False)
        return super().call_and_ladj(x)

    def inverse_and_ladj(self, y, *, cache: bool = True):
        """``(x, log|det dy/dx|)`` through every layer in reverse (see :func:`cascade`)."""
        if not cache:
            return cascade(self._steps(), y, self.codomain.event_dim, inverse=True, cache=False)
        return super().inverse_and_ladj(y)

    def _cache_dependencies(self):
        return tuple(itertools.chain.from_iterable(_dependencies(t) for t in self._steps()))

    def _caching(self) -> bool:
        # a layer set to cache nothing (``with_cache(0)``) is never bypassed through the composition
        return self._cache_size != 0 and all(getattr(t, "_cache_size", 1) != 0 for t in self._steps())

    def _lookup(self, *, x=None, y=None):
        return super()._lookup(x=x, y=y) if self._caching() else None

    def _store(self, x, y, ladj):
        if self._caching():
            super()._store(x, y, ladj)

    def _training_flag(self):
        return tuple(_training(t) for t in self._steps())

    def forward_shape(self, shape):
        """The output shape: each part's ``forward_shape`` in turn (a squeeze reshapes the event)."""
        for t in self._steps():
            shape = t.forward_shape(shape)
        return shape

    def inverse_shape(self, shape):
        for t in reversed(self._steps()):
            shape = t.inverse_shape(shape)
        return shape

    @property
    def sign(self):
        sign = 1
        for t in self._steps():
            sign = sign * t.sign
        return sign

    @property
    def event_shape(self):
        """The event shape of the layers that carry one (the longest; elementwise
        layers on any shape carry ``()``), or ``None``."""
        parts = self.parts if isinstance(self, ComposedModule) else self._steps()
        shapes = [tuple(t.event_shape) for t in parts if getattr(t, "event_shape", None) is not None]
        return max(shapes, key=len) if shapes else None


class Composed(_Cascade, torch.distributions.Transform):
    """The composition ``parts[-1] o ... o parts[0]`` of a list of transforms, as one Pyro
    ``Transform`` (what ``Flow.transform(context)`` returns).  Its passes and cache are
    those of :func:`cascade`; ``TransformedDistribution(base, [composed])`` works."""

    def __init__(self, parts, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("Composed needs at least one transform")
        self.domain = _composed_domain(self.parts)
        self.codomain = _composed_codomain(self.parts)

    def _steps(self):
        return self.parts

    def with_cache(self, cache_size=1):
        return Composed(self.parts, cache_size)

    def __hash__(self):
        return object.__hash__(self)


class _Held(nn.Module):
    """A parameter-free, non-module transform (``ExpTransform`` ...) kept in a ``ModuleList`` slot."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def extra_repr(self):
        return repr(self.transform)


class ComposedModule(_Cascade, TensorList, TransformModule):
    """An ``nn.Module`` owning a list of transforms, composed as :class:`Composed`
    (Pyro's ``ComposeTransformModule``, and ``ConditionalComposeTransformModule``
    through :meth:`condition`).  Every transform is kept: parameter-free ones that
    are not modules sit in the module list inside a holder; :attr:`parts` lists
    them all, in order."""

    def __init__(self, parts, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        parts = list(parts)
        if not parts:
            raise ValueError("ComposedModule needs at least one transform")
        for t in parts:
            if not isinstance(t, (torch.distributions.Transform, ConditionalTransform)):
                raise TypeError(f"expected Pyro/torch transforms, got {type(t).__name__}")
        self.steps = nn.ModuleList(t if isinstance(t, nn.Module) else _Held(t) for t in parts)
        self.is_conditional = any(isinstance(t, ConditionalTransform) for t in parts)
        self.context_dim = next((t.context_dim for t in parts if getattr(t, "context_dim", None) is not None), None)
        if not self.is_conditional:
            self.domain = _composed_domain(parts)
            self.codomain = _composed_codomain(parts)

    @property
    def parts(self) -> list:
        """Every transform, in the generative order."""
        return [m.transform if isinstance(m, _Held) else m for m in self.steps]

    def _steps(self):
        if self.is_conditional:
            raise ValueError("this composition has conditional layers: use .condition(context)")
        return self.parts

    def condition(self, context) -> Composed:
        """The composition with every conditional layer bound to ``context``."""
        return Composed([t.condition(context) if isinstance(t, ConditionalTransform) else t for t in self.parts])

    def with_cache(self, cache_size=1):
        self._cache_size = cache_size
        return self

    def __hash__(self):
        return object.__hash__(self)

    __repr__ = nn.Module.__repr__


def iterated(repeats: int, base_fn, *args, **kwargs) -> ComposedModule:
    """Pyro's ``iterated``: ``repeats`` fresh layers ``base_fn(*args, **kwargs)`` composed
    into one :class:`ComposedModule`."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return ComposedModule([base_fn(*args, **kwargs) for _ in range(repeats)])
