"""``sblrc-blr``: synthetic Bayesian linear regression, N(0, 10) priors on the 5
coefficients, half-normal(0, 10) on sigma."""

import pyro
import pyro.distributions as dist

from .common import Posterior, load_json, tensor

NAME = "sblrc-blr"


def model(X, y):
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    mean = (beta * X).sum(-1)  # (..., 1, D) * (N, D) -> (..., N)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def posterior() -> Posterior:
    d = load_json(NAME)
    return Posterior(NAME, model, (tensor(d["X"]), tensor(d["y"])), {"beta": (int(d["D"]),), "sigma": ()},
                     max_plate_nesting=1)
