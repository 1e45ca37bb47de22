"""The example models are vectorisable (k-hat needs it) and the energies example plots."""

import math
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyroflows.infer import AutoFlow
from pyroflows.transforms import elementwise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import eight_schools
import energies
import funnel
import logistic_regression


def tiny(dim):
    return [elementwise(dim, kind="affine")]


@pytest.mark.parametrize("name", ["funnel", "eight_schools", "logistic_regression"])
def test_example_models_give_importance_weights(name):
    pyro.set_rng_seed(0)
    if name == "funnel":
        model, args, dim = funnel.model, (5,), 5
    elif name == "eight_schools":
        model, args, dim = eight_schools.model, (), 10
    else:
        x, y = logistic_regression.load_data()
        model, args, dim = logistic_regression.model, (x[:50], y[:50]), 31
    guide = AutoFlow(model, tiny)
    guide(*args)
    assert guide.latent_dim == dim
    lw = guide.log_importance_weights(*args, num_samples=20)
    assert lw.shape == (20,) and torch.isfinite(lw).all()
    assert lw1_shape(guide, args) == (1,)  # a single draw (no particle plate) works too


def lw1_shape(guide, args):
    return tuple(guide.log_importance_weights(*args, num_samples=1).shape)


def test_energy_normaliser_quadrature_and_plot(tmp_path):
    # a standard normal on [-4, 4]^2 has mass (1 - 2 Phi(-4))^2
    exact = 2 * math.log(math.erf(4 / math.sqrt(2)))
    assert abs(energies.grid_log_z(lambda z: -0.5 * (z**2).sum(-1) - math.log(2 * math.pi), n=400) - exact) < 1e-4
    flow = energies.box_flow(tiny)
    x = flow.sample((500,))
    assert x.abs().max() < energies.BOX
    results = energies.run(["U1"], num_steps=3, num_samples=16, anneal_steps=2, progress=False, flow=tiny)
    energies.plot(results, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000
