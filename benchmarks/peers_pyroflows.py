"""pyroflows adapters for the side-by-side speed harness ``../shared/bench/peers.py``.

Run from the repository root with ``benchmarks/peers.sh``.  Each builder takes the harness's
``spec`` (kind, D, layers, hidden, bins, bound) and returns an object with ``.log_prob(x)``,
``.sample(n)``, ``.parameters()``, ``.roundtrip(x)`` and ``.notes``, with the same architecture and
parameter count as the peers' adapters:

* affine coupling -> ``flows.realnvp(D, num_layers=L, hidden_dims=H, mixing="alternate")``
* spline coupling -> ``flows.nsf(D, num_layers=L, hidden_dims=H, count_bins=K, bound=B, mixing="alternate")``
* maf             -> ``flows.maf(D, num_layers=L, hidden_dims=H)``

``build_pyroflows`` times the public eager API (``Flow.log_prob`` / ``Flow.sample``).
``build_pyroflows_compiled`` and ``build_zuko_compiled`` wrap a whole pure ``log_prob`` function and a
whole pure sampling function in ``torch.compile`` (inductor) and warm them up inside the builder
(train batch with gradients, evaluation batch without), so compile time stays out of the timings.
"""

from __future__ import annotations

import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pyroflows import flows  # noqa: E402

EVAL_N = 4096  # the harness's evaluation / sampling size


class _Model:
    notes = ""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return self.module.parameters()


def build_flow(spec):
    """The pyroflows ``Flow`` matching the peers' architecture for ``spec``."""
    D, L, H = spec["D"], spec["layers"], tuple(spec["hidden"])
    kind = spec["kind"]
    if kind == "affine_coupling":
        return flows.realnvp(D, num_layers=L, hidden_dims=H, mixing="alternate"), (
            "flows.realnvp(mixing='alternate'): Coupling + Affine (log-scale soft-clamped 5 tanh(s/5)), MLP conditioner")
    if kind == "spline_coupling":
        return flows.nsf(D, num_layers=L, hidden_dims=H, count_bins=spec["bins"], bound=spec["bound"], mixing="alternate"), (
            "flows.nsf(mixing='alternate'): Coupling + RationalQuadraticSpline (identity tails), MLP conditioner")
    if kind == "maf":
        return flows.maf(D, num_layers=L, hidden_dims=H), (
            "flows.maf: MaskedAutoregressive + Affine, MADE orders alternate natural/reverse")
    raise NotImplementedError(kind)


def _roundtrip(flow):
    layers = flow.transforms

    def roundtrip(x):
        z = x
        for t in reversed(layers):
            z = t._inverse_and_ladj(z)[0]
        for t in layers:
            z = t._call_and_ladj(z)[0]
        return z

    return roundtrip


def build_pyroflows(spec):
    flow, note = build_flow(spec)
    m = _Model(flow)
    m.notes = note
    m.log_prob = flow.log_prob
    m.sample = lambda n: flow.sample((n,))
    m.roundtrip = _roundtrip(flow)
    return m


def _warm_up(log_prob, sample, params, spec):
    """Compile every graph the harness will time: train step (grad), eval log_prob, sampling."""
    D, nb = spec["D"], spec["train_batch"]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the warm-up must not change the parameters
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        (-log_prob(torch.randn(nb, D)).mean()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for _ in range(2):
            log_prob(torch.randn(EVAL_N, D))
            sample(EVAL_N)


def build_pyroflows_compiled(spec):
    """Whole pure ``log_prob`` (inverse through every layer + base) and sampling functions, compiled."""
    flow, note = build_flow(spec)
    layers = list(flow.transforms)
    D = spec["D"]
    c = -0.5 * D * torch.log(torch.tensor(2 * torch.pi)).item()

    def log_prob_fn(x):
        z, ladj = x, 0.0
        for t in reversed(layers):
            z, l_ = t._inverse_and_ladj(z)
            ladj = ladj + l_
        return c - 0.5 * (z * z).sum(-1) - ladj

    def forward_fn(z):
        for t in layers:
            z = t._call_and_ladj(z)[0]
        return z

    lp_c = torch.compile(log_prob_fn, fullgraph=True)
    fw_c = torch.compile(forward_fn, fullgraph=True)

    m = _Model(flow)
    m.notes = note + "; torch.compile(fullgraph) of the whole log_prob / sampling function"
    m.log_prob = lp_c

    def sample(n):
        with torch.no_grad():
            return fw_c(torch.randn(n, D))

    m.sample = sample
    m.roundtrip = _roundtrip(flow)
    _warm_up(lp_c, sample, list(flow.parameters()), spec)
    return m


def build_zuko_compiled(spec):
    """The harness's zuko model with its ``flow().log_prob`` / ``flow().sample`` compiled."""
    harness = sys.modules["__main__"]  # peers.py, which loaded this adapter file
    if not hasattr(harness, "build_zuko"):
        sys.path.insert(0, os.environ.get("PEERS_DIR", os.path.join(os.path.dirname(_ROOT), "shared", "bench")))
        import peers as harness
    base = harness.build_zuko(spec)
    flow = base.module
    lp_c = torch.compile(lambda x: flow().log_prob(x))
    sm_c = torch.compile(lambda n: flow().sample((n,)))
    m = _Model(flow)
    m.notes = base.notes + "; torch.compile of flow().log_prob / flow().sample"
    m.log_prob = lp_c
    m.sample = sm_c
    m.roundtrip = base.roundtrip
    _warm_up(lp_c, sm_c, list(flow.parameters()), spec)
    return m
