"""Bayesian inference with flows: the ``AutoFlow`` guide, importance diagnostics,
reverse-KL distillation of unnormalised densities and teacher -> student flows,
and per-datum IWAE bounds for VAEs."""

from .autoguide import AutoFlow
from .diagnostics import ImportanceDiagnostics, guide_log_weights, importance_diagnostics, psis_khat
from .distill import DistillResult, distill, distill_flow
from .iwae import IWAEResult, elbo_per_datum, iwae_bound, iwae_bounds, per_datum_log_weights

__all__ = ["AutoFlow", "DistillResult", "IWAEResult", "ImportanceDiagnostics", "distill", "distill_flow",
           "elbo_per_datum", "guide_log_weights", "importance_diagnostics", "iwae_bound", "iwae_bounds",
           "per_datum_log_weights", "psis_khat"]
