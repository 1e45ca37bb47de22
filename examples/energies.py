"""Distilling the 2-D energies U1-U4 of Rezende & Mohamed (2015) into a flow.

Each target is p(z) proportional to exp(-U(z)) on the box [-4, 4]^2 (U2-U4 are
not normalisable on the whole plane).  The flow maps a standard normal through
the flow layers, then a sigmoid and an affine map onto the box, so its samples
never leave it.  ``pyroflows.infer.distill`` fits it by reverse KL with an
annealed target, a cosine learning-rate decay and the importance-weighted
forward-KL term (against dropping a branch), and estimates log Z by importance sampling; the exact log Z
comes from quadrature on a 1000 x 1000 grid.  Plots: target density and flow
samples, one row per energy (PNG).

    python examples/energies.py --quick            # a couple of minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.distributions import AffineTransform

from pyroflows import Flow
from pyroflows.infer import distill
from pyroflows.transforms import sigmoid

BOX = 4.0


def _w1(z):
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z):
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


# each exp(-U) is a sum of components (its modes, or branches): U = -logsumexp(components);
# the components give the exact mass of each mode, which the benchmark compares with the flow's
def u1_components(z):
    ring = -0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2  # two crescents, left and right
    return torch.stack([ring - 0.5 * ((z[..., 0] + 2) / 0.6) ** 2, ring - 0.5 * ((z[..., 0] - 2) / 0.6) ** 2])


def u2_components(z):
    return (-0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2).unsqueeze(0)  # one sine band


def u3_components(z):
    return torch.stack([-0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2, -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2])


def u4_components(z):
    return torch.stack([-0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2, -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2])


COMPONENTS = {"U1": u1_components, "U2": u2_components, "U3": u3_components, "U4": u4_components}


def u1(z):
    return -torch.logsumexp(u1_components(z), 0)


def u2(z):
    return -torch.logsumexp(u2_components(z), 0)


def u3(z):
    return -torch.logsumexp(u3_components(z), 0)


def u4(z):
    return -torch.logsumexp(u4_components(z), 0)


ENERGIES = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def grid_log_z(log_density, box=BOX, n=1000) -> float:
    """log of the integral of exp(log_density) over [-box, box]^2 (midpoint rule, float64)."""
    return float(torch.logsumexp(log_density(_grid(box, n)), 0) + 2 * math.log(2 * box / n))


def _grid(box=BOX, n=1000):
    h = 2 * box / n
    c = -box + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    return torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)


def mode_masses(name: str, flow=None, n: int = 20000):
    """The share of each component (mode) of ``exp(-U)``: exact, from quadrature on the box,
    and, with ``flow``, the flow's: the mean over ``n`` flow draws of each component's
    responsibility :math:`e^{c_k(z)} / \\sum_j e^{c_j(z)}`.  Returns ``(exact, flow_share)``."""
    exact = torch.softmax(torch.logsumexp(COMPONENTS[name](_grid()), 1), 0)
    if flow is None:
        return exact, None
    with torch.no_grad():
        z = flow.sample((n,)).double()
    return exact, torch.softmax(COMPONENTS[name](z), 0).mean(1)


def box_flow(flow="nsf", dim=2, box=BOX) -> Flow:
    """Flow layers, then sigmoid and affine onto [-box, box]^dim."""
    if isinstance(flow, str):
        from pyroflows import flows

        layers = list(getattr(flows, flow)(dim)().transforms)
    else:
        layers = list(flow(dim))
    # cache_size=1: scoring the flow's own samples then reuses the forward pass instead of
    # inverting a saturated sigmoid (which loses all precision near the box edges in float32)
    layers += [sigmoid(dim), AffineTransform(torch.full((dim,), -box), torch.full((dim,), 2 * box), event_dim=1,
                                             cache_size=1)]
    return Flow(layers, event_shape=(dim,))


def run(names=tuple(ENERGIES), num_steps=3000, num_samples=256, lr=3e-3, anneal_steps=1500, seed=0,
        progress=True, flow="nsf", **distill_kw):
    """Distil each energy; returns {name: (flow, DistillResult, exact log Z, seconds)}.

    Other keywords go to :func:`pyroflows.infer.distill` (e.g. ``lr_schedule``)."""
    out, flow_spec = {}, flow
    for name in names:
        torch.manual_seed(seed)
        energy = ENERGIES[name]
        flow = box_flow(flow_spec)
        t0 = time.perf_counter()
        res = distill(flow, lambda z, e=energy: -e(z), num_steps=num_steps, num_samples=num_samples, lr=lr,
                      anneal_steps=anneal_steps, progress=progress, **distill_kw)
        out[name] = (flow, res, grid_log_z(lambda z, e=energy: -e(z)), time.perf_counter() - t0)
        print(f"{name}: log Z {res.log_z:.4f} +- {res.log_z_se:.4f} (exact {out[name][2]:.4f}), "
              f"ESS {100 * res.ess:.1f}%, k-hat {res.khat:.2f}, {out[name][3]:.0f}s", flush=True)
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    c = torch.linspace(-BOX, BOX, 300)
    zz = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)
    for row, (name, (flow, res, exact, _)) in zip(axes, results.items()):
        density = torch.exp(-ENERGIES[name](zz))
        row[0].imshow(density.numpy(), extent=(-BOX, BOX, -BOX, BOX), origin="lower", cmap="viridis")
        row[0].set_title(f"{name}: exp(-U), log Z = {exact:.3f}", fontsize=9)
        x = flow.sample((20000,))
        row[1].hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=150, range=[[-BOX, BOX], [-BOX, BOX]], cmap="viridis")
        row[1].set_title(f"flow samples: log Z = {res.log_z:.3f}, ESS {100 * res.ess:.0f}%", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (a couple of minutes)")
    p.add_argument("--out", default="energies.png", help="where to write the plot")
    p.add_argument("--steps", type=int, default=3000, help="distill steps per energy (annealing over half)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kw = {"num_steps": 600, "anneal_steps": 300, "lr": 5e-3} if args.quick else {
        "num_steps": args.steps, "anneal_steps": args.steps // 2}
    # cosine lr decay and the importance-weighted forward-KL term: U4 keeps both branches with them
    # (docs/bench_distill.md); the same settings for every energy
    plot(run(lr_schedule="cosine", is_forward_kl_weight=1.0, **kw), args.out)


if __name__ == "__main__":
    main()
