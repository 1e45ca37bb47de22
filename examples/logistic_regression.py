"""Bayesian logistic regression on scikit-learn's breast-cancer data (569 x 30, standardised).

    b ~ N(0, 5^2),  w_j ~ N(0, 1) (j = 1..30),  y_n ~ Bernoulli(sigmoid(b + x_n . w))

The data are close to separable, so the 31-D posterior is skewed and strongly
correlated: mean-field guides are overconfident there.  The same table as the
funnel and eight schools, against NUTS as the reference.

    python examples/logistic_regression.py --quick      # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch

from pyroflows.infer.compare import markdown_table, run_guide, run_nuts, standard_guides

NAMES = ["b", "w"]


def load_data(dtype=torch.float32):
    """Standardised features and 0/1 labels of the breast-cancer data set."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)


def model(x, y=None):
    """Logistic regression (vectorisable over leading batch dimensions)."""
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    w = pyro.sample("w", dist.Normal(0.0, torch.ones(x.shape[-1])).to_event(1))
    with pyro.plate("data", x.shape[0]):
        logits = b + (w * x).sum(-1)  # w: (..., 1, D) against x: (N, D)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def compare(num_steps=3000, lr=1e-2, num_samples=4000, nuts=(500, 2000), flow=None, seed=0,
            num_particles=1, methods=None, all_pyro=False, ref=None):
    """Fit every method; return the table rows.  ``ref``: precomputed ``(draws, Row)`` of the NUTS
    reference (e.g. cached by ``benchmarks/autoguides.py``)."""
    x, y = load_data()
    if ref is None:
        ref = run_nuts(model, x, y, names=NAMES, num_warmup=nuts[0], num_samples=nuts[1], seed=seed)
    ref, nuts_row = ref
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    nuts_row.method, nuts_row.note = "NUTS (reference)", nuts_row.note
    print(nuts_row, flush=True)
    rows = []
    for name, make in standard_guides(model, flow, all_pyro=all_pyro).items():
        if methods and name not in methods:
            continue
        pyro.set_rng_seed(seed)
        rows.append(run_guide(name, model, make(), x, y, names=NAMES, ref_mean=ref_mean, ref_sd=ref_sd,
                              num_steps=num_steps, lr=lr, num_samples=num_samples,
                              num_particles=num_particles))
        print(rows[-1], flush=True)
    return rows + [nuts_row]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (a few minutes)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--particles", type=int, default=8, help="ELBO particles (vectorised), every guide")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        rows = compare(num_steps=300, num_samples=1000, nuts=(200, 400))
    else:
        rows = compare(num_steps=args.steps, num_particles=args.particles)
    print()
    print(markdown_table(rows, "Logistic regression, breast cancer (errors vs NUTS)"))


if __name__ == "__main__":
    main()
