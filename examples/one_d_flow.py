"""The chapter's 1-D example (eqs. 16.1-16.2): a flow x = f(z) of a standard normal z.

The density of x follows from the change of variables (eq. 16.1),

    p(x) = p_z(f^{-1}(x)) |d f^{-1}/dx| ,

and f is a composition of elementwise monotone layers (eq. 16.2).  We fit its
parameters to samples of a bimodal density by maximum likelihood with
``pyroflows.train.fit`` and save one PNG with three panels: the base density
p(z), the learned mapping x = f(z), and the model density over a histogram
of the data.

    python examples/one_d_flow.py [--out one_d_flow.png] [--epochs 150]
"""

from __future__ import annotations

import argparse

import torch

from pyroflows import Flow
from pyroflows.flows import best_elementwise_kind, elementwise_flow
from pyroflows.data import Bimodal1D
from pyroflows.train import fit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="one_d_flow.png")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--kind", default=best_elementwise_kind(), help="transformer kind of the layers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    density = Bimodal1D()
    train = density.sample(4000, seed=args.seed + 1)
    val = density.sample(1000, seed=args.seed + 2)
    test = density.sample(5000, seed=args.seed + 3)
    flow = elementwise_flow(1, kind=args.kind)  # affine, elementwise(1, kind), affine, elementwise(1, kind)
    hist = fit(flow, train, epochs=args.epochs, batch_size=256, lr=3e-3, val_data=val, patience=20,
               seed=args.seed)
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    true = float(-density.log_prob(test).mean())
    print(f"kind={args.kind}: test NLL {nll:.4f} nats (true density {true:.4f}, entropy "
          f"{density.entropy():.4f}) after {hist.epochs} epochs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = torch.linspace(-3.5, 3.5, 400)[:, None]
    xs = torch.linspace(-5, 5, 400)[:, None]
    with torch.no_grad():
        fz = _push(flow, z)
        model = flow.log_prob(xs).exp()
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).exp()

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(z[:, 0], base[:, 0])
    ax[0].set(title="base density p(z)", xlabel="z")
    ax[1].plot(z[:, 0], fz[:, 0])
    ax[1].set(title="learned mapping x = f(z)", xlabel="z", ylabel="x")
    ax[2].hist(train[:, 0].numpy(), bins=80, density=True, color="0.8", label="data")
    ax[2].plot(xs[:, 0], model, label=f"flow (test NLL {nll:.3f})")
    ax[2].plot(xs[:, 0], density.log_prob(xs).exp(), "--", label=f"true (NLL {true:.3f})")
    ax[2].set(title="model density p(x)", xlabel="x")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")


def _push(flow: Flow, z: torch.Tensor) -> torch.Tensor:
    """x = f(z): run the layers forward (the generative direction)."""
    for t in flow().transforms:
        z = t(z)
    return z


if __name__ == "__main__":
    main()
