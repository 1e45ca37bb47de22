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
    err = [y[0] - (mu + phi * mu)]
    base = y[1:] - mu[..., None] - phi[..., None] * y[:-1]  # everything but the MA term, vectorised
    for t in range(1, len(y)):
        err.append(base[..., t - 1] - theta * err[-1])
    err = torch.stack(err, -1)
    pyro.factor("err", dist.Normal(0.0, sigma[..., None]).log_prob(err).sum(-1))


def posterior() -> Posterior:
    d = load_json(NAME)
    return Posterior(NAME, model, (tensor(d["y"]),), {"mu": (), "phi": (), "theta": (), "sigma": ()})
