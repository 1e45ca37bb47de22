r"""Importance-sampling diagnostics of an approximate posterior :math:`q`.

Given log importance weights :math:`\log w_s = \log \tilde p(x_s) - \log q(x_s)`,
:math:`x_s \sim q`, of an unnormalised target :math:`\tilde p = Z p`:

* **PSIS k-hat** (Vehtari et al., "Pareto smoothed importance sampling",
  2015/2024): the shape of a generalised Pareto fitted to the largest weights
  (computed by ArviZ's ``psislw``).  :math:`\hat k < 0.5`: ``q`` is a good
  proposal and importance estimates converge fast; :math:`0.5 \le \hat k < 0.7`:
  usable; :math:`\hat k \ge 0.7`: do not trust ``q`` (it misses mass of ``p``).
* **ESS fraction** :math:`1 / (S \sum_s \bar w_s^2)` with normalised weights
  :math:`\bar w_s = w_s / \sum_t w_t` (Kong, 1992): 1 when ``q = p``.
* **log evidence** :math:`\log \hat Z = \operatorname{logsumexp}_s \log w_s - \log S`
  (an unbiased :math:`\hat Z`, so a lower bound on :math:`\log Z` in
  expectation) and its delta-method standard error
  :math:`\sqrt{\operatorname{Var}(w/\bar w)/S} = \sqrt{(1/\mathrm{ESS} - 1)/S}`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import torch

__all__ = ["ImportanceDiagnostics", "guide_log_weights", "importance_diagnostics", "model_plate_nesting", "psis_khat",
           "trace_plate_nesting"]


def psis_khat(log_weights) -> float:
    """PSIS k-hat of a 1-D array of log importance weights (ArviZ ``psislw``)."""
    import arviz  # imported lazily: it is slow to import

    lw = np.asarray(torch.as_tensor(log_weights).detach().cpu().double(), dtype=np.float64)
    if np.ptp(lw) < 1e-9:
        # all weights equal (q = p): there is no tail to fit; ArviZ would return inf
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns on k-hat > 0.7; we report it instead
        _, khat = arviz.psislw(lw)
    return float(np.asarray(khat))


@dataclass
class ImportanceDiagnostics:
    """How far to trust ``q`` as a proposal for ``p`` (see the module docstring).

    Attributes:
        khat: PSIS k-hat (< 0.5 good, < 0.7 usable, >= 0.7 unreliable).
        ess: importance-sampling effective sample size as a fraction of ``num_samples``.
        log_evidence: importance-sampled :math:`\\log Z` (for an SVI guide, the
            log marginal likelihood of the data).
        log_evidence_se: its delta-method standard error.
        elbo: the plain average :math:`E_q[\\log w]` (a lower bound on ``log_evidence``).
        num_samples: number of draws from ``q`` used.
    """

    khat: float
    ess: float
    log_evidence: float
    log_evidence_se: float
    elbo: float
    num_samples: int

    @property
    def reliable(self) -> bool:
        """``khat < 0.7``, the usual threshold below which importance estimates are trusted."""
        return self.khat < 0.7

    def __str__(self):
        return (f"k-hat {self.khat:.3f}, ESS {100 * self.ess:.1f}% of {self.num_samples}, "
                f"log Z {self.log_evidence:.4f} +- {self.log_evidence_se:.4f}, ELBO {self.elbo:.4f}")


def importance_diagnostics(log_weights: torch.Tensor) -> ImportanceDiagnostics:
    """Diagnostics from a 1-D tensor of log importance weights ``log p~(x) - log q(x)``, ``x ~ q``."""
    lw = torch.as_tensor(log_weights).detach().double().reshape(-1)
    n = lw.numel()
    if n < 2:
        raise ValueError(f"need at least 2 importance weights, got {n}")
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise ValueError("log importance weights contain NaN or +inf: the target or q is broken")
    log_z = torch.logsumexp(lw, 0) - math.log(n)
    if not torch.isfinite(log_z):
        raise ValueError("every importance weight is zero (log weight -inf): q puts no mass where p does")
    norm = torch.softmax(lw, 0)
    ess = float(1.0 / (n * (norm**2).sum()))
    se = math.sqrt(max(1.0 / ess - 1.0, 0.0) / n)
    finite = lw[torch.isfinite(lw)]
    elbo = float(finite.mean()) if finite.numel() == n else -math.inf
    return ImportanceDiagnostics(khat=psis_khat(lw), ess=ess, log_evidence=float(log_z),
                                 log_evidence_se=se, elbo=elbo, num_samples=n)


def model_plate_nesting(model, *args, guide=None, **kwargs) -> int:
    """Deepest plate nesting of ``model`` (observed sites included), from one trace.

    With a ``guide``, the model is replayed on a draw of the guide (as Pyro's ``Predictive``
    does), so models whose latent sites cannot be sampled from their prior (a flat
    ``ImproperUniform``, say) work too; without one, the model runs unconditioned."""
    with torch.no_grad():
        if guide is not None:
            guide_trace = pyro.poutine.block(pyro.poutine.trace(guide).get_trace)(*args, **kwargs)
            model = pyro.poutine.replay(model, trace=guide_trace)
        trace = pyro.poutine.block(pyro.poutine.trace(model).get_trace)(*args, **kwargs)
    return trace_plate_nesting(trace)


def trace_plate_nesting(trace) -> int:
    """Deepest plate nesting of the sample sites (observed ones included) of a Pyro trace."""
    return max((-f.dim for site in trace.nodes.values() if site["type"] == "sample"
                for f in site["cond_indep_stack"] if f.vectorized), default=0)


@torch.no_grad()
def guide_log_weights(model, guide, *args, num_samples: int = 4000, max_plate_nesting: int | None = None,
                      chunk_size: int = 1000, **kwargs) -> torch.Tensor:
    r"""Log importance weights :math:`\log p(x, \theta_s) - \log q(\theta_s)`,
    :math:`\theta_s \sim q`, of any Pyro ``guide`` for ``model`` (e.g. every autoguide).

    Vectorised over draws in chunks of ``chunk_size``: the model must broadcast
    over a leading batch dimension left of its plates, as for
    ``Trace_ELBO(vectorize_particles=True)``.  ``max_plate_nesting`` (as in Pyro's
    ``Predictive``) is found, when not given, by replaying the model on one draw of the guide.
    """
    from pyro.infer.importance import vectorized_importance_weights

    if max_plate_nesting is None:
        max_plate_nesting = model_plate_nesting(model, *args, guide=guide, **kwargs)
    out, left = [], int(num_samples)
    while left > 0:
        n = min(left, int(chunk_size))
        lw, _, _ = vectorized_importance_weights(model, guide, *args, num_samples=n,
                                                  max_plate_nesting=max_plate_nesting, **kwargs)
        out.append(lw.reshape(-1))
        left -= n
    return torch.cat(out)
