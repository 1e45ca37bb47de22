r"""A Gaussian-mixture base for flows, fitted by regularised EM: :class:`GaussianMixtureBase`.

A flow pushes its base through smooth invertible layers; when the data are
well-separated clusters, a unimodal base asks the layers to tear the space
apart, which on a few hundred rows they cannot learn.  A mixture base holds
the clusters from the start, and flow layers on top only bend them.

:func:`fit_gaussian_mixture` is the EM algorithm (Dempster, Laird & Rubin
1977) regularised as in Fraley & Raftery, "Bayesian regularization for normal
mixture estimation and model-based clustering" (J. Classification, 2007), by an
inverse-Wishart prior whose scale is set from each component's own spread (an
empirical-Bayes variant of their fixed prior): each component's covariance is

.. math::

    \Sigma_k = \frac{S_k + \nu \tau_k I}{N_k + \nu},\qquad
    S_k = \sum_i r_{ik} (x_i - \mu_k)(x_i - \mu_k)^\top,\quad N_k = \sum_i r_{ik},

with :math:`\tau_k = \operatorname{tr}(S_k) / (N_k D)` the component's mean variance: its
covariance shrunk towards the sphere of its own size by :math:`\nu` pseudo-rows (the
Ledoit-Wolf target, per component), so a component on a few rows keeps a full-rank,
well-conditioned covariance while its size still adapts to its cluster.  A floor of
``MIN_SIZE`` on every variance (the rows are whitened first, so 1 is the pooled
variance) keeps a component from collapsing onto one row.
:func:`choose_mixture` picks the number of components :math:`K` and
:math:`\nu` by cross-validated log-likelihood.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["GaussianMixtureBase", "choose_mixture", "fit_gaussian_mixture", "mixture_log_prob"]

#: Mixture sizes tried by :func:`choose_mixture` (against the Gaussian).
COMPONENTS_GRID = (2, 3, 4, 5, 6, 8)
#: Prior strengths :math:`\nu` (pseudo-rows per component), per dimension, tried by :func:`choose_mixture`.
PRIOR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: The fewest training rows per component, on average, that :func:`choose_mixture` tries.
MIN_ROWS_PER_COMPONENT = 10
#: The smallest variance a component keeps (whitened units: 1 is the pooled variance).
MIN_SIZE = 1e-4


class GaussianMixtureBase(nn.Module):
    r"""A fixed Gaussian mixture over vectors of size ``dim``, as a flow's base:

    .. math:: p_0(z) = \sum_{k=1}^K \pi_k\, \mathcal N(z;\, \mu_k, L_k L_k^\top).

    The parameters are buffers (``state_dict`` and ``.to`` carry them; training a flow
    leaves them fixed): set them with :meth:`set` or :func:`fit_gaussian_mixture`.  A fresh
    base is :math:`K` copies of the standard normal, i.e. the standard normal.
    ``sample`` draws the component, then the point (no reparametrised ``rsample``).
    """

    def __init__(self, dim: int, num_components: int):
        super().__init__()
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        self.register_buffer("logits", torch.zeros(num_components))
        self.register_buffer("means", torch.zeros(num_components, dim))
        self.register_buffer("scale_trils", torch.eye(dim).expand(num_components, dim, dim).clone())

    @property
    def num_components(self) -> int:
        return self.logits.shape[0]

    @torch.no_grad()
    def set(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> GaussianMixtureBase:
        """Set the mixture from its weights ``(K,)``, means ``(K, D)`` and covariances ``(K, D, D)``."""
        if weights.shape != self.logits.shape or means.shape != self.means.shape \
                or covariances.shape != self.scale_trils.shape:
            raise ValueError(f"expected shapes {tuple(self.logits.shape)}, {tuple(self.means.shape)}, "
                             f"{tuple(self.scale_trils.shape)}; got {tuple(weights.shape)}, "
                             f"{tuple(means.shape)}, {tuple(covariances.shape)}")
        self.logits.copy_(weights.log())
        self.means.copy_(means)
        self.scale_trils.copy_(torch.linalg.cholesky(covariances))
        return self

    def forward(self):
        if self.num_components == 1:  # the Gaussian itself (keeps rsample)
            return dist.MultivariateNormal(self.means[0], scale_tril=self.scale_trils[0])
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      dist.MultivariateNormal(self.means, scale_tril=self.scale_trils))


def mixture_log_prob(x, weights, means, covariances) -> torch.Tensor:
    r"""Per-row, per-component weighted log densities :math:`\log \pi_k + \log \mathcal N(x_i; \mu_k,
    \Sigma_k)`, shape ``(N, K)`` (``logsumexp`` over the last dimension is the mixture's)."""
    chol = torch.linalg.cholesky(covariances)
    diff = (x[None] - means[:, None]).transpose(1, 2)  # (K, D, N)
    maha = torch.linalg.solve_triangular(chol, diff, upper=False).pow(2).sum(1)  # (K, N)
    half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return (weights.log() - half_logdet)[None] - 0.5 * maha.T - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def _init_means(x, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    idx = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    d2 = ((x - x[idx[0]]) ** 2).sum(-1)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / len(d2))
        idx.append(int(torch.multinomial(p, 1, generator=gen)))
        d2 = torch.minimum(d2, ((x - x[idx[-1]]) ** 2).sum(-1))
    return x[idx].clone()


def fit_gaussian_mixture(x: torch.Tensor, num_components: int, prior: float = 4.0, *, seed: int = 0,
                         restarts: int = 2, max_iter: int = 100, tol: float = 1e-6):
    r"""Regularised EM for a ``num_components`` Gaussian mixture on the rows of ``x`` (see the
    module docstring: covariances shrunk towards the identity by ``prior`` pseudo-rows, so
    ``x`` should be whitened).  The best of ``restarts`` k-means++ starts by penalised
    log-likelihood.  Returns ``(weights, means, covariances)`` in float64.
    """
    x = x.double()
    n, d = x.shape
    eye = torch.eye(d, dtype=x.dtype)
    gen = torch.Generator().manual_seed(seed)
    best, best_obj = None, -math.inf
    for _ in range(restarts if num_components > 1 else 1):
        means = _init_means(x, num_components, gen)
        resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(1), num_components).double()
        prev = -math.inf
        for _ in range(max_iter):
            nk = resp.sum(0) + 1e-10
            weights = nk / nk.sum()
            means = resp.T @ x / nk[:, None]
            centred = x[None] - means[:, None]  # (K, N, D)
            scatter = (centred * resp.T[..., None]).transpose(1, 2) @ centred
            size = (scatter.diagonal(dim1=-2, dim2=-1).sum(-1) / (nk * d)).clamp_min(MIN_SIZE)
            covs = (scatter + (prior * size)[:, None, None] * eye) / (nk + prior)[:, None, None] + MIN_SIZE * eye
            comp = mixture_log_prob(x, weights, means, covs)
            ll = torch.logsumexp(comp, 1)
            obj = float(ll.sum())
            resp = (comp - ll[:, None]).exp()
            if obj - prev < tol * n:
                break
            prev = obj
        if obj > best_obj:
            best, best_obj = (weights, means, covs), obj
    return best


def choose_mixture(x: torch.Tensor, *, components=COMPONENTS_GRID, priors_per_dim=PRIOR_GRID, folds: int = 3,
                   seed: int = 0) -> tuple[int, float | None, torch.Tensor]:
    r"""The number of components :math:`K` and prior strength :math:`\nu` of
    :func:`fit_gaussian_mixture` with the best ``folds``-fold cross-validated log-likelihood
    on the whitened rows ``x``, against the standard normal (the Gaussian stage itself,
    returned as ``K = 1``, ``nu = None``).

    :math:`\nu` runs over ``priors_per_dim`` times the dimension (an inverse-Wishart prior's
    strength is naturally counted in dimensions).  Components are capped so each averages
    at least ``MIN_ROWS_PER_COMPONENT`` training rows (the prior keeps a component on fewer
    rows than dimensions well-conditioned).  The standard normal is scored on the same
    rows that whitened ``x``, a slight optimism that makes a mixture earn its place.
    Returns ``(K, nu, per-row held-out log-likelihood of the choice)``.
    """
    x = x.double()
    n, d = x.shape
    folds = max(2, min(folds, n))
    fold_rows = (n * (folds - 1)) // folds
    ks = [k for k in components if k > 1 and fold_rows / k >= MIN_ROWS_PER_COMPONENT]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held_ll = {(1, None): torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)}
    for k in ks:
        for nu in (f * d for f in priors_per_dim):
            ll = torch.empty(n, dtype=torch.float64)
            for f in range(folds):
                held = torch.zeros(n, dtype=torch.bool)
                held[order[f::folds]] = True
                w, m, c = fit_gaussian_mixture(x[~held], k, nu, seed=seed + f, restarts=1)
                ll[held] = torch.logsumexp(mixture_log_prob(x[held], w, m, c), 1)
            held_ll[(k, nu)] = ll
    (k, nu), ll = max(held_ll.items(), key=lambda kv: float(kv[1].sum()))
    return k, nu, ll
