"""Which flow and training options should AutoFlow default to?  Short SVI runs on the
funnel, eight schools and the logistic regression.

Every candidate: the same SVI budget (Trace_ELBO with ``--particles`` vectorised particles,
ClippedAdam lr 1e-2 decayed 10x, as ``benchmarks/autoguides.py``), then PSIS k-hat and
importance ESS from 4000 draws.  Prints one markdown row per (problem, candidate, seed); the
findings are recorded in docs/bench_autoguides.md and in AutoFlow's docstring.

    python benchmarks/autoflow_default.py --problems funnel --candidates default iaf2 --steps 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import eight_schools  # noqa: E402
import funnel  # noqa: E402
import logistic_regression  # noqa: E402

from pyroflows import flows  # noqa: E402
from pyroflows.infer import AutoFlow  # noqa: E402
from pyroflows.infer.autoguide import default_flow  # noqa: E402
from pyroflows.infer.compare import fit_guide  # noqa: E402
from pyroflows.transforms.elementwise import elementwise  # noqa: E402
from pyroflows.transforms.transformers import Affine  # noqa: E402

OLD = {"init_scale": 0.1, "linear": False, "stl": False}  # AutoFlow's settings before the STL study

#: label -> (flow, AutoFlow keyword arguments)
CANDIDATES = {
    "default": (None, {}),
    "default, no STL": (None, {"stl": False}),
    "nsf (old default)": ("nsf", OLD),
    "iaf (old settings)": ("iaf", OLD),
    "realnvp (old settings)": ("realnvp", OLD),
    "maf (old settings)": ("maf", OLD),
    "iaf, init_scale 1": ("iaf", {"init_scale": 1.0, "linear": False, "stl": False}),
    "realnvp, init_scale 1": ("realnvp", {"init_scale": 1.0, "linear": False, "stl": False}),
    "iaf2, no linear": ("iaf", {"num_layers": 2, "linear": False}),
    "iaf2": ("iaf", {"num_layers": 2}),
    "iaf2 bound 10": (lambda d: flows.iaf(d, num_layers=2, kind=Affine(10.0)), {}),
    "iaf5": ("iaf", {}),
    "iaf5 bound 10": (lambda d: flows.iaf(d, kind=Affine(10.0)), {}),
    "nsf, new settings": ("nsf", {}),
    # a full-covariance Gaussian (the linear layer alone) trained with STL: AutoMultivariateNormal + STL
    "gaussian + STL": (lambda d: [elementwise(d, kind="affine")], {}),
    "gaussian, no STL": (lambda d: [elementwise(d, kind="affine")], {"stl": False}),
    # a two-sided sinh-arcsinh layer on the base side (it can make exponential / polynomial tails
    # that affine layers on a Gaussian base cannot), then the default flow
    "default + sinh-arcsinh base layer": (
        lambda d: [elementwise(d, kind="sinh_arcsinh"), *default_flow(d).transforms], {}),
    # the same layer on the data side of the flow (before AutoFlow's linear and affine layers)
    "default + sinh-arcsinh data-side layer": (
        lambda d: [*default_flow(d).transforms, elementwise(d, kind="sinh_arcsinh")], {}),
}


def problems():
    x, y = logistic_regression.load_data()
    return {"funnel": (funnel.model, (10,)), "eight_schools": (eight_schools.model, ()),
            "logistic_regression": (logistic_regression.model, (x, y))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--problems", nargs="*", default=["funnel", "eight_schools"])
    p.add_argument("--candidates", nargs="*", default=["default"], help=f"from {list(CANDIDATES)}")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    probs = problems()
    print("| problem | candidate | seed | k-hat | ESS | final loss (mean of last 100) | wall s |\n"
          "|---|---|---|---|---|---|---|")
    for problem in args.problems:
        model, margs = probs[problem]
        for label in args.candidates:
            flow, kw = CANDIDATES[label]
            for seed in args.seeds:
                pyro.set_rng_seed(seed)
                guide = AutoFlow(model, flow, **kw)
                t0 = time.perf_counter()
                try:
                    losses = fit_guide(model, guide, *margs, num_steps=args.steps, lr=1e-2,
                                       num_particles=args.particles)
                except ValueError as e:  # a NaN/inf parameter reaches the model: the fit diverged
                    print(f"| {problem} | {label} | {seed} | diverged | - | - | {time.perf_counter() - t0:.0f} | "
                          f"{str(e).splitlines()[0][:60]}", flush=True)
                    continue
                secs = time.perf_counter() - t0
                d = guide.diagnostics(*margs, num_samples=4000)
                tail = sum(losses[-100:]) / len(losses[-100:])
                print(f"| {problem} | {label} | {seed} | {d.khat:.2f} | {100 * d.ess:.1f}% | {tail:.2f} | {secs:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
