"""Glow on MNIST-5k with exponential (``affine``) against sigmoid (``sigmoid_affine``) coupling scales.

Same configuration, seed and split as ``examples/glow.py`` (2 levels, ``--steps``
steps, width ``--hidden``, uniform dequantization, the best validation epoch kept);
reports the test bits/dim and the bits/dim that the fitted flow gives to images
unlike the training data: the test digits inverted (255 - k), shifted by 7 pixels,
and uniform noise.  A huge number there means the normalizing direction sent the
image to a latent far out in the base's tail (an exponential scale can multiply by
e^5 per coupling; the sigmoid scale by at most 1/sigmoid(2) = 1.135).

    python benchmarks/glow_kinds.py affine --epochs 30 --out benchmarks/results/glow_mnist_kinds.jsonl
    python benchmarks/glow_kinds.py sigmoid_affine --epochs 30 --out benchmarks/results/glow_mnist_kinds.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import glow as G  # noqa: E402

import pyroflows.images as I  # noqa: E402
from pyroflows import flows  # noqa: E402

SHAPE, LEVELS = (1, 28, 28), 256


def probes(k_test):
    torch.manual_seed(2)
    k = k_test[:200].reshape(-1, *SHAPE)
    return {"test": k, "inverted": 255 - k, "uniform_noise": torch.randint(0, LEVELS, k.shape),
            "shifted_rows": torch.roll(k, 7, dims=-1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    k_train, k_test = G.split("mnist")
    k_fit, k_val = G.hold_out(k_train, 0.1)
    torch.manual_seed(0)
    flow = flows.glow(SHAPE, levels=2, steps=a.steps, hidden_channels=a.hidden, num_values=LEVELS, kind=a.kind)
    secs = G.train(flow, k_fit, epochs=a.epochs, batch_size=64, lr=1e-3, event_shape=SHAPE, levels=LEVELS,
                   log=True, k_val=k_val)
    rec = {"kind": a.kind, "epochs": a.epochs, "steps": a.steps, "hidden": a.hidden,
           "test_bpd": G.test_bpd(flow, k_test, SHAPE, LEVELS), "seconds": round(secs, 1)}
    deq = I.UniformDequantization(LEVELS)
    with torch.no_grad():
        for name, k in probes(k_test).items():
            bpd = I.to_bits_per_dim(I.dequantized_log_prob(flow, k, deq), 784)
            finite = bpd[torch.isfinite(bpd)]
            rec[name] = {"finite_fraction": len(finite) / len(bpd),
                         "median_bpd": float(finite.median()) if len(finite) else None,
                         "max_bpd": float(finite.max()) if len(finite) else None}
    print(json.dumps(rec), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
