"""Per-step cost of AutoFlow's default guide against Pyro's AutoIAFNormal (issue 12, item 4).

On the three problems of ``docs/bench_autoguides.md`` (10-D funnel, centred eight schools,
the 31-D breast-cancer logistic regression), each guide with its defaults takes the same SVI
steps (``Trace_ELBO``, 8 vectorised particles, ClippedAdam lr 1e-2), one torch thread.  The
guides alternate in rounds of ``--block`` steps (ABAB...), so that load from other processes
on a shared machine falls on both alike; the report is the median over rounds of the CPU
seconds per step, and their ratio.  The one-off setup (AutoFlow's Laplace start, Pyro's
prototype trace) is timed separately, as the first call.

    PYTHONPATH=$PWD python benchmarks/autoflow_cost.py --rounds 10 --block 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import eight_schools  # noqa: E402
import funnel  # noqa: E402
import logistic_regression  # noqa: E402

from pyroflows.infer import AutoFlow  # noqa: E402


def problems():
    x, y = logistic_regression.load_data()
    return {"funnel": (funnel.model, ()), "eight_schools": (eight_schools.model, ()),
            "logistic_regression": (logistic_regression.model, (x, y))}


def make_svi(model, guide):
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 10.0})
    return SVI(model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--problems", nargs="+", default=list(problems()))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| problem | AutoFlow setup s | AutoIAFNormal setup s | AutoFlow ms / step | "
          "AutoIAFNormal ms / step | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in a.problems:
        model, args = problems()[name]
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        guides = {"AutoFlow": AutoFlow(model), "AutoIAFNormal": AutoIAFNormal(model)}
        svis, setup, per_step = {}, {}, {g: [] for g in guides}
        for g, guide in guides.items():
            t0 = time.process_time()
            guide(*args)  # the first call builds the guide (AutoFlow: the Laplace start)
            setup[g] = time.process_time() - t0
            svis[g] = make_svi(model, guide)
            svis[g].step(*args)  # warm-up step (optimizer state)
        for _ in range(a.rounds):
            for g, svi in svis.items():
                t0 = time.process_time()
                for _ in range(a.block):
                    svi.step(*args)
                per_step[g].append((time.process_time() - t0) / a.block)
        af, iaf = (statistics.median(per_step[g]) for g in ("AutoFlow", "AutoIAFNormal"))
        print(f"| {name} | {setup['AutoFlow']:.2f} | {setup['AutoIAFNormal']:.2f} | {1e3 * af:.1f} | "
              f"{1e3 * iaf:.1f} | {af / iaf:.2f} |", flush=True)


if __name__ == "__main__":
    main()
