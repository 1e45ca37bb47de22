"""Side-by-side comparison of posterior approximations (used by the examples and benchmarks).

Every method is fitted with the same SVI step budget, then scored by the same
importance diagnostics (:func:`~pyroflows.infer.diagnostics.guide_log_weights`)
and by the error of its posterior means and standard deviations against
reference draws (NUTS, or exact samples where they exist).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO

from .diagnostics import guide_log_weights, importance_diagnostics

__all__ = [
    "Row",
    "fit_guide",
    "flatten_draws",
    "markdown_table",
    "moment_errors",
    "run_guide",
    "run_nuts",
    "standard_guides",
]


@dataclass
class Row:
    """One line of a comparison table (``nan`` where a number does not apply)."""

    method: str
    khat: float = math.nan
    ess: float = math.nan
    mean_err: float = math.nan
    sd_err: float = math.nan
    seconds: float = math.nan
    note: str = ""


def fit_guide(model, guide, *args, num_steps: int = 2000, lr: float = 1e-2, num_particles: int = 1,
              progress: bool = False, **kwargs) -> list[float]:
    """SVI with Adam (learning rate decayed 10x over the run) and ``Trace_ELBO``; returns the losses.
    With ``num_particles > 1`` the particles are vectorised (the model must broadcast over a
    leading batch dimension, as every model in ``examples/`` does)."""
    pyro.clear_param_store()
    gamma = 0.1 ** (1.0 / max(num_steps, 1))
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": gamma, "clip_norm": 10.0})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    svi = SVI(model, guide, optim, elbo)
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=type(guide).__name__, leave=False)
    return [svi.step(*args, **kwargs) for _ in steps]


def flatten_draws(draws: dict[str, torch.Tensor], names) -> torch.Tensor:
    """Concatenate the draws of ``names`` (each ``(N, *shape)``) into ``(N, total)``."""
    return torch.cat([draws[n].reshape(draws[n].shape[0], -1) for n in names], -1)


def moment_errors(draws: torch.Tensor, ref_mean: torch.Tensor, ref_sd: torch.Tensor) -> tuple[float, float]:
    """``(max_j |mean_j - ref_mean_j| / ref_sd_j, max_j |sd_j / ref_sd_j - 1|)`` over coordinates."""
    mean, sd = draws.mean(0), draws.std(0)
    return float(((mean - ref_mean).abs() / ref_sd).max()), float((sd / ref_sd - 1).abs().max())


def run_guide(name: str, model, guide, *args, names, ref_mean, ref_sd, num_steps: int, lr: float,
              num_samples: int = 4000, num_particles: int = 1, **kwargs) -> Row:
    """Fit ``guide``, then score it (k-hat, ESS, moment errors, fit wall time).

    An ``AutoLaplaceApproximation`` is fitted (MAP) and then replaced by its
    Laplace approximation before scoring."""
    from pyro.infer.autoguide import AutoLaplaceApproximation

    t0 = time.perf_counter()
    fit_guide(model, guide, *args, num_steps=num_steps, lr=lr, num_particles=num_particles, **kwargs)
    if isinstance(guide, AutoLaplaceApproximation):
        try:
            guide = guide.laplace_approximation(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # no proper mode (e.g. a funnel): the Hessian is not PD
            return Row(name, seconds=time.perf_counter() - t0, note=f"failed: {str(e)[:60]}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_samples, parallel=True)(*args, **kwargs)
        diag = importance_diagnostics(guide_log_weights(model, guide, *args, num_samples=num_samples, **kwargs))
    mean_err, sd_err = moment_errors(flatten_draws(draws, names), ref_mean, ref_sd)
    return Row(name, diag.khat, diag.ess, mean_err, sd_err, seconds)


def run_nuts(model, *args, names, num_warmup: int, num_samples: int, ref_mean=None, ref_sd=None,
             seed: int = 0, max_tree_depth: int = 10, **kwargs):
    """NUTS draws of ``names`` as ``(N, total)``, and a :class:`Row` (ESS column: the smallest
    bulk ESS over coordinates as a fraction of the draws; errors only when a reference is given)."""
    import arviz

    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model, max_tree_depth=max_tree_depth), num_samples=num_samples, warmup_steps=num_warmup,
                disable_progbar=True)
    mcmc.run(*args, **kwargs)
    seconds = time.perf_counter() - t0
    draws = flatten_draws(mcmc.get_samples(), names)
    ess = arviz.ess({"x": draws.unsqueeze(0).numpy()})["x"].values.min() / num_samples
    row = Row("NUTS", ess=float(ess), seconds=seconds, note=f"{num_warmup}+{num_samples} draws, tree depth <= {max_tree_depth}")
    if ref_mean is not None:
        row.mean_err, row.sd_err = moment_errors(draws, ref_mean, ref_sd)
    return draws, row


def markdown_table(rows: list[Row], title: str = "") -> str:
    """The rows as a markdown table."""
    def f(x, fmt):
        return "-" if isinstance(x, float) and math.isnan(x) else format(x, fmt)

    lines = [f"## {title}", ""] if title else []
    lines += ["| method | k-hat | ESS | mean err (sd units) | sd rel. err | wall s | note |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {f(r.khat, '.2f')} | {f(100 * r.ess, '.1f')}{'' if math.isnan(r.ess) else '%'} | {f(r.mean_err, '.3f')} "
                     f"| {f(r.sd_err, '.3f')} | {f(r.seconds, '.1f')} | {r.note} |")
    return "\n".join(lines) + "\n"


def standard_guides(model, flow=None, *, all_pyro: bool = False, **flow_kw) -> dict[str, Callable]:
    """Factories of the compared guides: Pyro's AutoNormal, AutoMultivariateNormal,
    AutoIAFNormal, and AutoFlow (``flow=None``: its default); with ``all_pyro=True`` every Pyro autoguide that has a
    density over all latent sites (adds AutoDiagonalNormal, AutoLowRankMultivariateNormal,
    AutoLaplaceApproximation; AutoDelta is a point mass, so it has no k-hat) and AutoFlow with a
    standard-normal base (``tail_adaptive=False``)."""
    from pyro.infer import autoguide as ag

    from .autoguide import AutoFlow

    guides = {
        "AutoNormal": lambda: ag.AutoNormal(model),
        "AutoMultivariateNormal": lambda: ag.AutoMultivariateNormal(model),
        "AutoIAFNormal": lambda: ag.AutoIAFNormal(model),
    }
    if all_pyro:
        guides.update({
            "AutoDiagonalNormal": lambda: ag.AutoDiagonalNormal(model),
            "AutoLowRankMultivariateNormal": lambda: ag.AutoLowRankMultivariateNormal(model),
            "AutoLaplaceApproximation": lambda: ag.AutoLaplaceApproximation(model),
        })
    guides["AutoFlow"] = lambda: AutoFlow(model, flow, **flow_kw)
    if all_pyro:  # the benchmark also shows AutoFlow with the standard-normal base it had before
        guides["AutoFlow (Gaussian base)"] = lambda: AutoFlow(model, flow, **{"tail_adaptive": False, **flow_kw})
    return guides
