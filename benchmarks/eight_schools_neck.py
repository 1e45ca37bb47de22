"""Why AutoFlow's k-hat on centred eight schools stays above 0.5 (issue 12, item 3): the neck.

Centred eight schools has a funnel: given ``tau``, each ``theta_j`` has sd about ``tau``, and the
posterior of ``log tau`` has a long exponential left tail (20% of its mass below 0, 2.8% below -2,
non-centred NUTS).  A guide that does not reach into that neck has importance weights ``p / q``
that blow up there, which is what PSIS k-hat measures; the ``mle_nuts`` variant shows that this is
not the whole story (``docs/bench_autoguides.md``, "Eight schools' neck").

For each training variant (``--variants``) and seed the script fits ``AutoFlow(eight_schools.model)``
and prints PSIS k-hat and ESS from 4000 guide draws (k-hat moves by about 0.1 between two sets of
4000 draws of one guide, so it also prints k-hat from ``--big-samples`` = 40000), and how far the guide reaches into the neck:
its mass below ``log tau = 0`` and its 1% and 5% quantiles of ``log tau`` (``--draws`` = 20000), beside
the NUTS reference's.  Every variant but ``mle_nuts`` trains with ``fit_guide``'s budget (ClippedAdam
lr 1e-2 decayed 10x, clip 10, Trace_ELBO with 8 vectorised particles, 2000 steps):

* ``default``: ``AutoFlow(model)`` as it ships, which non-centres ``theta`` inside the guide
  (``pyroflows.infer.noncentring``: the flow draws ``(mu, log tau, eta)`` and the guide gives
  ``theta = mu + tau * eta``, its density still one over the centred ``(mu, log tau, theta)``);
* ``centred``: ``AutoFlow(model, noncentre=False)``, the guide before that layer; every variant
  below is a change to this centred guide:
* ``steps_10000``: the same, 10000 steps;
* ``layers_5``: five IAF layers instead of three;
* ``anneal``: the target tempered, ``beta log p`` with ``beta`` rising linearly from 0.3 to 1 over
  the first half of the run (Rezende & Mohamed 2015; what ``distill`` does);
* ``stl``: ``AutoFlow(model, stl=True)``, the path-derivative gradient;
* ``is_forward_kl``: the ELBO plus the self-normalised importance-weighted forward KL of the
  particles, ``-sum_s w_s log q(theta_s)`` with ``w`` the softmax of the detached log weights and
  the draws detached (``distill``'s mass-covering term, Mueller et al. 2019);
* ``mle_nuts``: no ELBO at all: the guide's flow fitted by maximum likelihood to the 4000
  non-centred NUTS draws (mapped to the guide's unconstrained coordinates), Adam 3e-3 decayed 10x,
  6000 steps of 256 rows.  It asks whether the family, given exact posterior draws, reaches
  k-hat < 0.5 at all;
* ``reparam_noncentred`` and ``reparam_auto``: the guide is fitted to the model as Pyro's
  ``poutine.reparam`` rewrites it, ``theta`` non-centred (``LocScaleReparam(centered=0)``) or every
  loc-scale site with a learned centredness (``AutoReparam``, Gorinova et al. 2020).  The posterior
  of ``(mu, tau, theta)`` is the same, but the guide then works on different latents, so k-hat is
  that of a different density: what a user can do instead, not this benchmark's goal.

    python benchmarks/eight_schools_neck.py --seeds 0 1 2                  # about 35 min in one process
    python benchmarks/eight_schools_neck.py --variants default anneal --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.reparam import AutoReparam, LocScaleReparam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import eight_schools  # noqa: E402

from pyroflows.infer import AutoFlow  # noqa: E402
from pyroflows.infer.autoguide import _FlowDensity  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "nuts_refs" / "eight_schools_noncentred_1000_4000.npz"
LOG_TAU = 1  # the reference's columns are (mu, log tau, theta_1..8)


def reference_unconstrained() -> torch.Tensor:
    """The NUTS draws ``(mu, tau, theta)`` as the guide's unconstrained ``(mu, log tau, theta)``."""
    draws = torch.from_numpy(np.load(REFERENCE)["draws"]).float()
    return torch.cat([draws[:, :1], draws[:, 1:2].log(), draws[:, 2:]], dim=1)


class ImportanceWeightedForwardKL(Trace_ELBO):
    r"""Trace_ELBO plus ``weight`` times :math:`-\sum_s \bar w_s \log q(\theta_s)`, the particles'
    self-normalised importance-weighted forward KL (draws and weights detached).  For an
    :class:`AutoFlow` guide with vectorised particles."""

    def __init__(self, guide: AutoFlow, weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.guide, self.weight = guide, weight

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        n = self.num_particles
        log_w = 0.0
        for trace, sign in ((model_trace, 1), (guide_trace, -1)):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + sign * site["log_prob"].reshape(n, -1).sum(-1)
        g = self.guide
        latent = guide_trace.nodes[f"_{g._pyro_name}_latent"]["value"].reshape(n, -1)
        log_q = _FlowDensity(g.flow, g.affine, g._noncentring((), {}))(latent.detach())
        forward_kl = -(torch.softmax(log_w.detach(), 0) * log_q).sum()
        elbo = log_w.mean()
        return float(-elbo.detach()), -elbo + self.weight * forward_kl


def fit_svi(variant: str, steps: int, particles: int) -> AutoFlow:
    kwargs = {"layers_5": {"num_layers": 5}, "stl": {"stl": True}}.get(variant, {})
    if variant != "default":
        kwargs["noncentre"] = False
    model = eight_schools.model
    if variant == "reparam_noncentred":
        model = poutine.reparam(model, config={"theta": LocScaleReparam(centered=0.0)})
    elif variant == "reparam_auto":
        model = poutine.reparam(model, config=AutoReparam())
    guide = AutoFlow(model, **kwargs)
    beta = [1.0]

    def tempered(*args, **kw):
        with poutine.scale(scale=beta[0]):
            return model(*args, **kw)

    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1.0 / steps), "clip_norm": 10.0})
    if variant == "is_forward_kl":
        guide()  # builds the flow, which the loss needs
        loss = ImportanceWeightedForwardKL(guide, num_particles=particles, vectorize_particles=True)
    else:
        loss = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(tempered, guide, optim, loss)
    for i in range(steps):
        if variant == "anneal":
            beta[0] = min(1.0, 0.3 + 0.7 * i / (steps // 2))
        svi.step()
    return guide


def fit_mle(reference: torch.Tensor, steps: int) -> AutoFlow:
    guide = AutoFlow(eight_schools.model, noncentre=False)
    guide()
    optim = torch.optim.Adam(guide.parameters(), lr=3e-3)
    for i in range(steps):
        rows = reference[torch.randint(len(reference), (256,))]
        loss = -guide.get_posterior().log_prob(rows).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        for group in optim.param_groups:
            group["lr"] = 3e-3 * 0.1 ** ((i + 1) / steps)
    return guide


def neck(log_tau: torch.Tensor) -> str:
    q01, q05 = torch.quantile(log_tau, torch.tensor([0.01, 0.05])).tolist()
    return f"{100 * float((log_tau < 0).float().mean()):.1f}% | {q01:.2f} | {q05:.2f}"


VARIANTS = ["default", "centred", "steps_10000", "layers_5", "anneal", "stl", "is_forward_kl", "mle_nuts", "reparam_noncentred",
            "reparam_auto"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--steps", type=int, default=2000, help="SVI steps (steps_10000: 5x; mle_nuts: 3x)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--samples", type=int, default=4000, help="guide draws for k-hat and ESS")
    p.add_argument("--big-samples", type=int, default=40000, help="guide draws for the second k-hat")
    p.add_argument("--draws", type=int, default=20000, help="guide draws for the log tau quantiles")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    reference = reference_unconstrained()
    print(f"| variant | seed | k-hat | k-hat ({args.big_samples} draws) | ESS | mass below log tau 0 | 1% of log tau "
          "| 5% of log tau | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| NUTS reference (non-centred) | - | - | - | - | {neck(reference[:, LOG_TAU])} | - |", flush=True)
    for variant in args.variants:
        for seed in args.seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            start = time.perf_counter()
            if variant == "mle_nuts":
                guide = fit_mle(reference, 3 * args.steps)
            else:
                guide = fit_svi(variant, 5 * args.steps if variant == "steps_10000" else args.steps, args.particles)
            seconds = time.perf_counter() - start
            d = guide.diagnostics(num_samples=args.samples)
            big = guide.diagnostics(num_samples=args.big_samples)
            log_tau = guide.sample_posterior(args.draws)["tau"].log()
            print(f"| {variant} | {seed} | {d.khat:.2f} | {big.khat:.2f} | {100 * d.ess:.1f}% | {neck(log_tau)} "
                  f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
