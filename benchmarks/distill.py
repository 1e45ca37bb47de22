"""Reverse-KL distillation benchmarks; writes docs/bench_distill.md.

1. ``distill`` on 2-D targets with known normalisers: the energies U1-U4 of
   Rezende & Mohamed on the box [-4, 4]^2 (log Z by quadrature) and an
   8-component Gaussian mixture on a ring (exact log Z): error of the
   importance-sampled log Z (goal: < 0.05), ESS, k-hat; for the mixture, the
   share of flow samples nearest each mode (goal: every mode covered), with
   annealing alone and with annealing plus a forward-KL term on 200 samples.
2. ``distill_flow``: a MAF teacher fitted by maximum likelihood to the digits
   data (8x8 scikit-learn digits, dequantised and standardised, 64-D), distilled
   into an IAF student: KL(student || teacher) and the sampling speed-up.

    python benchmarks/distill.py            # tens of minutes on 2 shared cores
    python benchmarks/distill.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import energies  # noqa: E402

from pyroflows import Flow, flows  # noqa: E402
from pyroflows.infer import distill, distill_flow  # noqa: E402
from pyroflows.infer.compare import default_flow  # noqa: E402

# -- 8-component mixture --------------------------------------------------------------------
RADIUS, SD, LOG_C = 4.0, 0.5, 2.0
MODES = torch.stack([RADIUS * torch.tensor([math.cos(a), math.sin(a)])
                     for a in torch.arange(8) * 2 * math.pi / 8])


def mixture_log_density(x):
    """LOG_C + log of the equal-weight mixture of N(m_k, SD^2 I) (so log Z = LOG_C exactly)."""
    d2 = ((x.unsqueeze(-2) - MODES) ** 2).sum(-1)
    log_n = -0.5 * d2 / SD**2 - math.log(2 * math.pi * SD**2)
    return LOG_C + torch.logsumexp(log_n, -1) - math.log(8)


def mixture_samples(n):
    k = torch.randint(8, (n,))
    return MODES[k] + SD * torch.randn(n, 2)


def mode_shares(flow, n=20000):
    x = flow.sample((n,))
    nearest = ((x.unsqueeze(-2) - MODES) ** 2).sum(-1).argmin(-1)
    return torch.bincount(nearest, minlength=8).double() / n


def plain_flow(dim):
    spec = default_flow()
    if isinstance(spec, str):
        return getattr(flows, spec)(dim)
    return Flow(spec(dim), event_shape=(dim,))


# -- MAF teacher, IAF student ----------------------------------------------------------------
def _autoregressive_stand_in(dim, layers, inverse):
    """Pyro's AffineAutoregressive (IAF direction) or its inverse (MAF), with reversals."""
    from pyro.distributions.transforms import Permute, affine_autoregressive

    modules, transforms = nn.ModuleList(), []
    for i in range(layers):
        t = affine_autoregressive(dim, hidden_dims=[2 * dim, 2 * dim])
        modules.append(t)
        transforms.append(t.inv if inverse else t)
        if i < layers - 1:
            transforms.append(Permute(torch.arange(dim - 1, -1, -1)))
    flow = Flow(transforms, event_shape=(dim,))
    flow.stand_in_layers = modules  # registers the parameters of the inverted layers
    return flow


def make_maf(dim, layers=4):
    if hasattr(flows, "maf"):
        return flows.maf(dim, num_layers=layers) if "num_layers" in flows.maf.__code__.co_varnames else flows.maf(dim)
    return _autoregressive_stand_in(dim, layers, inverse=True)


def make_iaf(dim, layers=4):
    if hasattr(flows, "iaf"):
        return flows.iaf(dim, num_layers=layers) if "num_layers" in flows.iaf.__code__.co_varnames else flows.iaf(dim)
    return _autoregressive_stand_in(dim, layers, inverse=False)


def digits_data():
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32)
    x = x + torch.rand_like(x)  # dequantise
    return (x - x.mean(0)) / x.std(0)


def fit_mle(flow, data, steps, lr=1e-3, batch=256):
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,))
        loss = -flow.log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(-flow.log_prob(data).mean())


def time_sampling(flow, n=5000, repeats=3):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        flow.sample((n,))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=1500, help="distill steps per 2-D target (annealing: half)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_distill.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    q = args.quick
    steps = 300 if q else args.steps
    anneal = steps // 2
    spec = default_flow()
    flow_name = spec if isinstance(spec, str) else f"stand-in `{spec.__name__}` (pyroflows.flows.nsf not merged yet)"
    t_start = time.perf_counter()
    lines = ["# Reverse-KL distillation", "",
             f"Generated by `benchmarks/distill.py`{' --quick' if q else ''} (1 thread, 2 shared cores). Flow: {flow_name}.",
             "", (f"## 2-D targets with known normalisers ({steps} steps, 256 samples/step, annealing over "
             f"{anneal} steps; log Z from 4096 draws)"), "",
             "| target | exact log Z | distilled log Z | abs error | ESS | k-hat | wall s |", "|---|---|---|---|---|---|---|"]

    # energies on the box
    for name, (_, res, exact, secs) in energies.run(num_steps=steps, anneal_steps=anneal, lr=3e-3,
                                                    progress=False).items():
        lines.append(f"| {name} on [-4,4]^2 | {exact:.4f} | {res.log_z:.4f} +- {res.log_z_se:.4f} | "
                     f"{abs(res.log_z - exact):.4f} | {100 * res.ess:.1f}% | {res.khat:.2f} | {secs:.0f} |")
        print(lines[-1], flush=True)

    # the mixture, with and without target samples
    shares = {}
    for label, kw in [("anneal", {}), ("anneal + forward KL (200 samples)", {"target_samples": None})]:
        torch.manual_seed(0)
        if "target_samples" in kw:
            kw = {"target_samples": mixture_samples(200), "forward_kl_weight": 1.0}
        flow = plain_flow(2)
        t0 = time.perf_counter()
        res = distill(flow, mixture_log_density, num_steps=steps, num_samples=256, lr=3e-3, anneal_steps=anneal,
                      progress=False, **kw)
        secs = time.perf_counter() - t0
        shares[label] = mode_shares(flow)
        lines.append(f"| 8-mode mixture, {label} | {LOG_C:.4f} | {res.log_z:.4f} +- {res.log_z_se:.4f} | "
                     f"{abs(res.log_z - LOG_C):.4f} | {100 * res.ess:.1f}% | {res.khat:.2f} | {secs:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "Share of 20000 flow samples nearest each of the 8 modes (1/8 = 12.5% each is exact):", "",
              "| run | " + " | ".join(f"mode {k}" for k in range(8)) + " | min |", "|---" * 10 + "|"]
    for label, s in shares.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}%" for v in s) + f" | {100 * s.min():.1f}% |")

    # teacher -> student
    torch.manual_seed(0)
    data = digits_data()
    dim = data.shape[1]
    teacher, student = make_maf(dim), make_iaf(dim)
    mle_steps, kd_steps = (200, 200) if q else (2000, steps)
    t0 = time.perf_counter()
    nll = fit_mle(teacher, data, mle_steps)
    fit_secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = distill_flow(teacher, student, num_steps=kd_steps, num_samples=256, lr=1e-3, progress=False)
    kd_secs = time.perf_counter() - t0
    with torch.no_grad():
        x = teacher.sample((4000,))
        forward_kl = float((teacher.log_prob(x) - student.log_prob(x)).mean())
    t_teacher, t_student = time_sampling(teacher), time_sampling(student)
    kind = "pyroflows maf/iaf" if hasattr(flows, "maf") else "stand-ins: Pyro AffineAutoregressive x4 (inverse for MAF)"
    lines += ["", f"## Teacher -> student (`distill_flow`), digits 64-D ({kind})", "",
              "| quantity | value |", "|---|---|",
              f"| teacher MLE fit | {mle_steps} steps, {fit_secs:.0f} s, train NLL {nll:.2f} nats |",
              f"| distillation | {kd_steps} steps x 256 student samples, {kd_secs:.0f} s |",
              f"| KL(student \\|\\| teacher) (reverse, student draws) | {-res.elbo:.3f} nats |",
              f"| KL(teacher \\|\\| student) (forward, teacher draws) | {forward_kl:.3f} nats |",
              f"| importance ESS / k-hat (student as proposal for teacher) | {100 * res.ess:.1f}% / {res.khat:.2f} |",
              f"| teacher sampling, 5000 draws | {1000 * t_teacher:.1f} ms |",
              f"| student sampling, 5000 draws | {1000 * t_student:.1f} ms |",
              f"| speed-up | {t_teacher / t_student:.1f}x |", "",
              f"Total {time.perf_counter() - t_start:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-12:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
