r"""Continuous normalizing flows on the 2-D toy densities, at an equal compute budget.

``ffjord`` (pyroflows' :class:`~pyroflows.transforms.ContinuousFlow`), zuko's
``CNF`` and pyroflows' ``nsf`` (coupling RQ splines) are each trained by
maximum likelihood for the same number of **CPU seconds** on one thread
(``torch.set_num_threads(1)``; on a dedicated core CPU time equals wall-clock
time, and on a shared machine it is the fair measure), with Adam and a cosine
learning-rate decay over the elapsed fraction of the budget, on fresh batches
from a seeded stream.  Then, on ``--n-test`` fresh samples,

.. math::

    \mathrm{KL}(p\,\|\,q) \approx \frac1n \sum_i \log p(x_i) - \log q(x_i)

(``pyroflows.data`` densities have exact ``log_prob``), with its standard
error, and the test NLL.  Per training step: CPU seconds, and function
evaluations of the vector field (for ``ffjord`` the solver's count,
``nfe_total``; for zuko's CNF the calls of its MLP, counted by a forward hook;
the backward pass of both backpropagates through the solver's operations, so
it adds no evaluations).  ``nsf`` has no ODE (NFE "-").

One JSON line per (density, model) is appended to ``--results``; the markdown
table ``--out`` is regenerated from all lines of that file.

Usage (the runs in ``docs/bench_cnf.md``)::

    python benchmarks/cnf_2d.py --densities eight_gaussians --budget 300
    python benchmarks/cnf_2d.py --densities two_moons --budget 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyroflows import flows  # noqa: E402
from pyroflows.data import toy_density  # noqa: E402
from pyroflows.transforms.continuous import ContinuousFlow, regularization_loss  # noqa: E402

DENSITIES = ("eight_gaussians", "checkerboard", "rings", "two_moons")


class _Zuko(torch.nn.Module):
    """zuko's CNF through ``log_prob(x)``, counting calls of its vector field."""

    def __init__(self):
        super().__init__()
        import zuko

        self.flow = zuko.flows.CNF(2, hidden_features=(64, 64))
        self.calls = 0
        self.flow.transform.ode.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1

    def log_prob(self, x):
        return self.flow().log_prob(x)

    def nfe_total(self):
        return self.calls


MODELS = {
    # one ContinuousFlow, MLP 64-64 tanh, exact trace (D = 2), dopri5 at the float32 default tol 1.4e-5
    "ffjord": lambda: flows.ffjord(2, hidden_dims=(64, 64)),
    # the same with Finlay et al.'s kinetic + Jacobian-Frobenius penalties (0.01 each)
    "ffjord_rnode": lambda: flows.ffjord(2, hidden_dims=(64, 64), kinetic_energy=0.01, jacobian_norm=0.01),
    # zuko's CNF: MLP 64-64 ELU with a 6-frequency time embedding, exact trace, atol 1e-6 rtol 1e-5
    "zuko_cnf": _Zuko,
    # coupling RQ splines, 5 layers, 8 bins
    "nsf": lambda: flows.nsf(2, num_layers=5, hidden_dims=(64, 64), count_bins=8, bound=5.0),
}


def nfe_total(model) -> int | None:
    if isinstance(model, _Zuko):
        return model.nfe_total()
    layers = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    return sum(m.nfe_total for m in layers) if layers else None


def train(model, density, *, budget: float, batch_size: int, lr: float, seed: int, clip: float = 5.0):
    """Adam for ``budget`` CPU seconds, lr cosine-decayed over the elapsed fraction of the budget."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps, recent = 0, []
    nfe0 = nfe_total(model)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while (used := time.process_time() - cpu0) < budget:
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * used / budget))
        x = density.sample(batch_size, generator=gen)
        loss = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        (loss + regularization_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        steps += 1
        recent = (recent + [loss.item()])[-50:]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    nfe = nfe_total(model)
    return {"steps": steps, "train_cpu_s": cpu, "train_wall_s": wall, "cpu_per_step": cpu / steps,
            "nfe_per_step": None if nfe is None else (nfe - nfe0) / steps,
            "train_nll": sum(recent) / len(recent)}


@torch.no_grad()
def kl_estimate(model, density, n_test: int, seed: int):
    model.eval()
    x = density.sample(n_test, seed=seed)
    log_p = density.log_prob(x.double())
    log_q = torch.cat([model.log_prob(c) for c in x.split(2500)]).double()
    diff = log_p - log_q
    return {"kl": float(diff.mean()), "se": float(diff.std() / math.sqrt(n_test)),
            "test_nll": float(-log_q.mean()), "entropy": float(-log_p.mean()),
            "nonfinite": int((~torch.isfinite(diff)).sum())}


def report(rows) -> str:
    lines = ["| density | model | params | budget (CPU s) | steps | CPU s / step | NFE / step | "
             "train NLL | test NLL | KL(p‖q) ± se |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (DENSITIES.index(r["density"]), r["model"])):
        nfe = "-" if r["nfe_per_step"] is None else f"{r['nfe_per_step']:.0f}"
        lines.append(f"| {r['density']} | {r['model']} | {r['params']:,} | {r['budget']:.0f} | {r['steps']} | "
                     f"{r['cpu_per_step']:.3f} | {nfe} | {r['train_nll']:.3f} | {r['test_nll']:.3f} | "
                     f"{r['kl']:.3f} ± {r['se']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--densities", default="eight_gaussians,two_moons")
    p.add_argument("--models", default="ffjord,zuko_cnf,nsf")
    p.add_argument("--budget", type=float, default=300.0, help="CPU seconds of training per model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "cnf_2d.jsonl"))
    p.add_argument("--out", default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for dname in a.densities.split(","):
        density = toy_density(dname)
        for mname in a.models.split(","):
            torch.manual_seed(a.seed)
            model = MODELS[mname]()
            row = {"density": dname, "model": mname, "budget": a.budget, "batch_size": a.batch_size, "lr": a.lr,
                   "seed": a.seed, "n_test": a.n_test,
                   "params": sum(q.numel() for q in model.parameters() if q.requires_grad)}
            row |= train(model, density, budget=a.budget, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
            row |= kl_estimate(model, density, a.n_test, seed=a.seed + 1_000_003)
            print(json.dumps(row), flush=True)
            with open(a.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    table = report(rows)
    print(table)
    if a.out:
        Path(a.out).write_text(table)


if __name__ == "__main__":
    main()
