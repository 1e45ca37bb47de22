r"""Per-datum importance-weighted bounds for any Pyro model/guide pair with one data plate.

For a model :math:`p(x_i, z_i)` whose latents are local to a data plate and a
guide :math:`q(z_i \mid x_i)` (a VAE encoder, amortized or not), the log
importance weights of :math:`K` draws :math:`z_i^{(k)} \sim q` are

.. math::

    \log w_i^{(k)} = \log p(x_i, z_i^{(k)}) - \log q(z_i^{(k)} \mid x_i),

and the per-datum bounds on :math:`\log p(x_i)` are the IWAE bound (Burda,
Grosse and Salakhutdinov, "Importance weighted autoencoders", 2016)

.. math::

    \mathcal{L}_K(x_i) = \log \frac{1}{K} \sum_k w_i^{(k)}
    \;\le\; \log p(x_i), \qquad
    \mathcal{L}_1 \le \mathcal{L}_K \le \mathcal{L}_{K'} \text{ for } K \le K' \text{ (in expectation)},

and the ELBO :math:`\frac1K \sum_k \log w_i^{(k)}` (its plain average, a
Monte-Carlo estimate of :math:`E_q[\log w_i]`).  Both come from the same
weights here.

The draws are vectorised: the guide and the model run once per chunk of
``chunk_size`` particles inside an extra ``pyro.plate`` left of every plate
of the model (as ``Trace_ELBO(vectorize_particles=True)`` does), so the
model must broadcast over a leading batch dimension.  Every sample site
(latent or observed) must sit inside the data plate; a global latent would
couple the data and has no per-datum bound (a ``ValueError`` says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .diagnostics import model_plate_nesting

__all__ = ["IWAEResult", "elbo_per_datum", "iwae_bound", "iwae_bounds", "per_datum_log_weights"]

_PARTICLES = "_iwae_particles"


@dataclass(frozen=True)
class IWAEResult:
    """Per-datum bounds from one set of importance weights.

    Attributes:
        iwae: :math:`\\log \\frac1K \\sum_k w^{(k)}` per datum, shape ``(N,)``.
        elbo: :math:`\\frac1K \\sum_k \\log w^{(k)}` per datum, shape ``(N,)``.
        log_weights: the weights themselves, shape ``(K, N)``.
    """

    iwae: torch.Tensor
    elbo: torch.Tensor
    log_weights: torch.Tensor


def _is_density_site(site):
    return site["type"] == "sample" and not site_is_subsample(site)


def _site_log_prob(site):
    lp = site["fn"].log_prob(site["value"])
    if site.get("mask") is not None:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, torch.zeros_like(lp))
    return lp


def _data_plate(trace, plate_name):
    """The data plate: ``plate_name`` or the vectorised plate every sample site of the model shares."""
    common = None
    for name, site in trace.nodes.items():
        if not _is_density_site(site):
            continue
        frames = {(f.name, f.dim) for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES}
        if plate_name is not None:
            match = [f for f in frames if f[0] == plate_name]
            if not match:
                raise ValueError(f"sample site {name!r} is outside the data plate {plate_name!r}: "
                                 "per-datum bounds need every site inside it")
            frames = set(match)
        common = frames if common is None else common & frames
    if not common:
        raise ValueError("per-datum bounds need one data plate around every sample site of the model; "
                         "found none shared by all sites (a global latent couples the data)")
    # the outermost shared plate: the leftmost (most negative) dim
    return min(common, key=lambda f: f[1])


def _reduce(lp, particle_dim, data_dim):
    """Sum a site's log-density over every batch dimension except the particle and data ones."""
    n = -particle_dim
    while lp.dim() < n:
        lp = lp.unsqueeze(0)
    keep = {lp.dim() + particle_dim, lp.dim() + data_dim}
    dims = [d for d in range(lp.dim()) if d not in keep]
    if dims:
        lp = lp.sum(dims)
    return lp  # (particles or 1, data or 1)


@torch.no_grad()
def per_datum_log_weights(model, guide, *args, num_samples: int = 1000, chunk_size: int = 100,
                          plate_name: str | None = None, max_plate_nesting: int | None = None,
                          **kwargs) -> torch.Tensor:
    r"""Log importance weights :math:`\log p(x_i, z^{(k)}_i) - \log q(z^{(k)}_i \mid x_i)`,
    shape ``(num_samples, N)`` with ``N`` the size of the data plate (its
    subsample when it subsamples; scales from subsampling are not applied).

    Args:
        model, guide: a Pyro model and guide called with ``*args, **kwargs``.
        num_samples: :math:`K`, the number of draws per datum.
        chunk_size: draws run at once (memory grows with it).
        plate_name: the data plate; by default the outermost plate shared by
            every sample site of the model.
        max_plate_nesting: found by tracing model and guide when not given.
    """
    for name, v in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_plate_nesting is None:
        max_plate_nesting = max(model_plate_nesting(model, *args, **kwargs),
                                model_plate_nesting(guide, *args, **kwargs))
    particle_dim = -max_plate_nesting - 1
    chunks, left = [], num_samples
    data_dim = None
    while left > 0:
        k = min(left, chunk_size)
        left -= k
        with pyro.plate(_PARTICLES, k, dim=particle_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if data_dim is None:
            _, data_dim = _data_plate(model_trace, plate_name)
        log_w = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if not _is_density_site(site):
                    continue
                if trace is guide_trace and site["is_observed"]:
                    continue
                log_w = log_w + sign * _reduce(_site_log_prob(site), particle_dim, data_dim)
        chunks.append(log_w.expand(k, log_w.shape[-1]))
    return torch.cat(chunks, 0)


def iwae_bounds(model, guide, *args, num_samples: int = 1000, chunk_size: int = 100, **kwargs) -> IWAEResult:
    """The IWAE bound and the ELBO per datum from the same ``num_samples`` draws
    (see :func:`per_datum_log_weights` for the arguments)."""
    lw = per_datum_log_weights(model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs)
    iwae = torch.logsumexp(lw, 0) - math.log(lw.shape[0])
    return IWAEResult(iwae=iwae, elbo=lw.mean(0), log_weights=lw)


def iwae_bound(model, guide, *args, num_samples: int = 1000, chunk_size: int = 100, **kwargs) -> torch.Tensor:
    r"""One importance-weighted estimate of :math:`\log p(x_i)` per datum of the data
    plate, :math:`\log \frac1K \sum_k w_i^{(k)}` (shape ``(N,)``), from ``num_samples``
    draws of the guide; a lower bound in expectation that tightens with ``K``."""
    return iwae_bounds(model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs).iwae


def elbo_per_datum(model, guide, *args, num_samples: int = 1000, chunk_size: int = 100, **kwargs) -> torch.Tensor:
    r"""The ELBO per datum, :math:`\frac1K \sum_k \log w_i^{(k)}` (shape ``(N,)``)."""
    return iwae_bounds(model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs).elbo
