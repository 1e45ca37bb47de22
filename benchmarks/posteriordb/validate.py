"""Check each port against its reference draws without running a sampler (cheap).

For a posterior :math:`p` on the unconstrained space (Jacobians included) and reference draws
:math:`\\theta_s \\sim p`, Stein's identity gives, for every coordinate :math:`j`,

.. math::  E_p[\\partial_j \\log p] = 0, \\qquad E_p[\\partial_j \\log p \\,(\\theta_j - m_j)] = -1.

A port with a wrong prior, a variance for an sd, a forgotten flat prior or an off-by-one
index breaks one of them by many standard errors; the second checks scales.  Reported: the
worst |z| of the first (mean over draws / its standard error) and the range of the second
(should be -1 within a few standard errors).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m benchmarks.posteriordb.validate [names...]
"""

from __future__ import annotations

import sys

import torch
from pyro.infer.mcmc.util import initialize_model

from . import POSTERIORS, load


def stein_check(post, num_draws: int = 2000):
    """``(max_j |z1_j|, max_j |z2_j|, s)``: the z-scores (estimate / its standard error) of
    ``E[d_j log p] = 0`` and of ``s_j = E[d_j log p (theta_j - m_j)] = -1``, over ``num_draws``
    reference draws (every k-th, in float64)."""
    draws, _ = post.reference()
    draws = draws[:: max(1, len(draws) // num_draws)]
    values = post.unflatten(draws)
    _, potential_fn, transforms, _ = initialize_model(post.model, model_args=post.args,
                                                      max_plate_nesting=post.max_plate_nesting)
    n = len(draws)
    params = {}
    for name, x in values.items():
        u = transforms[name](x) if name in transforms else x
        # batch dim left of the plates: (n, 1, ..., *event)
        event = u.shape[1:]
        params[name] = u.reshape((n,) + (1,) * post.max_plate_nesting + event).detach().requires_grad_()
    # the potential sums over the draws; each draw's gradient is its own term's
    grads = torch.autograd.grad(potential_fn(params), list(params.values()))
    g = torch.cat([-gr.reshape(n, -1) for gr in grads], -1)  # d log p
    theta = torch.cat([p.detach().reshape(n, -1) for p in params.values()], -1)
    z = g.mean(0) / (g.std(0) / n**0.5)
    prod = g * (theta - theta.mean(0))
    z2 = (prod.mean(0) + 1) / (prod.std(0) / n**0.5)
    return float(z.abs().max()), float(z2.abs().max()), prod.mean(0).tolist()


def main(names):
    torch.set_default_dtype(torch.float64)
    print("| posterior | max abs z, E[grad log p] = 0 | max abs z, E[grad_j log p (theta_j - m_j)] = -1 | estimates of the latter |")
    print("|---|---|---|---|")
    for name in names or list(POSTERIORS):
        post = load(name)
        z1, z2, s = stein_check(post)
        print(f"| {post.name} | {z1:.2f} | {z2:.2f} | {' '.join(f'{v:.2f}' for v in s)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
