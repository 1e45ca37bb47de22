"""Bayesian inference with flows: the ``AutoFlow`` guide, importance diagnostics,
reverse-KL distillation of unnormalised densities and teacher -> student flows."""

from .autoguide import AutoFlow
from .diagnostics import ImportanceDiagnostics, guide_log_weights, importance_diagnostics, psis_khat
from .distill import DistillResult, distill, distill_flow

__all__ = ["AutoFlow", "DistillResult", "ImportanceDiagnostics", "distill", "distill_flow",
           "guide_log_weights", "importance_diagnostics", "psis_khat"]
