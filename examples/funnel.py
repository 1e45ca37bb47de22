"""Neal's funnel: which posterior approximation can follow its neck?

    v ~ N(0, 3^2),   x_i | v ~ N(0, e^v)   (i = 1..D-1)

A D-dimensional funnel (default D = 10) has exact moments, so every method is
scored against them.  The errors are those of the neck coordinate v (mean 0,
sd 3), the one that mean-field guides get wrong; the x_i have sd e^{9/4} but
such heavy tails that their sample sd is noise for every method.
Compared at the same SVI step budget: AutoNormal, AutoMultivariateNormal,
AutoIAFNormal, pyroflows' AutoFlow; and NUTS (which struggles in the neck).

    python examples/funnel.py --quick      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch

from pyroflows.infer.compare import markdown_table, run_guide, run_nuts, standard_guides

NAMES = ["v"]  # the scored coordinate


def model(dim: int = 10):
    """The funnel as a Pyro model (vectorisable over leading batch dimensions)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim - 1,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def exact_moments(dim: int = 10):
    """Exact mean and standard deviation of v (x_i: mean 0, sd sqrt(E[e^v]) = e^{9/4})."""
    return torch.zeros(1), torch.full((1,), 3.0)


def compare(dim=10, num_steps=3000, lr=1e-2, num_samples=4000, nuts=(300, 1000), flow=None, seed=0,
            num_particles=1, methods=None, all_pyro=False):
    """Fit every method; return the table rows."""
    ref_mean, ref_sd = exact_moments(dim)
    rows = []
    for name, make in standard_guides(model, flow, all_pyro=all_pyro).items():
        if methods and name not in methods:
            continue
        pyro.set_rng_seed(seed)
        rows.append(run_guide(name, model, make(), dim, names=NAMES, ref_mean=ref_mean, ref_sd=ref_sd,
                              num_steps=num_steps, lr=lr, num_samples=num_samples,
                              num_particles=num_particles))
        print(rows[-1], flush=True)
    if nuts:
        _, row = run_nuts(model, dim, names=NAMES, num_warmup=nuts[0], num_samples=nuts[1],
                          ref_mean=ref_mean, ref_sd=ref_sd, seed=seed, max_tree_depth=8)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (about a minute)")
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--particles", type=int, default=8, help="ELBO particles (vectorised), every guide")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        rows = compare(args.dim, num_steps=300, num_samples=1000, nuts=(100, 200))
    else:
        rows = compare(args.dim, num_steps=args.steps, num_particles=args.particles)
    print()
    print(markdown_table(rows, f"{args.dim}-D funnel (errors vs exact moments)"))


if __name__ == "__main__":
    main()
