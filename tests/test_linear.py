"""Linear layers (and the conditional elementwise / Householder twins) beyond the harness."""

from __future__ import annotations

import pytest
import torch

import pyroflows.transforms as T
from harness import perturb_parameters
from pyroflows import Flow
from pyroflows.transforms import Elementwise
from pyroflows.transforms.transformers import Affine


def test_lu_inverse_matches_dense_inverse_at_d64():
    dim = 64
    layer = perturb_parameters(T.lu(dim).double(), scale=0.2)
    W = layer.matrix()
    x = torch.randn(10, dim, dtype=torch.float64)
    y = layer(x)
    assert torch.allclose(y, x @ W.T + layer.bias, atol=1e-10)
    expected = (y - layer.bias) @ torch.linalg.inv(W).T
    assert torch.allclose(layer.inv(y), expected, atol=1e-8)
    assert torch.allclose(layer.inv(y), x, atol=1e-8)


@pytest.mark.parametrize("make", [lambda d: T.lu(d), T.triangular, T.dense,
                                  lambda d: T.householder(d, count_transforms=3)])
def test_log_det_is_slogdet_of_the_assembled_matrix(make):
    layer = perturb_parameters(make(5).double(), scale=0.5)
    W = layer.matrix()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = layer(x)
    ladj = layer.log_abs_det_jacobian(x, y)
    assert ladj.shape == (4,)
    assert torch.allclose(ladj, torch.linalg.slogdet(W)[1].expand(4), atol=1e-10)
    bias = getattr(layer, "bias", torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(y, x @ W.T + bias, atol=1e-10)


def test_lu_factors_have_their_structure():
    layer = perturb_parameters(T.lu(6).double(), scale=0.5)
    L, V = layer._factors()
    assert torch.equal(torch.diagonal(L), torch.ones(6, dtype=torch.float64))
    assert torch.equal(torch.triu(L, 1), torch.zeros(6, 6, dtype=torch.float64))
    assert torch.equal(torch.tril(V, -1), torch.zeros(6, 6, dtype=torch.float64))
    assert (torch.diagonal(V).abs() > 0).all()


def test_lu_permutation_options():
    assert torch.equal(T.lu(5, permutation="identity").permutation, torch.arange(5))
    torch.manual_seed(7)
    first = T.lu(5).permutation
    torch.manual_seed(7)
    assert torch.equal(first, T.lu(5).permutation)
    layer = T.lu(4, permutation=[2, 0, 3, 1])
    x = torch.arange(4.0)
    assert torch.equal(layer(x), torch.tensor([2.0, 0.0, 3.0, 1.0]))  # starts at W = P


def test_from_matrix_round_trips_random_matrices():
    torch.manual_seed(0)
    W = torch.randn(6, 6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    for cls in (T.LU, T.Dense):
        layer = cls.from_matrix(W, bias=b)
        assert layer.bias.dtype == torch.float64
        assert torch.allclose(layer.matrix(), W, atol=1e-12)
        assert torch.allclose(layer.bias, b)
    lower = torch.tril(W, -1) + torch.diag(torch.rand(6, dtype=torch.float64) + 0.5)
    assert torch.allclose(T.Triangular.from_matrix(lower).matrix(), lower, atol=1e-12)


def test_householder_is_orthogonal_and_volume_preserving():
    layer = T.householder(5, count_transforms=4).double()
    Q = layer.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = layer(x)
    assert torch.allclose(y, x @ Q.T, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.equal(layer.log_abs_det_jacobian(x, y), torch.zeros(3, dtype=torch.float64))


def test_diagonal_is_the_elementwise_affine_layer():
    layer = T.diagonal(3)
    assert isinstance(layer, Elementwise) and isinstance(layer.transformer, Affine)


def test_lu_fits_a_correlated_gaussian():
    """A linear flow of a standard normal is a Gaussian: maximum likelihood recovers the covariance."""
    torch.manual_seed(0)
    A = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    data = torch.randn(2000, 2) @ A.T + torch.tensor([1.0, -2.0])
    flow = Flow([T.lu(2)])
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    W = flow.transforms[0].matrix().detach()
    assert torch.allclose(W @ W.T, torch.cov(data.T), atol=0.03)
    assert torch.allclose(flow.transforms[0].bias.detach(), data.mean(0), atol=0.03)


@pytest.mark.parametrize("bad", [
    lambda: T.lu(0),
    lambda: T.lu(2.5),
    lambda: T.lu(3, permutation="shuffled"),
    lambda: T.lu(3, permutation=[0, 0, 1]),
    lambda: T.triangular(-1),
    lambda: T.dense(True),
    lambda: T.householder(1),
    lambda: T.householder(3, count_transforms=0),
    lambda: T.conditional_householder(3, 0),
    lambda: T.conditional_elementwise(3, 2, kind="nope"),
    lambda: T.conditional_elementwise(3, -2),
    lambda: T.LU.from_matrix(torch.tensor([[1.0, 2.0], [2.0, 4.0]])),
    lambda: T.LU.from_matrix(torch.ones(2, 3)),
    lambda: T.Dense.from_matrix(torch.zeros(2, 2)),
    lambda: T.Dense.from_matrix(torch.eye(2), bias=torch.zeros(3)),
    lambda: T.Triangular.from_matrix(torch.tensor([[1.0, 1.0], [0.0, 1.0]])),
    lambda: T.Triangular.from_matrix(torch.tensor([[-1.0, 0.0], [0.0, 1.0]])),
])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()


# --- conditional twins --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["affine", "additive", "piecewise_linear"])
def test_conditional_elementwise_starts_at_identity(kind):
    layer = T.conditional_elementwise(3, 2, kind=kind, hidden_dims=(8,))
    x, c = torch.randn(5, 3), torch.randn(5, 2)
    t = layer.condition(c)
    y = t(x)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), torch.zeros(5), atol=1e-6)


def test_conditional_elementwise_depends_on_context_and_broadcasts():
    layer = perturb_parameters(T.conditional_elementwise(2, 3, hidden_dims=(8,)).double(), scale=0.5)
    x = torch.randn(4, 2, dtype=torch.float64)
    c1, c2 = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert not torch.allclose(layer.condition(c1)(x), layer.condition(c2)(x))
    # a context with a larger batch than x: x broadcasts against it
    c = torch.randn(5, 4, 3, dtype=torch.float64)
    t = layer.condition(c)
    y = t(x)
    assert y.shape == (5, 4, 2)
    assert t.log_abs_det_jacobian(x, y).shape == (5, 4)
    assert torch.allclose(t.inv(y), x.expand(5, 4, 2), atol=1e-10)


def test_conditional_householder_is_orthogonal_per_context():
    layer = perturb_parameters(T.conditional_householder(4, 2, count_transforms=2, hidden_dims=(8,)).double(), scale=0.5)
    c = torch.randn(3, 2, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = layer.condition(c)(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert not torch.allclose(layer.condition(c[:1])(x), y)
