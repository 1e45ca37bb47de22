r"""Autoregressive layers: :math:`\theta_d` is a function of the preceding dimensions.

Prince, *Understanding Deep Learning*, section 16.3.4.  A :class:`~pyroflows.nn.MADE`
computes every :math:`\theta_d` in one pass from the vector it is given; the
Jacobian is triangular, so :math:`\log|\det J| = \sum_d \log g'(\cdot;\theta_d)`.
Which direction is one pass depends on which side the parameters are read
from:

* :class:`MaskedAutoregressive` (MAF) reads them from the data side
  :math:`x = f(z)`: the density direction (inverse) is one pass, sampling
  (forward) is sequential.
* :class:`InverseAutoregressive` (IAF) reads them from the base side
  :math:`z`: sampling (forward) is one pass, the inverse is sequential.  The
  base-class cache makes ``log_prob`` of the flow's own samples free.

The sequential direction iterates :math:`u^{(k+1)} = h(v; \theta(u^{(k)}))`
from :math:`u^{(0)} = 0`: after pass :math:`k` the first :math:`k` dimensions
in the ordering are exact (dimension :math:`d` only reads dimensions before
it), so :math:`D` passes are exact and the last one also gives the exact
log-determinant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn import MADE
from .base import Bijector, ConditionalBijector
from .coupling import default_hidden
from .elementwise import check_input_dim
from .transformers import Transformer, make_transformer, spline_kind

__all__ = [
    "ConditionalInverseAutoregressive",
    "ConditionalMaskedAutoregressive",
    "InverseAutoregressive",
    "MaskedAutoregressive",
    "affine_autoregressive",
    "conditional_affine_autoregressive",
    "conditional_inverse_autoregressive",
    "conditional_masked_autoregressive",
    "conditional_spline_autoregressive",
    "inverse_autoregressive",
    "masked_autoregressive",
    "spline_autoregressive",
]


#: Batch rows from which the sequential direction solves one dimension at a time
#: (:meth:`MADE.solve`); below it, ``D`` whole MADE passes cost less Python.
SOLVE_BY_DIMENSION_MIN_ROWS = 256


class _AutoregressiveMath:
    """One-pass and sequential application of a transformer whose parameters come from a MADE."""

    def _setup(self, transformer: Transformer, made: MADE):
        if made.num_params != transformer.num_params:
            raise ValueError(f"the MADE gives {made.num_params} parameters per dimension but the "
                             f"transformer needs {transformer.num_params}")
        self.transformer = transformer
        self.made = made
        self.event_shape = (made.input_dim,)
        offset = transformer.identity_params()
        self.register_buffer("param_offset", offset if bool(offset.ne(0).any()) else None)

    def _params(self, u, context):
        params = self.made(u, context)
        if self.param_offset is not None:
            params = params + self.param_offset
        return params

    def _one_pass(self, v, context, transform):
        """Parameters read from ``v`` itself: ``(transform(v; theta(v)), ladj)``."""
        out, ladj = transform(v, self._params(v, context))
        return out, ladj.sum(-1)

    def _sequential(self, v, context, transform):
        """Solve ``u = transform(v; theta(u))`` for ``u``.  Without gradients, one dimension at a
        time with each MADE hidden unit computed once (:meth:`MADE.solve`); with gradients (or
        under ``torch.compile``), ``D`` whole MADE passes (fewer when ``D == 1``), each exact for
        one more dimension."""
        if (v[..., 0].numel() >= SOLVE_BY_DIMENSION_MIN_ROWS and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and _needs_grad(self, v, context))):
            return self._solve_by_dimension(v, context, transform)
        u, ladj = transform(v, self._params(torch.zeros_like(v), context))
        for _ in range(self.made.input_dim - 1):
            u, ladj = transform(v, self._params(u, context))
        return u, ladj.sum(-1)

    def _solve_by_dimension(self, v, context, transform):
        offset = self.param_offset
        ladj = []

        def step(d, params):
            if offset is not None:
                params = params + offset
            u_d, ladj_d = transform(v[..., d : d + 1], params.unsqueeze(-2))
            ladj.append(ladj_d)
            return u_d.squeeze(-1)

        u = self.made.solve(step, v.shape[:-1], context)
        return u, torch.cat(ladj, -1).sum(-1)

    def extra_repr(self):
        return f"{self.transformer!r}"


def _needs_grad(module, *tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors) or any(
        p.requires_grad for p in module.parameters())


_MAF_DOC = r"""
    Args:
        transformer: the monotone map :math:`g` (any
            :class:`~pyroflows.transforms.transformers.Transformer`).
        made: a :class:`~pyroflows.nn.MADE` with ``num_params`` equal to the
            transformer's; its output is offset by the transformer's identity
            parameters (a zero-initialised MADE starts at the identity).
"""


class MaskedAutoregressive(_AutoregressiveMath, Bijector):
    r"""Masked autoregressive flow layer (MAF, Papamakarios et al., 2017).

    .. math::

        x_d = g(z_d;\, \theta_d(x_{<d})), \qquad
        \log|\det J| = \sum_d \log g'(z_d;\, \theta_d(x_{<d})).

    The inverse (the density direction, used by ``log_prob``) is **one**
    MADE pass, :math:`z = g^{-1}(x; \theta(x))`; the forward (sampling)
    direction is sequential: without gradients and from
    ``SOLVE_BY_DIMENSION_MIN_ROWS`` rows, one dimension at a time with each
    hidden unit computed once (:meth:`~pyroflows.nn.MADE.solve`, about one
    MADE pass of arithmetic), otherwise :math:`D` MADE passes.
    """ + _MAF_DOC

    def __init__(self, transformer: Transformer, made: MADE, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._setup(transformer, made)

    def _call_and_ladj(self, z):
        return self._sequential(z, None, self.transformer.forward)

    def _inverse_and_ladj(self, x):
        return self._one_pass(x, None, self.transformer.inverse)


class InverseAutoregressive(_AutoregressiveMath, Bijector):
    r"""Inverse autoregressive flow layer (IAF, Kingma et al., 2016).

    .. math::

        x_d = g(z_d;\, \theta_d(z_{<d})), \qquad
        \log|\det J| = \sum_d \log g'(z_d;\, \theta_d(z_{<d})).

    The forward (sampling) direction is **one** MADE pass, and ``log_prob``
    of the layer's own samples reuses that pass through the cache; the
    inverse (scoring new data) is sequential, solved as the MAF's sampling
    direction is.
    """ + _MAF_DOC

    def __init__(self, transformer: Transformer, made: MADE, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._setup(transformer, made)

    def _call_and_ladj(self, z):
        return self._one_pass(z, None, self.transformer.forward)

    def _inverse_and_ladj(self, x):
        return self._sequential(x, None, self.transformer.inverse)


class ConditionalMaskedAutoregressive(_AutoregressiveMath, ConditionalBijector):
    r"""Conditional MAF layer: :math:`x_d = g(z_d; \theta_d(x_{<d}, c))`.

    The MADE's context input feeds every hidden unit (so even the first
    dimension depends on :math:`c`); its batch shape broadcasts against
    that of ``x``.  Inverse one pass, forward :math:`D` passes.
    """ + _MAF_DOC

    def __init__(self, transformer: Transformer, made: MADE):
        super().__init__()
        if not made.context_dim:
            raise ValueError("a conditional layer needs a MADE built with context_dim")
        self._setup(transformer, made)
        self.context_dim = made.context_dim

    def _call_and_ladj(self, z, context):
        return self._sequential(z, context, self.transformer.forward)

    def _inverse_and_ladj(self, x, context):
        return self._one_pass(x, context, self.transformer.inverse)


class ConditionalInverseAutoregressive(_AutoregressiveMath, ConditionalBijector):
    r"""Conditional IAF layer: :math:`x_d = g(z_d; \theta_d(z_{<d}, c))`.

    Forward (sampling) one pass, inverse :math:`D` passes.
    """ + _MAF_DOC

    def __init__(self, transformer: Transformer, made: MADE):
        super().__init__()
        if not made.context_dim:
            raise ValueError("a conditional layer needs a MADE built with context_dim")
        self._setup(transformer, made)
        self.context_dim = made.context_dim

    def _call_and_ladj(self, z, context):
        return self._one_pass(z, context, self.transformer.forward)

    def _inverse_and_ladj(self, x, context):
        return self._sequential(x, context, self.transformer.inverse)


def _build(cls, input_dim, kind, count_bins, bound, hidden_dims, permutation, context_dim=None):
    check_input_dim(input_dim)
    transformer = make_transformer(kind, count_bins, bound)
    hidden_dims = default_hidden(input_dim) if hidden_dims is None else hidden_dims
    made = MADE(input_dim, transformer.num_params, hidden_dims, context_dim=context_dim, permutation=permutation)
    return cls(transformer, made)


_PERMUTATION_DOC = """``permutation`` is the MADE ordering (``None``/"natural", "reverse", "random" from
    torch's generator, or explicit degrees)."""


def masked_autoregressive(input_dim: int, hidden_dims: Sequence[int] | None = None, *,
                          kind: str | Transformer = "affine", count_bins: int = 8, bound: float = 5.0,
                          permutation=None) -> MaskedAutoregressive:
    """A :class:`MaskedAutoregressive` (MAF) layer with any transformer ``kind``: one-pass
    inverse (density), sequential forward (sampling).  """ + _PERMUTATION_DOC
    return _build(MaskedAutoregressive, input_dim, kind, count_bins, bound, hidden_dims, permutation)


def inverse_autoregressive(input_dim: int, hidden_dims: Sequence[int] | None = None, *,
                           kind: str | Transformer = "affine", count_bins: int = 8, bound: float = 5.0,
                           permutation=None) -> InverseAutoregressive:
    """An :class:`InverseAutoregressive` (IAF) layer with any transformer ``kind``: one-pass
    forward (sampling), sequential inverse.  """ + _PERMUTATION_DOC
    return _build(InverseAutoregressive, input_dim, kind, count_bins, bound, hidden_dims, permutation)


def affine_autoregressive(input_dim: int, hidden_dims: Sequence[int] | None = None, *,
                          permutation=None) -> InverseAutoregressive:
    """Pyro's ``affine_autoregressive``: an affine IAF layer (Kingma et al., 2016), as in Pyro:
    the forward (sampling) direction is one pass, the inverse sequential; ``log_prob`` of
    its own samples is free through the cache.  The MAF direction is
    :func:`masked_autoregressive`.  """ + _PERMUTATION_DOC
    return _build(InverseAutoregressive, input_dim, "affine", 8, 5.0, hidden_dims, permutation)


def spline_autoregressive(input_dim: int, hidden_dims: Sequence[int] | None = None, count_bins: int = 8,
                          bound: float = 3.0, order: str = "linear", *,
                          permutation=None) -> InverseAutoregressive:
    """Pyro's ``spline_autoregressive``: the autoregressive neural spline flow layer (Durkan
    et al., 2019) in Pyro's IAF direction (forward one pass), with a rational spline of
    ``order`` ``"linear"`` or ``"quadratic"``.  Other kinds and the MAF direction:
    :func:`inverse_autoregressive`, :func:`masked_autoregressive`.  """ + _PERMUTATION_DOC
    return _build(InverseAutoregressive, input_dim, spline_kind(order), count_bins, bound, hidden_dims,
                  permutation)


def conditional_masked_autoregressive(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                      *, kind: str | Transformer = "affine", count_bins: int = 8,
                                      bound: float = 5.0, permutation=None) -> ConditionalMaskedAutoregressive:
    """Conditional twin of :func:`masked_autoregressive`."""
    return _build(ConditionalMaskedAutoregressive, input_dim, kind, count_bins, bound, hidden_dims, permutation,
                  context_dim)


def conditional_inverse_autoregressive(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                       *, kind: str | Transformer = "affine", count_bins: int = 8,
                                       bound: float = 5.0, permutation=None) -> ConditionalInverseAutoregressive:
    """Conditional twin of :func:`inverse_autoregressive`."""
    return _build(ConditionalInverseAutoregressive, input_dim, kind, count_bins, bound, hidden_dims, permutation,
                  context_dim)


def conditional_affine_autoregressive(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                      *, permutation=None) -> ConditionalInverseAutoregressive:
    """Pyro's ``conditional_affine_autoregressive``: conditional twin of :func:`affine_autoregressive`
    (IAF direction)."""
    return _build(ConditionalInverseAutoregressive, input_dim, "affine", 8, 5.0, hidden_dims, permutation,
                  context_dim)


def conditional_spline_autoregressive(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                      count_bins: int = 8, bound: float = 3.0, order: str = "linear", *,
                                      permutation=None) -> ConditionalInverseAutoregressive:
    """Pyro's ``conditional_spline_autoregressive``: conditional twin of :func:`spline_autoregressive`
    (IAF direction)."""
    return _build(ConditionalInverseAutoregressive, input_dim, spline_kind(order), count_bins, bound, hidden_dims,
                  permutation, context_dim)
