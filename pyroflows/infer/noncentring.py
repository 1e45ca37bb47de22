r"""Non-centring inside a guide: the model's own hierarchical scales as a fixed flow layer.

A hierarchical model with a site :math:`\theta \sim \mathcal N(m(\pi), s(\pi)^2)` whose scale
depends on other latent sites :math:`\pi` (eight schools' :math:`\theta_j \sim \mathcal N(\mu,
\tau^2)`, Neal's funnel) has a funnel: as :math:`s(\pi) \to 0` the posterior of
:math:`\theta` narrows with it.  A guide fitted by reverse KL rarely reaches into that neck
(``docs/bench_autoguides.md``, "Eight schools' neck").  The classic cure is the non-centred
parametrisation :math:`\theta = m(\pi) + s(\pi)\,\eta` (Papaspiliopoulos, Roberts & Sköld,
"A general framework for the parametrization of hierarchical models", Statistical Science
2007), which Pyro applies to the *model* with ``poutine.reparam``.  Here it is a layer of the
*guide*: the flow draws :math:`(\pi, \eta)` and :class:`ModelNonCentring` maps them to
:math:`(\pi, \theta)`, evaluating :math:`m` and :math:`s` by running the model.  The map is
triangular (a site's location and scale depend only on sites sampled before it), so

.. math::

    \log\left|\det \frac{\partial(\pi, \theta)}{\partial(\pi, \eta)}\right| = \sum \log s(\pi),

and its inverse :math:`\eta = (\theta - m(\pi)) / s(\pi)` is one model run too.  The guide's
density stays one over the model's own latent sites, so its importance weights :math:`p/q`,
and PSIS k-hat, are those of the centred posterior: the model is not changed.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions import Normal as PyroNormal
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch.distributions import Independent, Normal, biject_to, constraints
from torch.distributions.transforms import Transform

__all__ = ["ModelNonCentring", "noncentrable_sites"]


def _is_normal(fn) -> bool:
    """Whether ``fn`` is a normal distribution once Pyro's wrappers (``to_event``, ``expand``,
    ``mask``) are removed."""
    while isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, (Normal, PyroNormal))


class _Done(Exception):
    """Raised once the last non-centred site is done: the rest of the model (its likelihood,
    often the costly part) is not needed."""


class _Substitute(Messenger):
    """Runs a model at given latent values; at the sites in ``sites`` the value is
    ``mean + sd * noise`` (``inverse=False``) or the given one, whose noise
    ``(value - mean) / sd`` is recorded (``inverse=True``).  Records ``log sd`` per site and
    stops the model (:class:`_Done`) after the site ``last``."""

    def __init__(self, values: dict, noise: dict, sites, inverse: bool, last: str):
        super().__init__()
        self.values, self.noise, self.sites, self.inverse, self.last = values, noise, sites, inverse, last
        self.out_noise, self.out_values, self.log_sd = {}, {}, {}

    def _pyro_sample(self, msg):
        name = msg["name"]
        if msg["is_observed"] or name not in self.values and name not in self.noise:
            return
        if name in self.sites:
            fn = msg["fn"]
            mean, sd = fn.mean, fn.stddev
            if self.inverse:
                value = self.values[name]
                self.out_noise[name] = (value - mean) / sd
            else:
                value = mean + sd * self.noise[name]
            value, sd = torch.broadcast_tensors(value, sd)
            self.log_sd[name] = sd.log()
        else:
            value = self.values[name]
        self.out_values[name] = value
        msg["value"] = value
        msg["is_observed"] = True
        if name == self.last:
            raise _Done


def _broadcast_shapes(a: tuple, b: tuple) -> tuple:
    """``torch.broadcast_shapes`` for two shapes known to broadcast, on plain tuples (that
    function costs tens of microseconds a call, a sizeable part of this layer's run)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def _layout(guide) -> list:
    """Per latent site of an AutoContinuous guide, in the latent vector's order: ``(name, start,
    stop, unconstrained shape, event dims of the unconstrained value, map to the site's support)``;
    computed once per prototype trace."""
    cached = guide.__dict__.get("_noncentring_layout")
    if cached is not None and cached[0] is guide.prototype_trace:
        return cached[1]
    layout, pos = [], 0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        shape = tuple(guide._unconstrained_shapes[name])
        size = math.prod(shape)
        event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
        layout.append((name, pos, pos + size, shape, event_dim, biject_to(site["fn"].support)))
        pos += size
    guide.__dict__["_noncentring_layout"] = (guide.prototype_trace, layout)
    return layout


class ModelNonCentring(Transform):
    r"""The fixed bijection :math:`(\pi, \eta) \mapsto (\pi, \theta)`, :math:`\theta = m(\pi)
    + s(\pi)\,\eta`, on an autoguide's unconstrained latent vector, for the normal sites
    ``sites`` of the guide's model (see the module docstring for the math and reference).
    Each direction is one run of the model, stopped after the last of ``sites`` (the rest,
    typically the likelihood, is not needed); the log-Jacobian of the last pass is cached.

    Args:
        guide: a set-up :class:`~pyro.infer.autoguide.AutoContinuous` guide (its prototype
            trace gives the sites' places in the latent vector).
        sites: names of latent normal sites (real support, so their unconstrained value is
            the value itself).
        args, kwargs: the model's arguments.
        plate_nesting: the model's number of plate dimensions (batch dimensions of a latent
            vector are put left of them when the model runs).
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def __init__(self, guide, sites, args=(), kwargs=None, plate_nesting: int = 0):
        super().__init__(cache_size=1)
        self.guide, self.sites = guide, frozenset(sites)
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.plate_nesting = int(plate_nesting)
        # the model run can stop after this site
        self._last = [name for name, *_ in _layout(guide) if name in self.sites][-1]

    def _run(self, vec: torch.Tensor, inverse: bool):
        r"""Run the model at the latent vector ``vec``; returns the other vector and
        :math:`\sum \log s` (batch shape of ``vec``)."""
        batch = vec.shape[:-1]
        flat = vec.reshape((-1,) + (1,) * self.plate_nesting + vec.shape[-1:]) if batch else vec
        rows = flat.shape[:-1]
        values, noise, pieces = {}, {}, []
        for name, start, stop, shape, event_dim, to_site in _layout(self.guide):
            # the site's unconstrained value, its own shape right-aligned against the batch rows
            # (what AutoContinuous._unpack_latent gives, without its per-call shape broadcasting)
            u = flat[..., start:stop].reshape(_broadcast_shapes(shape, rows + (1,) * event_dim))
            if name in self.sites and not inverse:
                noise[name] = u
            else:
                values[name] = to_site(u)
            pieces.append((name, u))
        run = _Substitute(values, noise, self.sites, inverse, self._last)
        # the model's own run in SVI validates its distributions; here that would only repeat
        # the checks (a third of this run's cost)
        try:
            with poutine.block(), run, pyro.validation_enabled(False):
                self.guide._user_model[0](*self.args, **self.kwargs)
        except _Done:
            pass
        missing = self.sites.difference(run.log_sd)
        if missing:
            raise RuntimeError(f"the model did not reach the non-centred site(s) {sorted(missing)} "
                               "(a model whose sites change between runs cannot be non-centred: noncentre=False)")
        parts, log_det = [], 0.0
        for name, u in pieces:
            if name in self.sites:
                new = run.out_noise[name] if inverse else run.out_values[name]
                new = new.expand(u.shape) if new.shape != u.shape else new
                log_det = log_det + run.log_sd[name].expand(u.shape).reshape(rows + (-1,)).sum(-1)
                parts.append(new.reshape(rows + (-1,)))
            else:
                parts.append(u.reshape(rows + (-1,)))
        out = torch.cat(parts, dim=-1)
        return out.reshape(vec.shape), log_det.reshape(batch)

    def _call(self, x):
        y, self._log_det = self._run(x, inverse=False)
        self._log_det_at = (x, y)
        return y

    def _inverse(self, y):
        x, self._log_det = self._run(y, inverse=True)
        self._log_det_at = (x, y)
        return x

    def log_abs_det_jacobian(self, x, y):
        at = getattr(self, "_log_det_at", None)
        if at is not None and at[0] is x and at[1] is y:
            return self._log_det
        return self._run(y, inverse=True)[1]


def noncentrable_sites(guide, args=(), kwargs=None) -> list[str]:
    """The latent normal sites of ``guide``'s model whose standard deviation depends on another
    latent site's value (found with autograd at the prototype trace's values)."""
    trace = guide.prototype_trace
    values = {name: site["value"].detach().clone().requires_grad_(site["value"].is_floating_point())
              for name, site in trace.iter_stochastic_nodes()}
    with poutine.block():
        traced = poutine.trace(poutine.condition(guide._user_model[0], data=values)).get_trace(
            *args, **(kwargs or {}))
    found = []
    for name, site in traced.nodes.items():
        if site["type"] != "sample" or name not in values:
            continue
        fn = site["fn"]
        if not _is_normal(fn):
            continue
        sd = fn.stddev
        if not sd.requires_grad:
            continue
        others = [v for other, v in values.items() if other != name and v.requires_grad]
        grads = torch.autograd.grad(sd.sum(), others, allow_unused=True) if others else []
        if any(g is not None for g in grads):
            found.append(name)
    return found
