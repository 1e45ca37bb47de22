"""``arma-arma11``: ARMA(1, 1) with the error recursion err[t] = y[t] - mu - phi y[t-1]
- theta err[t-1], err[0] = 0, first prediction mu + phi mu (as shipped)."""

import pyro
import pyro.distributions as dist
import torch

from .common import Posterior, load_json, tensor

NAME = "arma-arma11"


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    # err[t] = a[t] - theta err[t-1] with a[1] = y[1] - (mu + phi mu), a[t] = y[t] - mu - phi y[t-1]:
    # a linear recurrence, err[t] = sum_{s<=t} (-theta)^(t-s) a[s], summed by doubling (log T steps)
    first = (y[0] - (mu + phi * mu))[..., None]
    err = torch.cat([first, y[1:] - mu[..., None] - phi[..., None] * y[:-1]], -1)
    c, shift = -theta[..., None], 1
    while shift < err.shape[-1]:
        err = torch.cat([err[..., :shift], err[..., shift:] + c * err[..., :-shift]], -1)
        c, shift = c * c, 2 * shift
    err = torch.nan_to_num(err, nan=float("inf"))  # |theta| > 1 overflows (inf * 0): density 0, as in Stan
    pyro.factor("err", dist.Normal(0.0, sigma[..., None]).log_prob(err).sum(-1))


def posterior() -> Posterior:
    d = load_json(NAME)
    return Posterior(NAME, model, (tensor(d["y"]),), {"mu": (), "phi": (), "theta": (), "sigma": ()})
