"""``nes2000-nes``: party identification on 8 predictors (age as dummies), flat priors."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .common import Flat, Posterior, load_json, tensor

NAME = "nes2000-nes"


def model(X, y):
    beta = pyro.sample("beta", Flat(constraints.real, (), (X.shape[-1],)))
    sigma = pyro.sample("sigma", Flat(constraints.positive, (), ()))
    mean = (beta * X).sum(-1)  # (..., 1, 9) * (N, 9) -> (..., N)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def posterior() -> Posterior:
    d = load_json(NAME)
    age = tensor(d["age_discrete"])
    cols = [torch.ones_like(age), tensor(d["real_ideo"]), tensor(d["race_adj"]),
            (age == 2).to(age), (age == 3).to(age), (age == 4).to(age),
            tensor(d["educ1"]), tensor(d["gender"]), tensor(d["income"])]
    X = torch.stack(cols, -1)
    return Posterior(NAME, model, (X, tensor(d["partyid7"])), {"beta": (9,), "sigma": ()}, max_plate_nesting=1)
