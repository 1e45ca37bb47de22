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


def test_energy_components_sum_to_the_energies_and_give_mode_masses():
    """exp(-U) is the sum of its components (U1 written out by hand here); the exact mode
    masses sum to 1 and follow the symmetries (U1's crescents and U3's branches: half each);
    a flow's masses are responsibilities averaged over its draws."""
    z = 3 * torch.randn(500, 2, dtype=torch.float64)
    r = z.norm(dim=-1)
    u1 = 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2,
                                                        -0.5 * ((z[:, 0] + 2) / 0.6) ** 2)
    assert torch.allclose(energies.u1(z), u1)
    for name in energies.ENERGIES:
        exact, _ = energies.mode_masses(name)
        assert abs(float(exact.sum()) - 1) < 1e-12
    assert torch.allclose(energies.mode_masses("U1")[0], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(energies.mode_masses("U3")[0], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)
    torch.manual_seed(0)
    _, share = energies.mode_masses("U1", energies.box_flow(tiny), n=2000)
    assert share.shape == (2,) and abs(float(share.sum()) - 1) < 1e-9
