"""Which flow should AutoFlow default to?  Short SVI runs on the funnel and eight schools.

Every candidate: the same SVI budget (Trace_ELBO, 1 particle, ClippedAdam lr 1e-2 decayed
10x, as ``benchmarks/autoguides.py``), then PSIS k-hat and importance ESS from 4000 draws.
Prints one markdown row per (problem, flow); the findings are recorded in
docs/bench_autoguides.md.

    python benchmarks/autoflow_default.py --problems funnel --steps 1000
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

from pyroflows.infer import AutoFlow  # noqa: E402
from pyroflows.infer.compare import fit_guide  # noqa: E402

CANDIDATES = {
    "nsf (bound 5)": ("nsf", {"bound": 5.0}),
    "nsf (bound 10)": ("nsf", {"bound": 10.0}),
    "nsf (AutoFlow default)": ("nsf", {}),
    "realnvp": ("realnvp", {}),
    "maf": ("maf", {}),
    "iaf": ("iaf", {}),
}
PROBLEMS = {"funnel": (funnel.model, (10,)), "eight_schools": (eight_schools.model, ())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--problems", nargs="*", default=list(PROBLEMS))
    p.add_argument("--flows", nargs="*", default=list(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| problem | flow | k-hat | ESS | final loss (mean of last 100) | wall s |\n|---|---|---|---|---|---|")
    for problem in args.problems:
        model, margs = PROBLEMS[problem]
        for label in args.flows:
            name, kw = CANDIDATES[label]
            pyro.set_rng_seed(args.seed)
            guide = AutoFlow(model, name, **kw)
            t0 = time.perf_counter()
            try:
                losses = fit_guide(model, guide, *margs, num_steps=args.steps, lr=1e-2)
            except ValueError as e:  # a NaN/inf parameter reaches the model: the fit diverged
                print(f"| {problem} | {label} | diverged | - | - | {time.perf_counter() - t0:.0f} | "
                      f"{str(e).splitlines()[0][:60]}", flush=True)
                continue
            secs = time.perf_counter() - t0
            d = guide.diagnostics(*margs, num_samples=4000)
            tail = sum(losses[-100:]) / len(losses[-100:])
            print(f"| {problem} | {label} | {d.khat:.2f} | {100 * d.ess:.1f}% | {tail:.2f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
