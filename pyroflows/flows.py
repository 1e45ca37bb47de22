"""Named flow architectures: each a function ``name(input_dim, **kw) -> Flow``.

``context_dim=`` makes an architecture conditional where that makes sense.
"""

from __future__ import annotations

__all__: list[str] = []


# ----------------------------------------------------------------------------
# Residual flows and the classic VAE-posterior flows (planar, radial, Sylvester)
# ----------------------------------------------------------------------------
from collections.abc import Sequence as _Sequence

from .flow import Flow as _Flow
from .transforms.planar import ConditionalPlanar as _ConditionalPlanar
from .transforms.planar import ConditionalRadial as _ConditionalRadial
from .transforms.planar import ConditionalSylvester as _ConditionalSylvester
from .transforms.planar import Planar as _Planar
from .transforms.planar import Radial as _Radial
from .transforms.planar import Sylvester as _Sylvester
from .transforms.residual import InvertibleResidual as _InvertibleResidual

__all__ += ["iresnet", "planar", "radial", "residual_flow", "sylvester"]


def _no_context(name, context_dim):
    if context_dim is not None:
        raise ValueError(f"{name} has no conditional version (context_dim must be None)")


def iresnet(input_dim: int, num_blocks: int = 4, hidden: _Sequence[int] = (64, 64), coeff: float = 0.9,
            log_det: str = "series", n_terms: int = 5, context_dim: int | None = None, **kw) -> _Flow:
    r"""i-ResNet (Behrmann et al. 2019): ``num_blocks`` :class:`InvertibleResidual` blocks
    with the truncated power-series log-det (biased; pass ``log_det="exact"`` in
    low dimensions).  Scoring is the cheap direction (one residual pass per
    block); sampling solves a fixed point per block."""
    _no_context("iresnet", context_dim)
    kw.setdefault("cheap", "inverse")
    return _Flow([_InvertibleResidual(input_dim, hidden, coeff, log_det, n_terms=n_terms, **kw)
                  for _ in range(num_blocks)])


def residual_flow(input_dim: int, num_blocks: int = 4, hidden: _Sequence[int] = (64, 64),
                  coeff: float = 0.98, log_det: str = "roulette", n_exact_terms: int = 2,
                  context_dim: int | None = None, **kw) -> _Flow:
    r"""Residual Flow (Chen et al. 2019): :class:`InvertibleResidual` blocks with LipSwish,
    the unbiased Russian-roulette log-det and its Neumann-series gradient.
    Scoring is the cheap direction; sampling solves a fixed point per block."""
    _no_context("residual_flow", context_dim)
    kw.setdefault("cheap", "inverse")
    return _Flow([_InvertibleResidual(input_dim, hidden, coeff, log_det,
                                               n_exact_terms=n_exact_terms, **kw)
                  for _ in range(num_blocks)])


def planar(input_dim: int, num_layers: int = 8, context_dim: int | None = None, **kw) -> _Flow:
    """A stack of planar layers (Rezende & Mohamed 2015); conditional with ``context_dim``."""
    if context_dim is None:
        return _Flow([_Planar(input_dim, **kw) for _ in range(num_layers)])
    return _Flow([_ConditionalPlanar(input_dim, context_dim, **kw) for _ in range(num_layers)])


def radial(input_dim: int, num_layers: int = 8, context_dim: int | None = None, **kw) -> _Flow:
    """A stack of radial layers (Rezende & Mohamed 2015); conditional with ``context_dim``."""
    if context_dim is None:
        return _Flow([_Radial(input_dim, **kw) for _ in range(num_layers)])
    return _Flow([_ConditionalRadial(input_dim, context_dim, **kw) for _ in range(num_layers)])


def sylvester(input_dim: int, num_layers: int = 4, variant: str = "orthogonal",
              num_vectors: int | None = None, context_dim: int | None = None, **kw) -> _Flow:
    """A stack of Sylvester layers (van den Berg et al. 2018); the triangular variant
    alternates the identity and the reversal permutation.  Conditional with ``context_dim``."""
    layers = []
    for k in range(num_layers):
        if variant == "triangular":
            kw["flip"] = k % 2 == 1
        if context_dim is None:
            layers.append(_Sylvester(input_dim, num_vectors, variant, **kw))
        else:
            layers.append(_ConditionalSylvester(input_dim, context_dim, num_vectors, variant, **kw))
    return _Flow(layers)
