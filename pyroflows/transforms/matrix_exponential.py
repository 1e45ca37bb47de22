r"""The matrix-exponential flow: :math:`y = e^{M} x` for an unconstrained square :math:`M`.

Hoogeboom, Garcia Satorras, Tomczak & Welling, "The Convolution Exponential
and Generalized Sylvester Flows", NeurIPS 2020.  The matrix exponential of
*any* real matrix is invertible, with

.. math::

    (e^{M})^{-1} = e^{-M}, \qquad \log|\det e^{M}| = \operatorname{tr} M,

so :math:`M` needs no constraint, the log-determinant costs :math:`O(D)` and
both directions cost the same (one matrix exponential and one matrix-vector
product per row).  Pyro's ``MatrixExponential`` approximates :math:`e^{M}x`
by a power series truncated after ``iterations`` terms, so its forward and
inverse are only approximately inverse to each other and :math:`\operatorname{tr}
M` is only approximately its log-determinant.  Here :math:`e^{M}` is computed
to machine precision (``torch.linalg.matrix_exp``: scaling and squaring with
a Padé approximant), which makes the round trip and the log-determinant exact;
``iterations`` is accepted (and checked) for Pyro compatibility and does not
change the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import MLP
from .base import Bijector, ConditionalBijector
from .elementwise import check_context_dim, check_input_dim

__all__ = [
    "ConditionalMatrixExponential",
    "MatrixExponential",
    "conditional_matrix_exponential",
    "matrix_exponential",
]

_NORMALIZATIONS = ("none", "weight", "spectral")


def _check_options(iterations, normalization, bound):
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if normalization != "none" and (bound is None or not float(bound) > 0):
        raise ValueError(f"normalization={normalization!r} needs a positive bound, got {bound!r}")


def normalize_matrix(m: torch.Tensor, normalization: str, bound: float | None) -> torch.Tensor:
    r"""``m`` with its norm capped at ``bound``: :math:`M / \max(1, \|M\| / b)`.

    ``"weight"`` caps the Frobenius norm (weight normalization, Salimans &
    Kingma 2016), ``"spectral"`` the largest singular value (spectral
    normalization, Miyato et al. 2018), ``"none"`` returns ``m``.  A bounded
    norm bounds the scale change :math:`e^{\pm\|M\|}` of each direction.
    """
    if normalization == "none":
        return m
    norm = torch.linalg.matrix_norm(m, ord="fro" if normalization == "weight" else 2)
    return m / torch.clamp(norm / bound, min=1.0)[..., None, None]


def matrix_exponential_apply(x: torch.Tensor, m: torch.Tensor, inverse: bool = False):
    r"""``(e^{\pm M} x, tr M)``: the map and its (forward) log-determinant for rows ``x`` (..., D)
    and matrices ``m`` (..., D, D) whose batch shapes broadcast."""
    e = torch.linalg.matrix_exp(-m if inverse else m)
    y = (e @ x.unsqueeze(-1)).squeeze(-1)
    ladj = m.diagonal(dim1=-2, dim2=-1).sum(-1)
    return y, ladj.expand(y.shape[:-1])


class MatrixExponential(Bijector):
    r"""Dense matrix-exponential flow :math:`y = e^{M} x` (Hoogeboom et al., 2020).

    .. math::

        y = e^{M} x,\qquad x = e^{-M} y,\qquad \log|\det J| = \operatorname{tr} M,

    with a learnable, unconstrained :math:`M \in \mathbb{R}^{D\times D}`
    (Pyro's initialisation: uniform on :math:`\pm 1/\sqrt D`).  Both
    directions are one pass and cost the same.  :math:`e^{M}` is computed to
    machine precision, so the inverse and the log-determinant are exact (see
    the module docstring for how this differs from Pyro's truncated series).

    Args:
        input_dim: :math:`D`.
        iterations: terms of Pyro's truncated power series; accepted and
            validated for compatibility, not used (the exponential is exact).
        normalization: ``"none"``, ``"weight"`` or ``"spectral"``: cap the
            Frobenius or spectral norm of :math:`M` at ``bound`` (see
            :func:`normalize_matrix`; Pyro raises ``NotImplementedError`` for
            these two).
        bound: the norm cap (required with a normalization; ignored with
            ``"none"``, as in Pyro).
    """

    def __init__(self, input_dim: int, iterations: int = 8, normalization: str = "none",
                 bound: float | None = None):
        super().__init__()
        dim = check_input_dim(input_dim)
        _check_options(iterations, normalization, bound)
        self.event_shape = (dim,)
        self.iterations, self.normalization, self.bound = iterations, normalization, bound
        self.weights = nn.Parameter(torch.empty(dim, dim).uniform_(-dim ** -0.5, dim ** -0.5))

    def matrix(self) -> torch.Tensor:
        """The matrix :math:`M` after normalization (the layer's map is :math:`e^{M}`)."""
        return normalize_matrix(self.weights, self.normalization, self.bound)

    def _call_and_ladj(self, x):
        return matrix_exponential_apply(x, self.matrix())

    def _inverse_and_ladj(self, y):
        return matrix_exponential_apply(y, self.matrix(), inverse=True)

    def extra_repr(self):
        return f"input_dim={self.event_shape[0]}, normalization={self.normalization!r}, bound={self.bound}"


class ConditionalMatrixExponential(ConditionalBijector):
    r"""Matrix-exponential flow whose matrix depends on a context :math:`c`:
    :math:`y = e^{M(c)} x` with :math:`M(c) = M_0 + \mathrm{MLP}(c)`.

    The same math as :class:`MatrixExponential` (exact inverse
    :math:`e^{-M(c)}`, :math:`\log|\det J| = \operatorname{tr} M(c)`), one
    matrix exponential per context row.  The network's last layer starts at
    zero, so the layer starts as an unconditional matrix-exponential flow;
    Pyro's conditional twin has no :math:`M_0` (its network's bias plays
    that role).
    """

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 iterations: int = 8, normalization: str = "none", bound: float | None = None):
        super().__init__()
        dim = check_input_dim(input_dim)
        _check_options(iterations, normalization, bound)
        self.event_shape = (dim,)
        self.context_dim = check_context_dim(context_dim)
        self.iterations, self.normalization, self.bound = iterations, normalization, bound
        hidden_dims = [10 * dim, 10 * dim] if hidden_dims is None else list(hidden_dims)
        self.weights = nn.Parameter(torch.empty(dim, dim).uniform_(-dim ** -0.5, dim ** -0.5))
        self.net = MLP(self.context_dim, dim * dim, hidden_dims)

    def matrix(self, context: torch.Tensor) -> torch.Tensor:
        """:math:`M(c)` after normalization, shape ``(*context.shape[:-1], D, D)``."""
        m = self.weights + self.net(context).unflatten(-1, self.weights.shape)
        return normalize_matrix(m, self.normalization, self.bound)

    def _call_and_ladj(self, x, context):
        return matrix_exponential_apply(x, self.matrix(context))

    def _inverse_and_ladj(self, y, context):
        return matrix_exponential_apply(y, self.matrix(context), inverse=True)


def matrix_exponential(input_dim: int, iterations: int = 8, normalization: str = "none",
                       bound: float | None = None) -> MatrixExponential:
    """A :class:`MatrixExponential` layer (Pyro's signature); both directions one pass."""
    return MatrixExponential(input_dim, iterations=iterations, normalization=normalization, bound=bound)


def conditional_matrix_exponential(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                   iterations: int = 8, normalization: str = "none",
                                   bound: float | None = None) -> ConditionalMatrixExponential:
    """A :class:`ConditionalMatrixExponential` layer (Pyro's signature); ``hidden_dims``
    defaults to ``[10 * input_dim, 10 * input_dim]`` as in Pyro."""
    return ConditionalMatrixExponential(input_dim, context_dim, hidden_dims, iterations=iterations,
                                        normalization=normalization, bound=bound)
