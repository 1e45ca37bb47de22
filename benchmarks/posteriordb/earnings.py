"""``earnings-logearn_interaction``: log earnings on height, male and their (uncentred)
interaction; improper flat priors on everything (|r| up to 0.9992)."""

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from .common import Flat, Posterior, load_json, tensor

NAME = "earnings-logearn_interaction"


def model(log_earn, height, male, inter):
    beta = pyro.sample("beta", Flat(constraints.real, (), (4,)))
    sigma = pyro.sample("sigma", Flat(constraints.positive, (), ()))
    # beta is (..., 1, 4) under a particle plate (left of the data plate): index it to (..., 1)
    mean = beta[..., 0] + beta[..., 1] * height + beta[..., 2] * male + beta[..., 3] * inter
    with pyro.plate("data", len(log_earn)):
        pyro.sample("log_earn", dist.Normal(mean, sigma), obs=log_earn)


def posterior() -> Posterior:
    d = load_json(NAME)
    earn, height, male = tensor(d["earn"]), tensor(d["height"]), tensor(d["male"])
    args = (earn.log(), height, male, height * male)  # the program's transformed data
    return Posterior(NAME, model, args, {"beta": (4,), "sigma": ()}, max_plate_nesting=1)
