r"""Transformers: monotone elementwise maps :math:`y = g(x; \theta)`.

A transformer is written once, as pure tensor functions, and used in every
structure (elementwise with free :math:`\theta`, coupling, autoregressive).
Parameters arrive as a tensor of shape ``(..., D, num_params)`` that
broadcasts against ``x`` of shape ``(..., D)``.  Both directions return the
output and the *elementwise* log-derivative :math:`\log g'(x)` of the forward
map at the input point (shape of ``x``); the layers sum it.

No data-dependent boolean indexing is used anywhere (inputs outside a bound
are handled with ``torch.where`` on clamped arguments), so layers compile with
``torch.compile(fullgraph=True)`` and every real input gives finite values
and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "Additive", "Affine", "PiecewiseLinear", "Transformer", "make_transformer"]


class Transformer:
    """Interface of a monotone elementwise map with ``num_params`` parameters per dimension."""

    num_params: int = 0

    def forward(self, x: torch.Tensor, params: torch.Tensor):
        """Return ``(y, log g'(x))`` elementwise."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, params: torch.Tensor):
        """Return ``(x, log g'(x))`` elementwise, with ``x = g^{-1}(y)``."""
        raise NotImplementedError

    def identity_params(self) -> torch.Tensor:
        """Unconstrained parameters (``num_params``,) at which ``g`` is the identity."""
        return torch.zeros(self.num_params)

    def __repr__(self):
        return f"{type(self).__name__}()"


def soft_clamp(s: torch.Tensor, bound: float) -> torch.Tensor:
    r""":math:`b \tanh(s / b)`: identity near 0, smoothly limited to :math:`(-b, b)`."""
    return bound * torch.tanh(s / bound)


class Affine(Transformer):
    r"""Affine map :math:`g(x) = e^{s} x + t` with :math:`\theta = (t, \tilde s)`.

    The log-scale is softly clamped, :math:`s = b\tanh(\tilde s/b)` with
    :math:`b` = ``log_scale_bound`` (default 5, i.e. scales in
    :math:`(e^{-5}, e^{5})`), which keeps the scale positive and bounded so
    that training cannot blow it up (the RealNVP instability), while remaining
    smooth.  Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """

    num_params = 2

    def __init__(self, log_scale_bound: float = 5.0):
        self.log_scale_bound = float(log_scale_bound)

    def _shift_log_scale(self, params):
        shift, raw = params.unbind(-1)
        return shift, soft_clamp(raw, self.log_scale_bound)

    def forward(self, x, params):
        shift, log_scale = self._shift_log_scale(params)
        return x * torch.exp(log_scale) + shift, log_scale.expand_as(x)

    def inverse(self, y, params):
        shift, log_scale = self._shift_log_scale(params)
        return (y - shift) * torch.exp(-log_scale), log_scale.expand_as(y)

    def __repr__(self):
        return f"Affine(log_scale_bound={self.log_scale_bound})"


class Additive(Transformer):
    r"""Additive (volume-preserving) map :math:`g(x) = x + t` (NICE, Dinh et al. 2015)."""

    num_params = 1

    def forward(self, x, params):
        y = x + params[..., 0]
        return y, torch.zeros_like(y)

    def inverse(self, y, params):
        x = y - params[..., 0]
        return x, torch.zeros_like(x)


def _bin_index(cumulative: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index ``k`` with ``cumulative[k] <= value < cumulative[k+1]``, clamped to the bins.

    ``cumulative`` has shape ``(..., K+1)``; ``values`` the batch shape of it
    without the last dimension.  Uses ``searchsorted`` (no boolean indexing).
    """
    cumulative, values = torch.broadcast_tensors(cumulative, values.unsqueeze(-1))
    idx = torch.searchsorted(cumulative[..., 1:-1].contiguous(), values[..., :1].contiguous(), right=True)
    return idx.squeeze(-1)


class PiecewiseLinear(Transformer):
    r"""Piecewise-linear monotone map on :math:`[a, b]` with :math:`K` equal-width bins.

    The neural-importance-sampling form (Müller et al., "Neural Importance
    Sampling", 2019): unconstrained :math:`\theta \in \mathbb{R}^K` give bin
    masses :math:`q = \mathrm{softmax}(\theta)`, and on the unit square

    .. math::

        g(x) = \sum_{k<b} q_k + (Kx - b)\, q_b, \qquad b = \lfloor K x\rfloor,
        \qquad g'(x) = K q_b,

    rescaled to :math:`[a, b]`.  Outside the interval the map is the identity
    (linear tails), so every real input is valid.  ``theta = 0`` is the
    identity.  The derivative jumps at the knots (the map is continuous).
    """

    def __init__(self, bins: int = 8, lower: float = 0.0, upper: float = 1.0):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not upper > lower:
            raise ValueError(f"need lower < upper, got [{lower}, {upper}]")
        self.bins, self.lower, self.upper = int(bins), float(lower), float(upper)
        self.num_params = self.bins

    def _masses(self, params):
        q = F.softmax(params, dim=-1)
        cum = F.pad(torch.cumsum(q, dim=-1), (1, 0))
        cum = torch.cat([cum[..., :-1], torch.ones_like(cum[..., -1:])], dim=-1)  # exact end point
        return q, cum

    def forward(self, x, params):
        K, width = self.bins, self.upper - self.lower
        inside = (x >= self.lower) & (x <= self.upper)
        u = ((x - self.lower) / width).clamp(0.0, 1.0)
        q, cum = self._masses(params)
        b = torch.clamp((u * K).floor().long(), max=K - 1)
        qb = q.expand(*u.shape, K).gather(-1, b.unsqueeze(-1)).squeeze(-1)
        cb = cum.expand(*u.shape, K + 1).gather(-1, b.unsqueeze(-1)).squeeze(-1)
        v = cb + (u * K - b) * qb
        y = torch.where(inside, self.lower + width * v, x)
        ladj = torch.where(inside, torch.log(K * qb), torch.zeros_like(x))
        return y, ladj

    def inverse(self, y, params):
        K, width = self.bins, self.upper - self.lower
        inside = (y >= self.lower) & (y <= self.upper)
        v = ((y - self.lower) / width).clamp(0.0, 1.0)
        q, cum = self._masses(params)
        b = _bin_index(cum, v)
        qb = q.expand(*v.shape, K).gather(-1, b.unsqueeze(-1)).squeeze(-1)
        cb = cum.expand(*v.shape, K + 1).gather(-1, b.unsqueeze(-1)).squeeze(-1)
        u = (b + (v - cb) / qb) / K
        x = torch.where(inside, self.lower + width * u, y)
        ladj = torch.where(inside, torch.log(K * qb), torch.zeros_like(y))
        return x, ladj

    def __repr__(self):
        return f"PiecewiseLinear(bins={self.bins}, lower={self.lower}, upper={self.upper})"



#: Transformer kinds by name: ``kind -> factory(bins, bound)``.  Structures
#: (``elementwise``, ``spline_coupling``, ``spline_autoregressive``, ...) take a
#: ``kind=`` argument looked up here, and the test harness runs every kind.
KINDS = {
    "affine": lambda bins, bound: Affine(),
    "additive": lambda bins, bound: Additive(),
    "piecewise_linear": lambda bins, bound: PiecewiseLinear(bins, -bound, bound),
}


def make_transformer(kind: str | Transformer, bins: int = 8, bound: float = 5.0) -> Transformer:
    """Look up a transformer by name (see :data:`KINDS`); a ``Transformer`` passes through."""
    if isinstance(kind, Transformer):
        return kind
    try:
        factory = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown transformer kind {kind!r}; choose one of {sorted(KINDS)}") from None
    return factory(bins, bound)
