"""``gp_pois_regr-gp_regr``: marginal GP regression on 11 points, three positive
hyperparameters.  Kept as shipped: ``sigma`` is added to the diagonal as a variance."""

import pyro
import pyro.distributions as dist
import torch

from .common import Posterior, load_json, tensor

NAME = "gp_pois_regr-gp_regr"


def model(x, y):
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    rho, alpha, sigma = (v[..., None, None] for v in (rho, alpha, sigma))
    sq = (x[:, None] - x[None, :]) ** 2
    cov = alpha**2 * torch.exp(-0.5 * sq / rho**2) + sigma * torch.eye(len(x), dtype=x.dtype)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=torch.linalg.cholesky(cov)), obs=y)


def posterior() -> Posterior:
    d = load_json(NAME)
    return Posterior(NAME, model, (tensor(d["x"]), tensor(d["y"])), {"rho": (), "alpha": (), "sigma": ()})
