"""Time one forward + inverse pass of every transformer kind.

Batch 4096 x 16, float32, one torch thread, per-sample parameters (as a
coupling or autoregressive conditioner produces them), 8 bins / components.
Reference: zuko's ``MonotonicRQSTransform`` and nflows'
``unconstrained_rational_quadratic_spline`` (linear tails) on the same data.
Also times forward + backward (the training step's share).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/transformers_speed.py [--out docs/bench_transformers_speed.md]
"""

from __future__ import annotations

import argparse
import time

import torch

from pyroflows.transforms.transformers import KINDS, make_transformer

N, D, K, BOUND = 4096, 16, 8, 5.0


def best_ms(fn, repeats=7, inner=5):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        times.append((time.process_time() - t0) / inner)
    return 1e3 * min(times)


def ours(kind, x, g):
    t = make_transformer(kind, bins=K, bound=BOUND)
    p = t.identity_params() + 0.3 * torch.randn(N, D, t.num_params, generator=g)

    def both():
        with torch.no_grad():
            y, _ = t.forward(x, p)
            t.inverse(y, p)

    pg = p.clone().requires_grad_()

    def train():
        y, ld = t.forward(x, pg)
        (y.sum() + ld.sum()).backward()

    return both, train


def reference(forward, inverse, x, g):
    """Closures timing a peer's RQ spline given ``forward(x, w, h, d) -> (y, ladj)`` and ``inverse``."""
    w, h, d = (0.3 * torch.randn(N, D, n, generator=g) for n in (K, K, K - 1))

    def both():
        with torch.no_grad():
            inverse(forward(x, w, h, d)[0], w, h, d)

    wg = w.clone().requires_grad_()

    def train():
        y, ladj = forward(x, wg, h, d)
        (y.sum() + ladj.sum()).backward()

    return both, train


def zuko_rqs(x, g):
    from zuko.transforms import MonotonicRQSTransform

    return reference(
        lambda x, w, h, d: MonotonicRQSTransform(w, h, d, bound=BOUND).call_and_ladj(x),
        lambda y, w, h, d: MonotonicRQSTransform(w, h, d, bound=BOUND).inv(y),
        x,
        g,
    )


def nflows_rqs(x, g):
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline as rqs

    return reference(
        lambda x, w, h, d: rqs(x, w, h, d, inverse=False, tail_bound=BOUND),
        lambda y, w, h, d: rqs(y, w, h, d, inverse=True, tail_bound=BOUND),
        x,
        g,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--kinds", nargs="*", help="only these kinds (default: all of KINDS)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(N, D, generator=g)
    rows = [(kind, *ours(kind, x, g)) for kind in (args.kinds or KINDS)]
    rows += [("zuko MonotonicRQSTransform", *zuko_rqs(x, g)), ("nflows rational_quadratic_spline", *nflows_rqs(x, g))]
    lines = [
        f"Batch {N} x {D}, float32, 1 thread, {K} bins, per-sample parameters; CPU time (process_time), best of 7 (ms).",
        "",
        "| transformer | forward + inverse (ms) | forward + backward (ms) |",
        "| --- | ---: | ---: |",
    ]
    for name, both, train in rows:
        lines.append(f"| {name} | {best_ms(both):.2f} | {best_ms(train):.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Transformer speed\n\n`benchmarks/transformers_speed.py`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
