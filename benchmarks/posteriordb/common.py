"""Shared pieces of the posteriordb ports: loading the data and reference draws, and the
:class:`Posterior` record each port module builds.

Every port is a Pyro model of *one* Stan program with the same density on the same
constrained space (up to a constant).  The models broadcast over a leading batch
dimension left of their plates, so ``Trace_ELBO(vectorize_particles=True)`` and the
vectorised importance weights work.  Flat (no ``~``) priors are ``ImproperUniform``
on the constrained space, as Stan has them; ``target += lpdf(...)`` is ``pyro.factor``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch
from torch.distributions import transform_to

#: where the posteriordb folders live (override with $POSTERIORDB)
ROOT = Path(os.environ.get("POSTERIORDB", Path(__file__).resolve().parents[3] / "shared" / "posteriordb"))
if not ROOT.exists():
    ROOT = Path("/work/shared/posteriordb")


def load_json(name: str) -> dict:
    with open(ROOT / name / "data.json") as f:
        return json.load(f)


def tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.get_default_dtype())


@dataclass
class Posterior:
    """A ported posterior.

    Attributes:
        name: the posteriordb name (folder in ``ROOT``).
        model: the Pyro model, called as ``model(*args)``.
        args: the model's arguments (the data, already transformed as the Stan program does).
        shapes: latent site name -> shape, in the order of the Stan ``parameters`` block;
            each site's draws flattened (Stan's ``beta[1], beta[2], ...``) and concatenated
            give the columns of ``reference.npz``.
        max_plate_nesting: the model's plate nesting (for Predictive and the diagnostics).
    """

    name: str
    model: object
    args: tuple
    shapes: dict
    max_plate_nesting: int = 0
    _ref: dict = field(default=None, repr=False)

    def reference(self) -> tuple[np.ndarray, list[str]]:
        """``(draws (10000, d), names)`` from ``reference.npz``."""
        if self._ref is None:
            ref = np.load(ROOT / self.name / "reference.npz")
            self._ref = {"draws": ref["draws"], "names": [str(n) for n in ref["names"]]}
        return self._ref["draws"], self._ref["names"]

    def flatten(self, samples: dict) -> torch.Tensor:
        """Draws ``name -> (N, ..., *shape)`` (constrained) as ``(N, d)`` in reference column order
        (singleton dims left by plates are dropped)."""
        return torch.cat([torch.as_tensor(samples[s]).reshape(len(samples[s]), -1) for s in self.shapes], -1)

    def unflatten(self, draws) -> dict:
        """Reference draws ``(N, d)`` as ``name -> (N, *shape)`` (the inverse of :meth:`flatten`)."""
        draws = torch.as_tensor(np.asarray(draws), dtype=torch.get_default_dtype())
        out, i = {}, 0
        for s, shape in self.shapes.items():
            k = int(np.prod(shape)) if shape else 1
            out[s] = draws[:, i:i + k].reshape((len(draws),) + tuple(shape))
            i += k
        if i != draws.shape[1]:
            raise ValueError(f"{self.name}: the sites cover {i} columns, the reference has {draws.shape[1]}")
        return out



class Flat(dist.ImproperUniform):
    """Stan's flat prior on a constrained space (``ImproperUniform``, same ``log_prob`` = 0) whose
    ``sample`` returns the point 0 of the unconstrained space instead of raising, so that
    every Pyro init strategy and autoguide can start on these models (a starting point, not a
    draw: the prior is improper)."""

    def sample(self, sample_shape=()):
        t = transform_to(self.support)
        shape = t.inverse_shape(torch.Size(sample_shape) + self.batch_shape + self.event_shape)
        return t(torch.zeros(shape, dtype=torch.get_default_dtype()))

    def expand(self, batch_shape, _instance=None):
        return Flat(self.support, torch.Size(batch_shape), self.event_shape)
