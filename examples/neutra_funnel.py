"""NeuTra-NUTS on Neal's funnel: precondition HMC with a trained AutoFlow.

Hoffman et al. (2019): fit a flow guide q = f#N(0, I) by SVI, then run NUTS on
z, where theta = f(z); if q is close to the posterior, the pulled-back target
is close to N(0, I), and NUTS needs short trajectories and a single step size
for both the neck and the mouth of the funnel.  Reported: effective samples
per second (smallest bulk ESS over coordinates; the neck v is the hard one)
of plain NUTS and of NeuTra-NUTS (whose time includes the SVI fit), and the
error of v's mean and sd (exact: 0 and 3).  Both samplers get the same
maximum tree depth (8; 5 with --quick), which bounds plain NUTS's cost in the neck.

    python examples/neutra_funnel.py --quick      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import time

import arviz
import pyro
import torch
from funnel import model
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam

from pyroflows.infer import AutoFlow
from pyroflows.infer.compare import fit_guide


def ess_min(draws: torch.Tensor) -> float:
    """Smallest bulk ESS over the columns of (N, D) draws (one chain)."""
    return float(arviz.ess({"x": draws.unsqueeze(0).numpy()})["x"].values.min())


def run(dim=10, svi_steps=3000, warmup=300, samples=1000, seed=0, max_tree_depth=8):
    """Plain NUTS and NeuTra-NUTS; returns rows (method, min ESS, seconds, ESS/s, v mean, v sd)."""
    rows = []
    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model, max_tree_depth=max_tree_depth), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(dim)
    s = mcmc.get_samples()
    secs = time.perf_counter() - t0
    draws = torch.cat([s["v"][:, None], s["x"]], -1)
    rows.append(("NUTS", ess_min(draws), secs, draws[:, 0]))
    print(f"plain NUTS done in {secs:.0f}s", flush=True)

    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    guide = AutoFlow(model)
    fit_guide(model, guide, dim, num_steps=svi_steps, lr=1e-2)
    fit_secs = time.perf_counter() - t0
    print(f"AutoFlow fitted in {fit_secs:.0f}s: {guide.diagnostics(dim, num_samples=1000)}", flush=True)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    mcmc = MCMC(NUTS(neutra.reparam(model), max_tree_depth=max_tree_depth), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(dim)
    z = mcmc.get_samples()["v_shared_latent"]
    s = neutra.transform_sample(z)
    secs = time.perf_counter() - t0
    draws = torch.cat([s["v"][:, None], s["x"]], -1).detach()
    rows.append((f"NeuTra-NUTS (SVI {fit_secs:.0f}s incl.)", ess_min(draws), secs, draws[:, 0]))
    return rows


def table(rows, dim) -> str:
    out = [f"### NeuTra on the {dim}-D funnel", "",
           "| method | min ESS | wall s | ESS / s | mean v (exact 0) | sd v (exact 3) |", "|---|---|---|---|---|---|"]
    for name, ess, secs, v in rows:
        out.append(f"| {name} | {ess:.0f} | {secs:.1f} | {ess / secs:.2f} | {float(v.mean()):.2f} "
                   f"| {float(v.std()):.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (about a minute)")
    p.add_argument("--dim", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kw = {"svi_steps": 500, "warmup": 50, "samples": 100, "max_tree_depth": 5} if args.quick else {}
    rows = run(args.dim, **kw)
    print(table(rows, args.dim))


if __name__ == "__main__":
    main()
