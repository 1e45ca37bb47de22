"""AutoFlow against every Pyro autoguide at the same SVI step budget; writes docs/bench_autoguides.md.

Problems: the 10-D funnel (scored against exact moments of v), centred eight
schools and breast-cancer logistic regression (scored against NUTS).  Every
guide: the same number of Trace_ELBO steps and particles (default 8, vectorised), ClippedAdam with the
same learning rate decayed 10x over the run; then PSIS k-hat and importance
ESS from 4000 guide draws.

    python benchmarks/autoguides.py                 # tens of minutes on 2 shared cores
    python benchmarks/autoguides.py --steps 500 --problems funnel   # a smoke run
    python benchmarks/autoguides.py --methods AutoFlow --out new.md  # only AutoFlow's rows

The NUTS reference draws (eight schools, logistic regression) are cached in
``benchmarks/nuts_refs/*.npz`` on first use and reused afterwards; with
``--methods`` the NUTS comparison rows (funnel, centred eight schools) are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import eight_schools  # noqa: E402
import funnel  # noqa: E402
import logistic_regression  # noqa: E402

from pyroflows.infer.compare import Row, markdown_table, run_nuts  # noqa: E402


REFS = ROOT / "benchmarks" / "nuts_refs"


def cached_draws(name: str, make):
    """NUTS reference draws ``(N, D)`` and their wall seconds, from ``benchmarks/nuts_refs/<name>.npz``
    when present, else computed by ``make() -> (draws, seconds)`` and stored there."""
    import numpy as np

    path = REFS / f"{name}.npz"
    if path.exists():
        z = np.load(path)
        print(f"reusing the NUTS reference {path.relative_to(ROOT)}", flush=True)
        return torch.from_numpy(z["draws"]), float(z["seconds"])
    draws, seconds = make()
    REFS.mkdir(exist_ok=True)
    np.savez_compressed(path, draws=draws.numpy(), seconds=seconds)
    return draws, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--problems", nargs="*", default=["funnel", "eight_schools", "logistic_regression"])
    p.add_argument("--seed", type=int, default=0, help="RNG seed of every fit (k-hat varies by ~0.1 between seeds)")
    p.add_argument("--particles", type=int, default=8, help="ELBO particles (vectorised), for every guide")
    p.add_argument("--flow", default=None, help="AutoFlow's flow: a name in pyroflows.flows (default: AutoFlow's own)")
    p.add_argument("--methods", nargs="*", default=None, help="only these guides (e.g. AutoFlow)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_autoguides.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    flow_name = ("AutoFlow's default (pyroflows.infer.autoguide.default_flow: 3 affine IAF layers, log-scale bound 10; "
                 "plus the triangular linear layer, Student-t base from 5 degrees of freedom, Laplace start, the model's "
                 "latent-scaled normal sites non-centred inside the guide)" if args.flow is None else
                 f"`{args.flow}` (pyroflows.flows.{args.flow} with its defaults, as AutoFlow builds it)")
    common = {"num_steps": args.steps, "lr": args.lr, "num_particles": args.particles, "num_samples": args.samples, "all_pyro": True, "flow": args.flow,
              "seed": args.seed,
              "methods": args.methods}
    sections = []
    t0 = time.perf_counter()
    for problem in args.problems:
        if problem == "funnel":
            rows = funnel.compare(10, nuts=None if args.methods else (300, 1000), **common)
            title = "10-D funnel (errors of v's mean and sd vs the exact 0 and 3)"
        elif problem == "eight_schools":
            nuts = (1000, 4000)
            ref = cached_draws(f"eight_schools_noncentred_{nuts[0]}_{nuts[1]}",
                               lambda nuts=nuts: eight_schools.reference(*nuts, seed=0))
            rows = eight_schools.compare(nuts=nuts, ref=ref, centred_nuts=not args.methods, **common)
            title = "Eight schools, centred (errors vs non-centred NUTS, 4000 draws)"
        elif problem == "logistic_regression":
            nuts = (500, 2000)

            def make_ref(nuts=nuts):
                x, y = logistic_regression.load_data()
                draws, row = run_nuts(logistic_regression.model, x, y, names=logistic_regression.NAMES,
                                      num_warmup=nuts[0], num_samples=nuts[1], seed=0)
                return draws, row.seconds

            draws, secs = cached_draws(f"logistic_regression_{nuts[0]}_{nuts[1]}", make_ref)
            ess = float(__import__("arviz").ess({"x": draws.unsqueeze(0).numpy()})["x"].values.min() / len(draws))
            nuts_row = Row("NUTS (reference)", ess=ess, seconds=secs, note=f"{nuts[0]}+{nuts[1]} draws, tree depth <= 10")
            rows = logistic_regression.compare(nuts=nuts, ref=(draws, nuts_row), **common)
            title = "Logistic regression, breast cancer, 31-D (errors vs NUTS, 2000 draws)"
        else:
            raise ValueError(f"unknown problem {problem!r}")
        sections.append(markdown_table(rows, title))
        print(sections[-1], flush=True)
    header = [
        "# AutoFlow vs Pyro's autoguides",
        "",
        f"Generated by `benchmarks/autoguides.py` ({time.perf_counter() - t0:.0f} s, 1 thread, 2 shared cores).",
        f"Every guide: {args.steps} SVI steps, Trace_ELBO with {args.particles} vectorised particle(s), "
        f"ClippedAdam lr {args.lr} decayed 10x;",
        f"k-hat and ESS from {args.samples} guide draws; seed {args.seed}. AutoFlow's flow: {flow_name}.",
        "k-hat < 0.5: good; < 0.7: usable; larger: importance weights unreliable. ESS: importance ESS",
        "as a fraction of the draws (for NUTS: smallest bulk ESS / draws). mean err: largest |mean - ref| in",
        "reference sds; sd err: largest |sd / ref sd - 1|. Wall time of the fit (NUTS: of the whole run).",
        "",
    ]
    Path(args.out).write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
