"""``kilpisjarvi_mod-kilpisjarvi``: a linear trend on an uncentred covariate (x = 1952..2013);
intercept and slope correlate at |r| = 0.99999.  Flat prior on sigma."""

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from .common import Flat, Posterior, load_json, tensor

NAME = "kilpisjarvi_mod-kilpisjarvi"


def model(x, y, pmualpha, psalpha, pmubeta, psbeta):
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", Flat(constraints.positive, (), ()))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def posterior() -> Posterior:
    d = load_json(NAME)
    args = (tensor(d["x"]), tensor(d["y"]), float(d["pmualpha"]), float(d["psalpha"]),
            float(d["pmubeta"]), float(d["psbeta"]))
    return Posterior(NAME, model, args, {"alpha": (), "beta": (), "sigma": ()}, max_plate_nesting=1)
