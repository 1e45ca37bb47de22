"""AutoFlow on posteriors with polynomial (heavier than Gaussian) tails (issue 12, item 3).

Two posteriors with exact reference moments, each fitted by every guide with the same SVI budget
as ``benchmarks/autoguides.py`` (Trace_ELBO with 8 vectorised particles, ClippedAdam lr 1e-2 decayed
10x, 2000 steps), then scored by PSIS k-hat and importance ESS from 4000 guide draws and by the
errors of the posterior means and standard deviations:

* ``student_t``: a 5-D multivariate Student-t with 3 degrees of freedom and correlated coordinates
  (density decays like ``|x|^-8``; mean 0, covariance ``3 Sigma``).
* ``cauchy_location``: the location ``mu ~ N(0, 10^2)`` of three Cauchy observations
  (``y = 0.3, -0.4, 0.1``); the posterior decays like ``|mu|^-6`` until the prior cuts it off at
  ``|mu| ~ 20`` (exact moments by quadrature on a grid).

A guide built by affine maps of a Gaussian has Gaussian tails, so ``p / q`` grows without bound in
the tails and k-hat is large; the tail-adaptive base (AutoFlow's default) can learn the tail weight.

    python benchmarks/heavy_tails.py --seeds 0 1 2          # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyroflows.infer import AutoFlow  # noqa: E402
from pyroflows.infer.compare import markdown_table, run_guide, standard_guides  # noqa: E402

DF = 3.0
SCALE_TRIL = torch.linalg.cholesky(0.5 * torch.eye(5) + 0.5 * torch.ones(5, 5))  # unit variances, correlation 0.5
Y = torch.tensor([0.3, -0.4, 0.1])
PRIOR_SD = 10.0


def student_t():
    """A 5-D multivariate Student-t (3 degrees of freedom) as a Pyro model."""
    pyro.sample("x", dist.MultivariateStudentT(torch.tensor(DF), torch.zeros(5), SCALE_TRIL))


def student_t_moments():
    sd = (DF / (DF - 2) * (SCALE_TRIL @ SCALE_TRIL.T).diagonal()).sqrt()
    return torch.zeros(5), sd


def cauchy_location():
    """The location of three Cauchy observations under a wide normal prior (vectorisable)."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    pyro.sample("y", dist.Cauchy(mu.unsqueeze(-1), 1.0).to_event(1), obs=Y)


def cauchy_location_moments():
    grid = torch.linspace(-300.0, 300.0, 600_001, dtype=torch.float64)
    logp = dist.Normal(0.0, PRIOR_SD).log_prob(grid) + dist.Cauchy(grid[:, None], 1.0).log_prob(Y.double()).sum(-1)
    w = torch.softmax(logp, 0)
    mean = (w * grid).sum()
    sd = (w * (grid - mean) ** 2).sum().sqrt()
    return mean.float().reshape(1), sd.float().reshape(1)


PROBLEMS = {"student_t": (student_t, ["x"], student_t_moments),
            "cauchy_location": (cauchy_location, ["mu"], cauchy_location_moments)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--problems", nargs="*", default=list(PROBLEMS))
    p.add_argument("--methods", nargs="*", default=None, help="only these guides (e.g. AutoFlow)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for problem in args.problems:
        model, names, moments = PROBLEMS[problem]
        ref_mean, ref_sd = moments()
        guides = standard_guides(model)
        guides["AutoFlow (Gaussian base)"] = lambda model=model: AutoFlow(model, tail_adaptive=False)
        if args.methods is not None:
            guides = {name: make for name, make in guides.items() if name in args.methods}
        for seed in args.seeds:
            rows = []
            for name, make in guides.items():
                pyro.set_rng_seed(seed)
                rows.append(run_guide(name, model, make(), names=names, ref_mean=ref_mean, ref_sd=ref_sd,
                                      num_steps=args.steps, lr=1e-2, num_samples=args.samples,
                                      num_particles=args.particles))
            print(markdown_table(rows, f"{problem}, seed {seed}"), flush=True)


if __name__ == "__main__":
    main()
