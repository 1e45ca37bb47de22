"""Eight schools (Rubin 1981), centred parametrisation: a funnel inside a real model.

    mu ~ N(0, 5^2),  tau ~ HalfCauchy(5),  theta_j ~ N(mu, tau^2),  y_j ~ N(theta_j, sigma_j^2)

The guides see the centred model (the hard geometry); the NUTS reference runs
on the equivalent non-centred model (theta_j = mu + tau * eta_j), which it
samples well.  Table: PSIS k-hat, importance ESS, the largest error of the
posterior means (in posterior sds) and of the sds (relative), and wall time.

    python examples/eight_schools.py --quick      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch

from pyroflows.infer.compare import flatten_draws, markdown_table, run_guide, run_nuts, standard_guides

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
NAMES = ["mu", "tau", "theta"]


def model(y=Y, sigma=SIGMA):
    """Centred eight schools (vectorisable over leading batch dimensions)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentred(y=Y, sigma=SIGMA):
    """The same posterior, non-centred, for the NUTS reference."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def reference(num_warmup=1000, num_samples=4000, seed=0):
    """NUTS draws of (mu, tau, theta) from the non-centred model, and its table row."""
    import time

    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(noncentred), num_samples=num_samples, warmup_steps=num_warmup, disable_progbar=True)
    mcmc.run()
    seconds = time.perf_counter() - t0
    samples = mcmc.get_samples()
    samples["theta"] = samples["mu"][:, None] + samples["tau"][:, None] * samples["eta"]
    return flatten_draws(samples, NAMES), seconds


def compare(num_steps=3000, lr=1e-2, num_samples=4000, nuts=(1000, 4000), flow=None, seed=0,
            num_particles=1, methods=None, all_pyro=False, ref=None, centred_nuts=True):
    """Fit every method; return the table rows.  ``ref``: precomputed ``(draws, seconds)`` of the
    non-centred NUTS reference (e.g. cached by ``benchmarks/autoguides.py``); ``centred_nuts``:
    add the row of NUTS on the centred model."""
    ref, ref_seconds = reference(*nuts, seed=seed) if ref is None else ref
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    rows = []
    for name, make in standard_guides(model, flow, all_pyro=all_pyro).items():
        if methods and name not in methods:
            continue
        pyro.set_rng_seed(seed)
        rows.append(run_guide(name, model, make(), names=NAMES, ref_mean=ref_mean, ref_sd=ref_sd,
                              num_steps=num_steps, lr=lr, num_samples=num_samples,
                              num_particles=num_particles))
        print(rows[-1], flush=True)
    if not centred_nuts:
        return rows
    # NUTS on the centred model, scored against the non-centred reference
    _, row = run_nuts(model, names=NAMES, num_warmup=nuts[0] // 2, num_samples=nuts[1] // 4,
                      ref_mean=ref_mean, ref_sd=ref_sd, seed=seed + 1)
    row.method, row.note = "NUTS (centred)", row.note + f"; reference: non-centred NUTS {ref_seconds:.0f}s"
    rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (about a minute)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--particles", type=int, default=8, help="ELBO particles (vectorised), every guide")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        rows = compare(num_steps=300, num_samples=1000, nuts=(200, 800))
    else:
        rows = compare(num_steps=args.steps, num_particles=args.particles)
    print()
    print(markdown_table(rows, "Eight schools, centred (errors vs non-centred NUTS)"))


if __name__ == "__main__":
    main()
