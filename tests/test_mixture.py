"""pyroflows.mixture: the Gaussian-mixture base and its regularised EM."""

import pytest
import torch

from pyroflows import Flow
from pyroflows.mixture import GaussianMixtureBase, choose_mixture, fit_gaussian_mixture, mixture_log_prob
from pyroflows.transforms.linear import Triangular


def _two_clusters(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.3
    side = (torch.rand(n, generator=g) < 0.3).double()[:, None]
    return z + side * torch.tensor([3.0, 0.0], dtype=torch.float64) - torch.tensor([0.9, 0.0], dtype=torch.float64)


def test_mixture_log_prob_matches_torch():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(means, covs).log_prob(x[:, None]) + weights.log()
    assert torch.allclose(mixture_log_prob(x, weights, means, covs), ref, atol=1e-12)


def test_fresh_base_is_the_standard_normal_and_set_round_trips_through_state_dict():
    base = GaussianMixtureBase(2, 3)
    x = torch.randn(5, 2)
    ref = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2)).log_prob(x)
    assert torch.allclose(base().log_prob(x), ref, atol=1e-6)
    w, m, c = fit_gaussian_mixture(_two_clusters(400), 3)
    base.set(w.float(), m.float(), c.float())
    other = GaussianMixtureBase(2, 3)
    other.load_state_dict(base.state_dict())
    assert torch.allclose(other().log_prob(x), base().log_prob(x))
    assert base().sample((6,)).shape == (6, 2)
    with pytest.raises(ValueError, match="shapes"):
        base.set(w[:2].float(), m.float(), c.float())
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixtureBase(2, 0)


def test_em_recovers_two_clusters():
    w, m, c = fit_gaussian_mixture(_two_clusters(2000), 2, prior=1.0)
    order = m[:, 0].argsort()
    w, m, c = w[order], m[order], c[order]
    assert torch.allclose(w, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=0.04)
    assert torch.allclose(m, torch.tensor([[-0.9, 0.0], [2.1, 0.0]], dtype=torch.float64), atol=0.06)
    assert torch.allclose(c.diagonal(dim1=-2, dim2=-1), torch.full((2, 2), 0.09, dtype=torch.float64), atol=0.02)


def test_a_component_on_a_single_row_keeps_a_positive_definite_covariance():
    x = torch.cat([torch.randn(50, 3, dtype=torch.float64), torch.full((1, 3), 40.0, dtype=torch.float64)])
    w, m, c = fit_gaussian_mixture(x, 2, prior=0.1)
    assert torch.linalg.eigvalsh(c).min() > 0
    assert torch.isfinite(torch.logsumexp(mixture_log_prob(x, w, m, c), 1)).all()


def test_cross_validation_picks_one_component_for_a_gaussian_and_two_for_two_clusters():
    torch.manual_seed(0)
    k, _, ll = choose_mixture(torch.randn(300, 2, dtype=torch.float64))
    assert k == 1 and ll.shape == (300,)
    k, nu, _ = choose_mixture(_two_clusters(300))
    assert k == 2 and nu > 0


def test_a_flow_over_a_mixture_base_scores_and_samples():
    base = GaussianMixtureBase(2, 2)
    w, m, c = fit_gaussian_mixture(_two_clusters(300), 2)
    base.set(w.float(), m.float(), c.float())
    layer = Triangular(2)
    flow = Flow([layer], base=base)
    x = flow.sample((10,))
    assert x.shape == (10, 2)
    with torch.no_grad():  # a fresh Triangular layer is the identity: the flow is its base
        assert torch.allclose(flow.log_prob(x), base().log_prob(x), atol=1e-6)
