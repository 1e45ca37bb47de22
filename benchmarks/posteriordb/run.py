"""Fit AutoFlow and Pyro's autoguides to the posteriordb posteriors at one budget and score
them against the reference draws.

Budget (the same for every guide): ``--steps`` SVI steps (2000) of ``Trace_ELBO`` with 8
vectorised particles, ClippedAdam lr 1e-2 decayed 10x over the run, clip norm 10
(:func:`pyroflows.infer.compare.fit_guide`).  Every guide runs with its defaults (the flat
priors' ``sample`` gives the unconstrained origin, :class:`.common.Flat`, so Pyro's init
strategies work).  Scores, from 4000 guide draws: PSIS k-hat, worst standardised mean error
``max_j |mean_j - ref_j| / sd_ref_j``, the range of ``sd_j / sd_ref_j``, and wall time per
SVI step.  One JSON line per (posterior, guide, seed) is appended to ``--out``;
``--table`` turns such files into the markdown table of docs/bench_posteriordb.md.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m benchmarks.posteriordb.run \\
        --posteriors kilpisjarvi gp_regr --guides AutoFlow AutoNormal --seeds 0 1 2 --out runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import autoguide as ag

from pyroflows.infer import AutoFlow
from pyroflows.infer.compare import fit_guide
from pyroflows.infer.diagnostics import guide_log_weights, importance_diagnostics

from . import POSTERIORS, load

#: every guide with its defaults
GUIDES = {
    "AutoFlow": AutoFlow,
    # the default before the tail-adaptive base (issue 12): a standard-normal base
    "AutoFlow (Gaussian base)": lambda model: AutoFlow(model, tail_adaptive=False),
    "AutoFlow (tail_df=30, the default before 2026-12-02)": lambda model: AutoFlow(model, tail_df=30.0),
    # the first defaults of issue 16's branch
    "AutoFlow, stl=True, average=0.99 (first defaults)":
        lambda model: AutoFlow(model, stl=True, average=0.99, tail_adaptive=False),
    "AutoNormal": ag.AutoNormal,
    "AutoMultivariateNormal": ag.AutoMultivariateNormal,
    "AutoIAFNormal": ag.AutoIAFNormal,
}


def score(post, guide, num_samples: int = 4000) -> dict:
    """k-hat, worst standardised mean error and the sd-ratio range against the reference draws."""
    ref, _ = post.reference()
    ref_mean, ref_sd = torch.as_tensor(ref.mean(0)), torch.as_tensor(ref.std(0))
    with torch.no_grad():
        # the guide's draws of the latent sites, vectorised left of the model's plates
        particles = pyro.plate("_draws", num_samples, dim=-post.max_plate_nesting - 1)
        trace = pyro.poutine.trace(particles(guide)).get_trace(*post.args)
        draws = post.flatten({s: trace.nodes[s]["value"] for s in post.shapes}).double()
        lw = guide_log_weights(post.model, guide, *post.args, num_samples=num_samples,
                               max_plate_nesting=post.max_plate_nesting)
    ratio = draws.std(0) / ref_sd
    out = {"mean_err": float(((draws.mean(0) - ref_mean).abs() / ref_sd).max()),
           "sd_ratio_min": float(ratio.min()), "sd_ratio_max": float(ratio.max())}
    try:
        out["khat"] = importance_diagnostics(lw).khat
    except ValueError as e:  # every weight zero, or NaN: no k-hat
        out["khat"], out["note"] = math.inf, str(e)[:80]
    return out


def run_one(name: str, guide_name: str, seed: int, steps: int, particles: int) -> dict:
    post = load(name)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = GUIDES[guide_name](post.model)
    row = {"posterior": name, "guide": guide_name, "seed": seed, "steps": steps}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            losses = fit_guide(post.model, guide, *post.args, num_steps=steps, lr=1e-2, num_particles=particles)
            row["nonfinite_losses"] = int(sum(not math.isfinite(x) for x in losses))
            row["final_loss"] = float(np.mean(losses[-100:]))
        except Exception as e:  # a crash is a result here
            row["crashed"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["traceback"] = traceback.format_exc()[-1500:]
    row["sec_per_step"] = (time.perf_counter() - t0) / steps
    if getattr(guide, "start", None) is not None:  # AutoFlow: "laplace" or "init_loc"
        row["start"] = guide.start
    row["warnings"] = sorted({str(w.message)[:160] for w in caught if "pyroflows" in str(w.filename) or "AutoFlow" in str(w.message)})
    if "crashed" not in row:
        try:
            row.update(score(post, guide))
        except Exception as e:
            row["crashed"] = f"scoring: {type(e).__name__}: {str(e)[:200]}"
    return row


def ok(r) -> bool:
    return ("crashed" not in r and r["khat"] < 0.7 and r["mean_err"] < 0.2
            and 0.8 <= r["sd_ratio_min"] and r["sd_ratio_max"] <= 1.2)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (posterior, guide) with the per-seed numbers separated by ' / '."""
    out = ["| posterior | guide | seeds | k-hat | worst mean err (sd) | sd ratio range | ms / step | meets bar |",
           "|---|---|---|---|---|---|---|---|"]
    order = {n: i for i, n in enumerate(POSTERIORS)}
    gorder = {g: i for i, g in enumerate(GUIDES)}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["posterior"], r["guide"]), []).append(r)
    for (p, g), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), gorder.get(kv[0][1], 99))):
        rs = sorted(rs, key=lambda r: r["seed"])

        def col(f, rs=rs):
            return " / ".join("crash" if "crashed" in r else f(r) for r in rs)

        khat = col(lambda r: format(r["khat"], ".2f"))
        err = col(lambda r: format(r["mean_err"], ".2f"))
        sds = col(lambda r: format(r["sd_ratio_min"], ".2f") + "-" + format(r["sd_ratio_max"], ".2f"))
        ms = col(lambda r: format(1000 * r["sec_per_step"], ".0f"))
        seeds = ",".join(str(r["seed"]) for r in rs)
        out.append(f"| {p} | {g} | {seeds} | {khat} | {err} | {sds} | {ms} | {sum(ok(r) for r in rs)}/{len(rs)} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), choices=list(POSTERIORS))
    ap.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/posteriordb/runs.jsonl")
    ap.add_argument("--table", metavar="JSONL", nargs="+", help="print the markdown table of results files and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table:
        rows = []
        for path in args.table:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        print(table(rows))
        return
    for name in args.posteriors:
        for guide_name in args.guides:
            for seed in args.seeds:
                row = run_one(name, guide_name, seed, args.steps, args.particles)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                brief = {k: v for k, v in row.items() if k != "traceback"}
                print(json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()
