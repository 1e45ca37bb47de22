r"""Density models of images: dequantization, bits per dimension, temperature
sampling and latent interpolation (Prince, *Understanding Deep Learning*,
sections 16.4-16.5; Kingma & Dhariwal, "Glow", 2018).

Pixels are integers :math:`k \in \{0, \dots, L-1\}^D`; a flow is a density on
reals.  A *dequantizer* :math:`q(v \mid k)` spreads each integer image over
its cell, :math:`v = (k + u)/L` with :math:`u \in [0, 1)^D`, and

.. math::

    \log P(k) \;\ge\; \mathbb{E}_{q(v\mid k)}\bigl[\log p(v) - \log q(v \mid k)\bigr]

(Theis et al., 2016; Ho et al., "Flow++", 2019).  Uniform dequantization has
:math:`\log q(v\mid k) = D \log L`; variational dequantization learns
:math:`q(u \mid k)`, which tightens the bound.  *Bits per dimension* is the
negative bound in bits divided by :math:`D`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import dequantize
from .nn import ConvNet

__all__ = [
    "UniformDequantization",
    "VariationalDequantization",
    "bits_per_dim",
    "dequantized_log_prob",
    "interpolate",
    "sample_at_temperature",
    "to_bits_per_dim",
]


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels (the number of pixel values) must be an int >= 2, got {levels!r}")
    return levels


class UniformDequantization(nn.Module):
    r"""Uniform dequantization :math:`v = (k + u)/L`, :math:`u \sim U(0,1)^D`:
    :math:`\log q(v \mid k) = D \log L` (the cell has volume :math:`L^{-D}`).
    Reuses :func:`pyroflows.data.dequantize`."""

    def __init__(self, levels: int = 256):
        super().__init__()
        self.levels = _check_levels(levels)

    def forward(self, k: torch.Tensor, event_dims: int = 3):
        """``(v, log q(v | k))`` per image (the batch shape of ``k``)."""
        v = dequantize(k, self.levels).to(k.device)
        dims = math.prod(k.shape[k.dim() - event_dims:])
        return v, torch.full(k.shape[:k.dim() - event_dims], dims * math.log(self.levels), device=k.device)


class VariationalDequantization(nn.Module):
    r"""Variational dequantization (Ho et al., "Flow++", 2019) with a conditional
    logistic-normal :math:`q(u \mid k)`:

    .. math::

        u = \mathrm{sigmoid}(\mu(k) + \sigma(k)\,\epsilon), \quad \epsilon \sim N(0, I), \qquad
        \log q(v\mid k) = \log N(\epsilon) - \sum \log\sigma - \sum \log u(1-u) + D\log L,

    with :math:`\mu, \log\sigma` from a :class:`~pyroflows.nn.ConvNet` of the
    image (zero-initialised: it starts as a fixed logistic-normal).  Flow++
    uses a conditional flow for :math:`q`; this is its one-layer version.
    Trained jointly with the flow by maximising :func:`dequantized_log_prob`.
    """

    def __init__(self, shape: Sequence[int], levels: int = 256, hidden_channels: Sequence[int] = (32,)):
        super().__init__()
        self.levels = _check_levels(levels)
        self.shape = tuple(shape)
        c = self.shape[0]
        self.net = ConvNet(c, 2 * c, tuple(hidden_channels))

    def forward(self, k: torch.Tensor, event_dims: int = 3):
        """``(v, log q(v | k))`` per image, reparametrised (differentiable in the parameters)."""
        mu, log_sigma = self.net(k / (self.levels - 1) - 0.5).chunk(2, dim=-3)
        eps = torch.randn_like(mu)
        a = mu + log_sigma.exp() * eps
        u = torch.sigmoid(a)
        log_q = (-0.5 * eps ** 2 - 0.5 * math.log(2 * math.pi) - log_sigma
                 + F.softplus(a) + F.softplus(-a))  # -log sigmoid'(a) = softplus(a) + softplus(-a)
        v = (k + u) / self.levels
        return v, log_q.sum((-3, -2, -1)) + math.prod(k.shape[-3:]) * math.log(self.levels)


def dequantized_log_prob(flow, k: torch.Tensor, dequantizer: nn.Module | None = None,
                         num_samples: int = 1) -> torch.Tensor:
    r"""A lower bound on :math:`\log P(k)` (nats per image) for integer images ``k``:
    :math:`\frac1S\sum_s [\log p(v_s) - \log q(v_s \mid k)]` with :math:`v_s \sim q(\cdot\mid k)`.

    ``dequantizer``: default ``flow.dequantizer`` (set by
    :func:`pyroflows.flows.glow`), which must then exist.  Differentiable, so
    its negative mean is the training loss (and trains a variational dequantizer)."""
    dequantizer = getattr(flow, "dequantizer", None) if dequantizer is None else dequantizer
    if dequantizer is None:
        raise ValueError("no dequantizer: pass one, e.g. UniformDequantization(levels)")
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"expected a tensor of integer pixel values, got {type(k).__name__}")
    total = 0.0
    for _ in range(num_samples):
        v, log_q = dequantizer(k, len(flow.event_shape))
        total = total + flow.log_prob(v) - log_q
    return total / num_samples


def to_bits_per_dim(log_likelihood: torch.Tensor, num_dims: int) -> torch.Tensor:
    r"""Bits per dimension of a discrete log-likelihood (nats per image):
    :math:`-\log P(k) / (D \ln 2)`."""
    return -log_likelihood / (num_dims * math.log(2.0))


@torch.no_grad()
def bits_per_dim(flow, k: torch.Tensor, dequantizer: nn.Module | None = None, batch_size: int = 500,
                 num_samples: int = 1) -> float:
    """Mean bits per dimension of the integer images ``k`` under ``flow`` (the
    dequantization bound, :func:`dequantized_log_prob`), in batches."""
    dims = math.prod(flow.event_shape)
    lls = [dequantized_log_prob(flow, chunk, dequantizer, num_samples) for chunk in k.split(batch_size)]
    return float(to_bits_per_dim(torch.cat(lls), dims).mean())


@torch.no_grad()
def sample_at_temperature(flow, sample_shape=(), temperature: float = 1.0) -> torch.Tensor:
    r"""Samples with the base standard deviation scaled by ``temperature``
    (Glow's reduced-temperature sampling): :math:`z = \mu_0 + T(\epsilon - \mu_0)`,
    :math:`\epsilon \sim p_0`, pushed through the flow.  ``temperature=0`` gives
    the image of the base mode; with learned priors it scales their standard
    deviations too (they are layers of the flow)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    d = flow()
    base = d.base_dist
    eps = base.sample(torch.Size(sample_shape))
    z = base.mean + temperature * (eps - base.mean)
    for t in d.transforms:
        z = t(z)
    return z


@torch.no_grad()
def interpolate(flow, x0: torch.Tensor, x1: torch.Tensor, num_steps: int = 8) -> torch.Tensor:
    r"""Images along the straight line between the latents of ``x0`` and ``x1``:
    :math:`x(t) = f((1-t) f^{-1}(x_0) + t f^{-1}(x_1))` for ``num_steps``
    values of :math:`t` from 0 to 1 (Glow's interpolation figure).  Returns
    ``(num_steps, *event_shape)``; the ends reproduce ``x0`` and ``x1``."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    d = flow()
    z = torch.stack([x0, x1])
    for t in reversed(d.transforms):
        z = t.inv(z)
    w = torch.linspace(0, 1, num_steps, dtype=z.dtype, device=z.device).view(-1, *[1] * (z.dim() - 1))
    z = (1 - w) * z[0] + w * z[1]
    for t in d.transforms:
        z = t(z)
    return z
