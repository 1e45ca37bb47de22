r"""Elementwise flows: :math:`y_d = g(x_d; \theta_d)` with free parameters.

The Jacobian is diagonal, so :math:`\log|\det J| = \sum_d \log g'(x_d)`.
Both directions cost one elementwise pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..nn import MLP
from .base import Bijector, ConditionalBijector
from .transformers import PiecewiseLinear, Transformer, make_transformer, spline_kind

__all__ = [
    "ELU",
    "ConditionalElementwise",
    "Elementwise",
    "LeakyReLU",
    "Logit",
    "Sigmoid",
    "Spline",
    "conditional_elementwise",
    "conditional_spline",
    "elementwise",
    "elu",
    "leaky_relu",
    "logit",
    "piecewise_linear",
    "sigmoid",
    "spline",
]

unit_interval_vector = constraints.independent(constraints.unit_interval, 1)


def check_input_dim(input_dim) -> int:
    """Validate a helper's ``input_dim`` argument (a positive int)."""
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
    return input_dim


def check_context_dim(context_dim) -> int:
    """Validate a conditional helper's ``context_dim`` argument (a positive int)."""
    if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 1:
        raise ValueError(f"context_dim must be a positive int, got {context_dim!r}")
    return context_dim


class Elementwise(Bijector):
    r"""Any :class:`~pyroflows.transforms.transformers.Transformer` applied
    independently to each dimension with learnable parameters :math:`\theta_d`.

    .. math::

        y_d = g(x_d; \theta_d), \qquad \log|\det J| = \sum_d \log g'(x_d;\theta_d)

    Both directions are a single elementwise pass.  Parameters start at the
    transformer's identity.

    Args:
        transformer: the monotone map :math:`g`.
        input_dim: number of dimensions :math:`D`.
        domain: the constraint of the inputs (default ``real_vector``); the
            codomain is the same set (transformers map it onto itself).
    """

    sign = 1

    def __init__(self, transformer: Transformer, input_dim: int, domain=constraints.real_vector,
                 cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.transformer = transformer
        self.event_shape = (check_input_dim(input_dim),)
        self.domain = self.codomain = domain
        self.params = nn.Parameter(transformer.identity_params().expand(input_dim, -1).clone())

    def _call_and_ladj(self, x):
        y, ladj = self.transformer.forward(x, self.params)
        return y, ladj.sum(-1)

    def _inverse_and_ladj(self, y):
        x, ladj = self.transformer.inverse(y, self.params)
        return x, ladj.sum(-1)

    def extra_repr(self):
        return f"{self.transformer!r}, input_dim={self.event_shape[0]}"


class Spline(Elementwise):
    r"""Pyro's ``Spline``: an elementwise monotone rational spline on ``[-bound, bound]``
    (identity outside) with free parameters, the constructor Pyro's.  ``order="linear"``
    is the linear rational spline (Dolatabadi et al. 2020, Pyro's default),
    ``"quadratic"`` the rational-quadratic one (Durkan et al. 2019).  Both directions
    one pass."""

    def __init__(self, input_dim: int, count_bins: int = 8, bound: float = 3.0, order: str = "linear"):
        super().__init__(make_transformer(spline_kind(order), count_bins, bound), input_dim)
        self.order = order


class ConditionalElementwise(ConditionalBijector):
    r"""Any transformer applied to each dimension with parameters computed from a
    context :math:`c`: :math:`\theta(c) = \theta_0 + \mathrm{MLP}(c)`.

    .. math::

        y_d = g(x_d; \theta_d(c)), \qquad
        \log|\det J| = \sum_d \log g'(x_d;\theta_d(c))

    :math:`\theta_0` are the transformer's identity parameters and the
    network's last layer starts at zero, so the layer starts at the identity
    for every context.  Both directions are one network call plus one
    elementwise pass.  ``context`` of shape ``(..., context_dim)`` broadcasts
    against the batch shape of ``x``.  (The conditional diagonal flows of
    amortized variational inference, e.g. Kingma et al., "Improved
    Variational Inference with Inverse Autoregressive Flow", 2016, use the
    affine kind.)
    """

    sign = 1

    def __init__(self, transformer: Transformer, input_dim: int, context_dim: int,
                 hidden_dims: Sequence[int] = (64, 64)):
        super().__init__()
        self.transformer = transformer
        self.event_shape = (check_input_dim(input_dim),)
        self.context_dim = check_context_dim(context_dim)
        self.register_buffer("identity_params", transformer.identity_params().expand(input_dim, -1).clone())
        self.net = MLP(self.context_dim, input_dim * transformer.num_params, hidden_dims)

    def _params_and_input(self, x, context):
        params = self.identity_params + self.net(context).unflatten(-1, self.identity_params.shape)
        batch = torch.broadcast_shapes(x.shape[:-1], params.shape[:-2])
        return params, x.expand(*batch, x.shape[-1])

    def _call_and_ladj(self, x, context):
        params, x = self._params_and_input(x, context)
        y, ladj = self.transformer.forward(x, params)
        return y, ladj.sum(-1)

    def _inverse_and_ladj(self, y, context):
        params, y = self._params_and_input(y, context)
        x, ladj = self.transformer.inverse(y, params)
        return x, ladj.sum(-1)

    def extra_repr(self):
        return f"{self.transformer!r}, input_dim={self.event_shape[0]}, context_dim={self.context_dim}"


class _Scalar(Bijector):
    """A parameter-free map applied to every element of any shape (event_dim 0,
    as Pyro's ``LeakyReLUTransform`` / ``ELUTransform``): its log-determinant is
    elementwise, the shape of the input."""

    domain = constraints.real
    codomain = constraints.real
    sign = 1
    event_shape = ()


class LeakyReLU(_Scalar):
    r"""Leaky ReLU with a fixed negative slope :math:`a > 0` (Pyro's ``leaky_relu()``):

    .. math::

        y = \begin{cases} x & x \ge 0 \\ a x & x < 0 \end{cases}, \qquad
        \log|\det J| = [x < 0] \log a,

    inverse :math:`x = y` for :math:`y \ge 0`, :math:`y / a` otherwise (problem
    16.7).  Elementwise on any shape (event_dim 0); both directions one pass.
    Default slope 0.01, Pyro's.
    """

    def __init__(self, negative_slope: float = 0.01, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        if not negative_slope > 0:
            raise ValueError(f"negative_slope must be > 0 for invertibility, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def _ladj(self, neg, like):
        return neg.to(like.dtype) * math.log(self.negative_slope)

    def _call_and_ladj(self, x):
        neg = x < 0
        return torch.where(neg, x * self.negative_slope, x), self._ladj(neg, x)

    def _inverse_and_ladj(self, y):
        neg = y < 0
        return torch.where(neg, y / self.negative_slope, y), self._ladj(neg, y)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class ELU(_Scalar):
    r"""Exponential linear unit (Pyro's ``elu()``), from the reals onto :math:`(-1, \infty)`:

    .. math::

        y = \begin{cases} x & x \ge 0 \\ e^{x} - 1 & x < 0 \end{cases}, \qquad
        \log|\det J| = \min(x, 0),

    inverse :math:`x = \log(1 + y)` for :math:`y < 0`.  Elementwise on any shape
    (event_dim 0); both directions one pass.
    """

    codomain = constraints.greater_than(-1.0)

    def _call_and_ladj(self, x):
        return torch.where(x < 0, torch.expm1(x.clamp(max=0.0)), x), x.clamp(max=0.0)

    def _inverse_and_ladj(self, y):
        x = torch.where(y < 0, torch.log1p(y.clamp(min=-1 + torch.finfo(y.dtype).eps, max=0.0)), y)
        return x, x.clamp(max=0.0)


class Sigmoid(Bijector):
    r"""Logistic sigmoid :math:`y = 1/(1+e^{-x})` from the reals onto :math:`(0,1)`.

    :math:`\log|\det J| = \sum_d -\mathrm{softplus}(-x_d) - \mathrm{softplus}(x_d)`.
    """

    codomain = unit_interval_vector
    sign = 1

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = (check_input_dim(input_dim),)

    @staticmethod
    def _ladj(x):
        return (-F.softplus(-x) - F.softplus(x)).sum(-1)

    def _call_and_ladj(self, x):
        return torch.sigmoid(x), self._ladj(x)

    def _inverse_and_ladj(self, y):
        finfo = torch.finfo(y.dtype)
        y = y.clamp(finfo.tiny, 1 - finfo.eps)
        x = torch.log(y) - torch.log1p(-y)
        return x, self._ladj(x)


class Logit(Bijector):
    r"""Logit :math:`y = \log x - \log(1-x)` from :math:`(0,1)` onto the reals
    (the inverse of :class:`Sigmoid`; used after dequantization of images).

    :math:`\log|\det J| = -\sum_d \log x_d + \log(1 - x_d)`.
    """

    domain = unit_interval_vector
    sign = 1

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = (check_input_dim(input_dim),)

    @staticmethod
    def _ladj_from_y(y):
        return (F.softplus(-y) + F.softplus(y)).sum(-1)

    def _call_and_ladj(self, x):
        finfo = torch.finfo(x.dtype)
        x = x.clamp(finfo.tiny, 1 - finfo.eps)
        y = torch.log(x) - torch.log1p(-x)
        return y, self._ladj_from_y(y)

    def _inverse_and_ladj(self, y):
        return torch.sigmoid(y), self._ladj_from_y(y)


def elementwise(input_dim: int, *, kind: str | Transformer = "affine", count_bins: int = 8,
                bound: float = 5.0) -> Elementwise:
    """An :class:`Elementwise` layer of any transformer ``kind`` (see
    :data:`~pyroflows.transforms.transformers.KINDS`) with free parameters;
    ``kind="affine"`` is the diagonal affine flow (elementwise scale and shift)."""
    return Elementwise(make_transformer(kind, count_bins, bound), input_dim)


def conditional_elementwise(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None, *,
                            kind: str | Transformer = "affine", count_bins: int = 8,
                            bound: float = 5.0) -> ConditionalElementwise:
    """A :class:`ConditionalElementwise` layer of any transformer ``kind`` whose
    parameters are an MLP of the context (starting at the identity); ``hidden_dims``
    defaults to two layers of ``max(32, 10 * input_dim)``."""
    return ConditionalElementwise(make_transformer(kind, count_bins, bound), input_dim, context_dim,
                                  _hidden_or_default(hidden_dims, input_dim))


def _hidden_or_default(hidden_dims, input_dim):
    return (max(32, 10 * input_dim),) * 2 if hidden_dims is None else hidden_dims


def spline(input_dim: int, *, count_bins: int = 8, bound: float = 3.0, order: str = "linear") -> Spline:
    """Pyro's ``spline``: a :class:`Spline` layer (elementwise rational spline, free parameters)."""
    return Spline(input_dim, count_bins, bound, order)


def conditional_spline(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                       count_bins: int = 8, bound: float = 3.0, order: str = "linear") -> ConditionalElementwise:
    """Pyro's ``conditional_spline``: :func:`spline` whose parameters are an MLP of the
    context (``hidden_dims`` as in :func:`conditional_elementwise`)."""
    return conditional_elementwise(input_dim, context_dim, hidden_dims, kind=spline_kind(order),
                                   count_bins=count_bins, bound=bound)


def piecewise_linear(input_dim: int, *, count_bins: int = 8) -> Elementwise:
    """The piecewise-linear flow on :math:`[0,1]^D` with ``count_bins`` equal-width bins (problem 16.8)."""
    return Elementwise(PiecewiseLinear(count_bins, 0.0, 1.0), input_dim, domain=unit_interval_vector)


def leaky_relu(*, negative_slope: float = 0.01) -> LeakyReLU:
    """Pyro's ``leaky_relu()``: a parameter-free :class:`LeakyReLU` (slope 0.01), elementwise on any shape."""
    return LeakyReLU(negative_slope)


def elu() -> ELU:
    """Pyro's ``elu()``: a parameter-free :class:`ELU`, elementwise on any shape."""
    return ELU()


def sigmoid(input_dim: int) -> Sigmoid:
    """A :class:`Sigmoid` layer (reals onto the unit interval)."""
    return Sigmoid(input_dim)


def logit(input_dim: int) -> Logit:
    """A :class:`Logit` layer (unit interval onto the reals)."""
    return Logit(input_dim)
