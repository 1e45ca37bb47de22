"""One ``spline_coupling`` layer on Pyro's normalizing-flow tutorial setup, Pyro's against ours.

The setup of Pyro's "Normalizing Flows - Introduction (Part 1)": 1,000 points of
``make_circles(factor=0.5, noise=0.05)``, standardised; a standard normal base and one
``T.spline_coupling(2, count_bins=16)``; Adam at lr 5e-3 on the full batch for 5,002
steps, ``flow_dist.clear_cache()`` after each.  Scored on 20,000 fresh points of the same
distribution (standardised with the training scaler): mean test log-likelihood ± its
standard error, per seed (data and initialisation seeded alike for both libraries).
Models: Pyro's layer; ours at its defaults; ours at Pyro's widths (the same parameter
count); ours as a plain coupling (``identity=True``: the conditioning half unchanged).

Usage::

    python benchmarks/pyro_tutorial.py --seeds 0,1,2 [--steps 5001]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as PT
import torch
from sklearn import datasets
from sklearn.preprocessing import StandardScaler

import pyroflows.transforms as T

LAYERS = {
    "pyro": lambda: PT.spline_coupling(2, count_bins=16),
    "pyroflows": lambda: T.spline_coupling(2, count_bins=16),
    "pyroflows_pyro_width": lambda: T.spline_coupling(2, hidden_dims=(20, 20), count_bins=16),
    "pyroflows_identity_half": lambda: T.spline_coupling(2, count_bins=16, identity=True),
}


def data(seed: int, n_test: int = 20000):
    x, _ = datasets.make_circles(n_samples=1000, factor=0.5, noise=0.05, random_state=seed)
    xt, _ = datasets.make_circles(n_samples=n_test, factor=0.5, noise=0.05, random_state=10_000 + seed)
    scaler = StandardScaler().fit(x)
    return (torch.tensor(scaler.transform(x), dtype=torch.float), torch.tensor(scaler.transform(xt), dtype=torch.float))


def run(name: str, seed: int, steps: int) -> dict:
    train, test = data(seed)
    pyro.set_rng_seed(seed)
    layer = LAYERS[name]()
    flow_dist = dist.TransformedDistribution(dist.Normal(torch.zeros(2), torch.ones(2)), [layer])
    optimizer = torch.optim.Adam(layer.parameters(), lr=5e-3)
    t0 = time.process_time()
    for _ in range(steps + 1):
        optimizer.zero_grad()
        loss = -flow_dist.log_prob(train).mean()
        loss.backward()
        optimizer.step()
        flow_dist.clear_cache()
    seconds = time.process_time() - t0
    with torch.no_grad():
        ll = flow_dist.log_prob(test).double()
    return {"model": name, "seed": seed, "steps": steps, "params": sum(p.numel() for p in layer.parameters()),
            "train_nll": float(loss.detach()), "test_ll": float(ll.mean()), "se": float(ll.std() / np.sqrt(len(ll))),
            "cpu_s": round(seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--models", default=",".join(LAYERS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run(m, int(s), args.steps) for s in args.seeds.split(",") for m in args.models.split(",")]
    for r in rows:
        print(json.dumps(r), flush=True)
    print("\n| model | params | test log-likelihood per seed | mean |\n|---|---|---|---|")
    for m in args.models.split(","):
        rs = [r for r in rows if r["model"] == m]
        per = ", ".join(f"{r['test_ll']:.3f} ± {r['se']:.3f}" for r in rs)
        print(f"| {m} | {rs[0]['params']:,} | {per} | {np.mean([r['test_ll'] for r in rs]):.3f} |")


if __name__ == "__main__":
    main()
