"""The two HMM posteriors, marginalised by the forward algorithm as the Stan programs do:
``hmm_example-hmm_example`` (Gaussian emissions) and ``bball_drive_event_0-hmm_drive_0``
(exponential emissions on two series).  Simplex rows and positive_ordered emission
parameters; priors on ordered elements are ``target +=`` factors."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro.distributions.hmm import _sequential_logmatmulexp

from .common import Flat, Posterior, load_json, tensor

EXAMPLE, DRIVE = "hmm_example-hmm_example", "bball_drive_event_0-hmm_drive_0"


def forward_algorithm(log_trans, log_emit):
    """``log sum_z p(obs | z) p(z)`` with no initial-state term (gamma[1] is the emission alone,
    as in the programs); ``log_trans (..., K, K)`` row j -> column k, ``log_emit (..., N, K)``."""
    # gamma[t, k] = logsumexp_j (gamma[t-1, j] + log_trans[j, k]) + log_emit[t, k] is a product
    # of (K, K) matrices in the log semiring: multiply them in a tree (log N depth, not N steps)
    steps = log_trans[..., None, :, :] + log_emit[..., 1:, None, :]  # (..., N-1, K, K)
    total = _sequential_logmatmulexp(steps)  # (..., K, K)
    return torch.logsumexp(log_emit[..., 0, :, None] + total, (-2, -1))


def example_model(y, K=2):
    theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(K, dtype=y.dtype)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(K, dtype=y.dtype)))
    mu = pyro.sample("mu", Flat(constraints.positive_ordered_vector, (), (K,)))
    pyro.factor("mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[..., 0]) + dist.Normal(10.0, 1.0).log_prob(mu[..., 1]))
    log_trans = torch.stack([theta1, theta2], -2).log()
    log_emit = dist.Normal(mu[..., None, :], 1.0).log_prob(y[:, None])
    pyro.factor("hmm", forward_algorithm(log_trans, log_emit))


def drive_model(u, v, alpha, K=2):
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    phi = pyro.sample("phi", Flat(constraints.positive_ordered_vector, (), (K,)))
    lam = pyro.sample("lambda", Flat(constraints.positive_ordered_vector, (), (K,)))
    prior = (dist.Normal(0.0, 1.0).log_prob(phi[..., 0]) + dist.Normal(3.0, 1.0).log_prob(phi[..., 1])
             + dist.Normal(0.0, 1.0).log_prob(lam[..., 0]) + dist.Normal(3.0, 1.0).log_prob(lam[..., 1]))
    pyro.factor("rate_prior", prior)
    log_trans = torch.stack([theta1, theta2], -2).log()
    # exponential_lpdf(u | phi) = log phi - phi u
    log_emit = (phi.log()[..., None, :] - phi[..., None, :] * u[:, None]
                + lam.log()[..., None, :] - lam[..., None, :] * v[:, None])
    pyro.factor("hmm", forward_algorithm(log_trans, log_emit))


def example() -> Posterior:
    d = load_json(EXAMPLE)
    return Posterior(EXAMPLE, example_model, (tensor(d["y"]),), {"theta1": (2,), "theta2": (2,), "mu": (2,)})


def drive() -> Posterior:
    d = load_json(DRIVE)
    return Posterior(DRIVE, drive_model, (tensor(d["u"]), tensor(d["v"]), tensor(d["alpha"])),
                     {"theta1": (2,), "theta2": (2,), "phi": (2,), "lambda": (2,)})
