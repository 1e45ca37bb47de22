r"""Density-estimation quality on the 2-D toy densities: KL(p || q) of each flow, next to zuko's NSF.

For a toy density :math:`p` with an exact ``log_prob`` (``pyroflows.data``)
and a flow :math:`q` fitted to samples of it,

.. math::

    \mathrm{KL}(p\,\|\,q) = E_{x\sim p}[\log p(x) - \log q(x)]
    \approx \frac1n \sum_{i=1}^n \log p(x_i) - \log q(x_i),

over ``n`` fresh test samples, reported with its standard error
:math:`\mathrm{sd}/\sqrt n`.  Equivalently: the test NLL minus the true
density's (Monte Carlo) entropy on the same points.  ``TwoMoons`` has no
closed-form density: its ``log_prob`` is a 256-node Gauss-Legendre quadrature
of the angle integral (relative error below 1e-10), so it counts as exact here.

Every model gets the same training budget: the same stream of training
batches (fresh samples from a generator seeded per density), the same number
of Adam steps, batch size, learning rate, cosine decay to zero, and gradient
clipping.  Parameter counts are matched to zuko's NSF within a few percent
(see ``MODELS``).  The residual flows train with their own stochastic log-det
estimators (``iresnet``: truncated series, ``residual_flow``: Russian roulette)
and are evaluated with the exact log-det (``log_det = "exact"`` on every block).

Raw results are appended, one JSON line per (density, model), to ``--results``
as each run finishes; the markdown table ``--out`` is regenerated from all
lines in that file after every run, so several invocations (e.g. the slow
residual flows in a second process) can share one table.

Usage (the runs reported in ``docs/bench_quality_2d.md``, two processes side by side)::

    python benchmarks/quality_2d.py --steps 2000 --lr 3e-3 --models zuko_nsf,nsf,maf,realnvp
    python benchmarks/quality_2d.py --steps 2000 --lr 3e-3 --models iresnet,residual_flow --densities two_moons
    python benchmarks/quality_2d.py --steps 2000 --lr 3e-3 --models nsf_swap
    python benchmarks/quality_2d.py --steps 2000 --lr 3e-3 --models maf_swap
    python benchmarks/quality_2d.py --report-only --notes NOTES.md   # rewrite the table from --results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyroflows import flows  # noqa: E402
from pyroflows.data import toy_density  # noqa: E402
from pyroflows.transforms.transformers import Inverted, make_transformer  # noqa: E402

DENSITIES = ("eight_gaussians", "checkerboard", "rings", "two_moons")

#: Plot window per density (xmin, xmax, ymin, ymax).
BOUNDS = {
    "eight_gaussians": (-3.2, 3.2, -3.2, 3.2),
    "checkerboard": (-4.4, 4.4, -4.4, 4.4),
    "rings": (-3.8, 3.8, -3.8, 3.8),
    "two_moons": (-1.6, 2.6, -1.3, 1.8),
}


class _ZukoAdapter(torch.nn.Module):
    """A zuko lazy flow seen through ``log_prob(x)`` like a pyroflows ``Flow``."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def log_prob(self, x):
        return self.flow().log_prob(x)


def _swapped_rq():
    """The RQ spline in the normalizing direction (zuko/nflows convention)."""
    return Inverted(make_transformer("rq_spline", 8, 5.0))


def _zuko_nsf():
    import zuko

    return _ZukoAdapter(zuko.flows.NSF(2, transforms=4, hidden_features=(64, 64), bins=8))


def _zuko_default(name):
    import zuko

    return _ZukoAdapter(getattr(zuko.flows, name)(2))


#: Model builders; the comments give the trainable-parameter counts (D = 2).
MODELS = {
    # zuko's NSF: 4 masked-autoregressive RQ-spline transforms, 8 bins, bound 5: 29,368
    "zuko_nsf": _zuko_nsf,
    # coupling RQ spline, 5 layers, 8 bins, bound 5: 28,915
    # (spline in the generative direction; before nsf's default became the normalizing one)
    "nsf": lambda: flows.nsf(2, num_layers=5, hidden_dims=(64, 64), count_bins=8, bound=5.0, direction="generative"),
    # the same, with the spline in the normalizing direction (zuko/nflows convention; nsf's default now): 28,915
    "nsf_swap": lambda: flows.nsf(2, num_layers=5, hidden_dims=(64, 64), count_bins=8, bound=5.0, direction="normalizing"),
    # MAF with RQ-spline transformers, 4 layers (the same structure as zuko's NSF): 29,368
    "maf": lambda: flows.maf(2, num_layers=4, hidden_dims=(64, 64), kind="rq_spline", count_bins=8, bound=5.0),
    # the same, with the spline in the normalizing direction: exactly zuko's NSF architecture: 29,368
    "maf_swap": lambda: flows.maf(2, num_layers=4, hidden_dims=(64, 64), kind=_swapped_rq()),
    # every library's defaults, nothing set (issue 12): pyroflows' nsf(2) / maf(2), zuko's NSF(2) / MAF(2)
    "nsf_default": lambda: flows.nsf(2),
    "maf_default": lambda: flows.maf(2),
    # maf(2) with 3 layers: zuko's MAF(2) default depth, and within 1% of its parameter count
    "maf_3_layers": lambda: flows.maf(2, num_layers=3),
    "zuko_nsf_default": lambda: _zuko_default("NSF"),
    "zuko_maf_default": lambda: _zuko_default("MAF"),
    # affine couplings, 6 layers of width 67: 28,956
    "realnvp": lambda: flows.realnvp(2, num_layers=6, hidden_dims=(67, 67)),
    # 6 contractive residual blocks of width 67, series log-det (5 terms) in training: 29,370
    "iresnet": lambda: flows.iresnet(2, num_blocks=6, hidden_dims=(67, 67)),
    # 6 contractive residual blocks of width 67, Russian-roulette log-det in training: 29,370
    "residual_flow": lambda: flows.residual_flow(2, num_blocks=6, hidden_dims=(67, 67)),
}

RESIDUAL = ("iresnet", "residual_flow")


def count_params(model: torch.nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(name: str) -> torch.nn.Module:
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None


def _set_exact_log_det(model) -> int:
    """Switch every InvertibleResidual block to the exact log-det; returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "log_det") and hasattr(m, "exact_log_det"):
            m.log_det = "exact"
            n += 1
    return n


def train(model, density, *, steps: int, batch_size: int, lr: float, seed: int, clip: float = 5.0):
    """Adam with cosine decay to zero, gradient-norm clipping; batches from a seeded stream.

    Returns ``(wall seconds, CPU seconds, final-100-step mean training NLL)``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    recent = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x = density.sample(batch_size, generator=gen)
        loss = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        recent.append(loss.item())
        recent = recent[-100:]
    return time.perf_counter() - wall0, time.process_time() - cpu0, sum(recent) / len(recent)


@torch.no_grad()
def kl_estimate(model, density, n_test: int, seed: int, chunk: int = 10_000):
    """``(kl, se, test_nll, entropy_hat, n_nonfinite)`` on ``n_test`` fresh samples of ``density``."""
    model.eval()
    x = density.sample(n_test, seed=seed)
    log_p = density.log_prob(x.double())
    log_q = torch.cat([model.log_prob(c) for c in x.split(chunk)]).double()
    diff = log_p - log_q
    bad = int((~torch.isfinite(diff)).sum())
    kl = float(diff.mean())
    se = float(diff.std() / math.sqrt(n_test))
    return kl, se, float(-log_q.mean()), float(-log_p.mean()), bad


def run_one(density_name: str, model_name: str, *, steps: int = 2000, batch_size: int = 512,
            lr: float = 1e-3, n_test: int = 20_000, seed: int = 0):
    """Train ``model_name`` on ``density_name`` and measure its KL; returns ``(row, model)``.

    The row is a dict with ``density, model, params, steps, batch_size, lr,
    kl, se, test_nll, entropy, train_nll, train_wall_s, train_cpu_s, nonfinite``."""
    density = toy_density(density_name)
    torch.manual_seed(seed)
    model = build(model_name)
    params = count_params(model)
    wall, cpu, train_nll = train(model, density, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    if model_name in RESIDUAL:
        _set_exact_log_det(model)
    kl, se, nll, ent, bad = kl_estimate(model, density, n_test, seed=seed + 1_000_003)
    row = {"density": density_name, "model": model_name, "params": params, "steps": steps,
           "batch_size": batch_size, "lr": lr, "n_test": n_test, "seed": seed, "kl": kl, "se": se,
           "test_nll": nll, "entropy": ent, "train_nll": train_nll, "train_wall_s": wall,
           "train_cpu_s": cpu, "nonfinite": bad}
    return row, model


def run(densities=DENSITIES, models=tuple(MODELS), *, steps: int = 2000, batch_size: int = 512,
        lr: float = 1e-3, n_test: int = 20_000, seed: int = 0, on_row=None, on_density=None):
    """Every (density, model) pair; ``on_row(row)`` after each run, ``on_density(name, trained)``
    after each density with the dict of trained models.  Returns the list of rows."""
    rows = []
    for d in densities:
        trained = {}
        for m in models:
            row, model = run_one(d, m, steps=steps, batch_size=batch_size, lr=lr, n_test=n_test, seed=seed)
            rows.append(row)
            trained[m] = model
            if on_row is not None:
                on_row(row)
        if on_density is not None:
            on_density(d, trained)
    return rows


# ----------------------------------------------------------------------------
# output
def plot_density(density_name: str, trained: dict, img_dir: Path, grid: int = 120):
    """PNG of the true density next to our nsf and zuko's NSF (when both were trained)."""
    if "nsf" not in trained or "zuko_nsf" not in trained:
        return None
    from pyroflows import plot

    density = toy_density(density_name)
    fig = plot.compare_2d(density, trained["nsf"], trained["zuko_nsf"], bounds=BOUNDS[density_name], grid=grid,
                          titles=[f"true {density_name}", "pyroflows nsf", "zuko NSF"])
    fig.set_size_inches(9, 3)
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / f"quality_2d_{density_name}.png"
    fig.savefig(path, dpi=60)
    plot.close(fig)
    return path


def _fmt_table(rows):
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    dens = [d for d in DENSITIES if any(r["density"] == d for r in rows)]
    by = {(r["density"], r["model"]): r for r in rows}  # later lines win (reruns)
    lines = ["| density | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for d in dens:
        cells = []
        for m in models:
            r = by.get((d, m))
            cells.append("" if r is None else f"{r['kl']:.3f} ± {r['se']:.3f}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    header = ("| density | model | params | KL (nats) | se | test NLL | entropy (MC) | train CPU s | "
              "train wall s | non-finite |")
    detail = [header, "|---" * 10 + "|"]
    for d in dens:
        for m in models:
            r = by.get((d, m))
            if r is not None:
                detail.append(f"| {d} | {m} | {r['params']:,} | {r['kl']:.4f} | {r['se']:.4f} | "
                              f"{r['test_nll']:.4f} | {r['entropy']:.4f} | {r['train_cpu_s']:.0f} | "
                              f"{r['train_wall_s']:.0f} | {r['nonfinite']} |")
    return "\n".join(lines), "\n".join(detail)


def write_markdown(rows, path: Path, commands, img_dir: Path, notes: str = ""):
    table, detail = _fmt_table(rows)
    conds = sorted({(r["steps"], r["batch_size"], r["lr"], r["n_test"]) for r in rows})
    cond_txt = "; ".join(f"{s} steps, batch {b}, lr {lr:g}, {n:,} test samples" for s, b, lr, n in conds)
    imgs = sorted(img_dir.glob("quality_2d_*.png"))
    rel = os.path.relpath(img_dir, path.parent)
    pics = "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in imgs)
    text = f"""# Quality on the 2-D toy densities: KL(p || q)

Generated by `benchmarks/quality_2d.py` ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC).

Commands:

```
{chr(10).join(commands)}
```

Conditions: {cond_txt}.  Adam, cosine learning-rate decay to 0, gradient-norm clip 5, the same
seeded stream of fresh training batches for every model on a density, model init seed 0.
KL = mean over fresh test samples x ~ p of log p(x) - log q(x) (= test NLL - entropy
estimate on the same points), ± its standard error. The residual flows are trained with their
stochastic log-det (iresnet: 5-term series; residual_flow: Russian roulette) and evaluated with
the exact log-det. {torch.get_num_threads()} torch thread, torch {torch.__version__},
Python {platform.python_version()}, on a CPU shared with other jobs (wall times are noisy; CPU
seconds are the process's own).

## KL (nats), lower is better (goal: <= 0.05 and no worse than zuko_nsf)

{table}

## Details

{detail}

{notes}

## Learned densities (true | pyroflows nsf | zuko NSF)

{pics}
"""
    path.write_text(text)


def _read_rows(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--densities", default=",".join(DENSITIES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=Path("/tmp/bench_quality_2d.jsonl"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_quality_2d.md")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--notes", type=Path, default=None, help="markdown file appended under the tables")
    p.add_argument("--report-only", action="store_true", help="only rewrite --out from --results (and --notes)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    densities = [d for d in args.densities.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    command = "python benchmarks/quality_2d.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    def refresh():
        rows = _read_rows(args.results)
        commands = list(dict.fromkeys(r.get("command", "") for r in rows))
        notes = args.notes.read_text() if args.notes is not None and args.notes.exists() else ""
        write_markdown(rows, args.out, commands, args.img_dir, notes)

    if args.report_only:
        refresh()
        return

    def on_row(row):
        row["command"] = command
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['density']:>16} {row['model']:>14} params={row['params']:>6} "
              f"KL={row['kl']:.4f}±{row['se']:.4f} cpu={row['train_cpu_s']:.0f}s", flush=True)
        refresh()

    def on_density(name, trained):
        path = plot_density(name, trained, args.img_dir)
        if path is not None:
            print(f"wrote {path}", flush=True)
            refresh()

    run(densities, models, steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_test=args.n_test,
        seed=args.seed, on_row=on_row, on_density=on_density)


if __name__ == "__main__":
    main()
