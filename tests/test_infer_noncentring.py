"""AutoFlow's non-centring layer (``pyroflows.infer.noncentring``): which sites it takes, the
exactness of the map (float64 Jacobian, round trip, batch shapes) and the guide around it."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyroflows.infer import AutoFlow
from pyroflows.infer.noncentring import ModelNonCentring, noncentrable_sites

Y = torch.tensor([2.0, -1.0, 0.5, 3.0])


def hierarchical(y=Y):
    """Eight-schools shape, four groups: theta's scale is the latent tau."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(2.0))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def chained():
    """Two non-centrable sites in a chain, one with an event dimension."""
    v = pyro.sample("v", dist.Normal(0.0, 1.0))
    a = pyro.sample("a", dist.Normal(0.5 * v, v.exp()))
    pyro.sample("b", dist.Normal(a.unsqueeze(-1), (0.3 * v).exp().unsqueeze(-1) * torch.ones(2)).to_event(1))


def funnel(dim=4):
    """Neal's funnel: v ~ N(0, 3^2), x_i ~ N(0, e^v) (here without data)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(dim), (v / 2).exp().unsqueeze(-1) * torch.ones(dim)).to_event(1))


def fixed_scales():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("theta", dist.Normal(mu, 2.0))


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def _guide(model, **kw):
    guide = AutoFlow(model, **kw)
    guide()
    return guide


def test_takes_exactly_the_normal_sites_whose_scale_is_latent():
    assert _guide(hierarchical).noncentred_sites == ["theta"]
    assert _guide(chained).noncentred_sites == ["a", "b"]
    assert _guide(fixed_scales).noncentred_sites == []  # a latent loc alone is left centred
    assert _guide(hierarchical, noncentre=False).noncentred_sites == []
    assert noncentrable_sites(_guide(funnel)) == ["x"]


@pytest.mark.parametrize("model", [hierarchical, chained, funnel])
def test_map_is_exact_in_float64(model):
    guide = _guide(model)
    t = ModelNonCentring(guide, guide.noncentred_sites, plate_nesting=guide._model_plate_nesting())
    x = torch.randn(3, guide.latent_dim, dtype=torch.float64)
    y = t(x)
    assert torch.allclose(t.inv(y), x, atol=1e-12)
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == (3,)
    fresh = ModelNonCentring(guide, guide.noncentred_sites, plate_nesting=guide._model_plate_nesting())
    for row in range(3):
        jac = torch.autograd.functional.jacobian(fresh, x[row])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[row], atol=1e-10)
        # triangular: the sites before a non-centred one are unchanged
        assert torch.allclose(fresh.log_abs_det_jacobian(x[row], fresh(x[row])), ladj[row], atol=1e-12)
    # the plain sites pass through; the non-centred ones are mean + sd * noise
    if model is hierarchical:
        mu, log_tau, eta = x[:, 0], x[:, 1], x[:, 2:]
        assert torch.allclose(y[:, :2], x[:, :2])
        assert torch.allclose(y[:, 2:], mu[:, None] + log_tau.exp()[:, None] * eta, atol=1e-12)
        assert torch.allclose(ladj, 4 * log_tau, atol=1e-12)


def test_batch_shapes_of_vectorised_particles():
    guide = _guide(hierarchical)
    t = ModelNonCentring(guide, guide.noncentred_sites, plate_nesting=1)
    x = torch.randn(5, 1, guide.latent_dim)  # what SVI's vectorised particle plate draws
    y = t(x)
    assert y.shape == x.shape and t.log_abs_det_jacobian(x, y).shape == (5, 1)
    assert torch.allclose(t.inv(y), x, atol=1e-5)


def test_guide_density_is_normalised_over_the_centred_sites():
    """q over the model's own (centred) latents: the path-derivative recomputation through the
    inverses agrees with the forward pass, and in 1 + 1 dimensions q integrates to 1."""
    guide = _guide(hierarchical)
    draws = guide.get_posterior().sample((200,))
    assert torch.allclose(guide._detached_log_prob(draws), guide.get_posterior().log_prob(draws), atol=1e-4)

    def tiny():
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.3 * v, (0.5 * v).exp()))

    g = _guide(tiny)
    assert g.noncentred_sites == ["x"]
    grid = torch.linspace(-12, 12, 801, dtype=torch.float64)
    v, x = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([v.reshape(-1), x.reshape(-1)], -1)
    g = g.double()
    with torch.no_grad():
        density = g.get_posterior().log_prob(points).exp().reshape(v.shape)
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert abs(float(mass) - 1.0) < 2e-3


def test_funnel_starts_at_its_exact_shape():
    """In the non-centred coordinates Neal's funnel is a product of normals, so the guide's start
    (the Laplace Gaussian there) already matches it; centred, the start misses the neck."""
    with_layer = _guide(funnel).diagnostics(num_samples=4000)
    without = _guide(funnel, noncentre=False).diagnostics(num_samples=4000)
    assert with_layer.khat < 0.5 and with_layer.ess > 0.5
    assert without.khat > 0.7


def test_svi_trains_with_vectorised_particles_and_draws_are_centred():
    guide = AutoFlow(hierarchical)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=4, vectorize_particles=True))
    losses = [svi.step() for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    draws = guide.sample_posterior(500)
    assert draws["theta"].shape == (500, 4) and (draws["tau"] > 0).all()
    # the centred theta spreads with tau around mu, as the layer makes it
    spread = (draws["theta"] - draws["mu"][:, None]).std(1)
    assert torch.corrcoef(torch.stack([spread.log(), draws["tau"].log()]))[0, 1] > 0.5


def test_a_model_the_search_cannot_run_stays_centred_with_a_warning():
    def fragile():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if mu.is_leaf and mu.requires_grad:  # what the search passes in
            raise RuntimeError("this model does not take gradient-tracking values")
        pyro.sample("x", dist.Normal(mu, mu.exp()))

    guide = AutoFlow(fragile)
    with pytest.warns(RuntimeWarning, match="stays centred"):
        guide()
    assert guide.noncentred_sites == []
    assert _guide(fragile, noncentre=False).noncentred_sites == []


def test_the_model_stops_after_the_last_non_centred_site():
    """The layer's model run ends at the last non-centred site: what follows (a likelihood) is
    not evaluated, and the plate stack is left clean."""
    calls = []

    def model(y=Y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        with pyro.plate("groups", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            calls.append(1)
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    guide = _guide(model)
    t = ModelNonCentring(guide, guide.noncentred_sites, plate_nesting=1)
    before = len(calls)
    x = torch.randn(3, guide.latent_dim)
    assert torch.allclose(t.inv(t(x)), x, atol=1e-5)
    assert len(calls) == before
    from pyro.poutine.runtime import _PYRO_STACK
    assert len(_PYRO_STACK) == 0


def test_neutra_and_summaries_without_the_data_use_the_latest_call():
    """NeuTraReparam asks for ``get_transform()`` without the model's arguments; the layer then
    runs the model with those of the guide's latest call (here: data without a default)."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        with pyro.plate("groups", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu + y.mean(), tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    guide = AutoFlow(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step(Y)
    z = guide.get_base_dist().sample((7,))
    assert torch.allclose(guide.get_transform()(z), guide.get_transform(Y)(z))
    draws = guide.sample_posterior(50)
    assert draws["theta"].shape == (50, 4) and torch.isfinite(draws["theta"]).all()
    neutra = NeuTraReparam(guide)
    mcmc = MCMC(NUTS(neutra.reparam(model)), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(Y)
    shared = mcmc.get_samples()["mu_shared_latent"]
    assert shared.shape == (5, guide.latent_dim) and torch.isfinite(guide.get_transform()(shared)).all()


def test_masked_and_expanded_normal_sites_are_recognised():
    def model():
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        pyro.sample("a", dist.Normal(0.0, tau).expand([3]).mask(torch.tensor([True, False, True])).to_event(1))
        pyro.sample("b", dist.Laplace(0.0, tau))  # not normal: left centred

    assert _guide(model).noncentred_sites == ["a"]
