"""AutoFlow inside ordinary Pyro code: SVI, Predictive, median/quantiles, NeuTra, diagnostics."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from pyro.infer.reparam import NeuTraReparam

import pyroflows
from pyroflows.infer import AutoFlow
from pyroflows.transforms import elementwise, leaky_relu


def small_flow(dim):
    """A tiny flow from existing layers (the named architectures live in pyroflows.flows)."""
    return [elementwise(dim, kind="affine"), leaky_relu(negative_slope=1.0), elementwise(dim, kind="affine")]


DATA = torch.tensor([0.3, 1.1, -0.4, 0.8, 2.0])


def model(data=DATA):
    """Conjugate-ish: loc ~ N(0, 1), scale ~ LogNormal(0, 1); a plate of observations."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def plated_model():
    """A latent site inside a plate (shape (3,)), to check unpacking with batches."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3):
        pyro.sample("theta", dist.Normal(mu, 1.0))


def fit(guide, mdl=model, steps=30, lr=0.05):
    pyro.clear_param_store()
    svi = SVI(mdl, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    return [svi.step() for _ in range(steps)]


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def test_svi_trains_every_parameter_and_starts_at_init_loc():
    guide = AutoFlow(model, small_flow, init_loc_fn=init_to_value(values={"loc": torch.tensor(0.7), "scale": torch.tensor(2.0)}),
                     init_scale=0.05)
    guide()  # sets up the prototype
    # at initialisation q is N(init_loc, init_scale^2) in the unconstrained space
    draws = guide.sample_posterior(2000)
    assert abs(draws["loc"].mean() - 0.7) < 0.01
    assert abs(draws["loc"].std() - 0.05) < 0.005
    assert abs(draws["scale"].log().mean() - torch.tensor(2.0).log()) < 0.01
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    assert any(n.startswith("flow.") for n in before) and any(n.startswith("standardise") for n in before)
    losses = fit(guide, steps=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in guide.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before), f"not trained: {set(before) - set(changed)}"


def test_posterior_is_a_flow_over_the_latent_vector():
    guide = AutoFlow(model, small_flow)
    guide()
    assert guide.latent_dim == 2
    post = guide.get_posterior()
    assert isinstance(post, dist.TransformedDistribution)
    x = post.rsample((7,))
    assert x.shape == (7, 2)
    assert post.log_prob(x).shape == (7,)
    # get_base_dist + get_transform describe the same distribution (NeuTra relies on it)
    z = guide.get_base_dist().sample((5,))
    t = guide.get_transform()
    y = t(z)
    lp = guide.get_base_dist().log_prob(z) - t.log_abs_det_jacobian(z, y)
    assert torch.allclose(lp, post.log_prob(y), atol=1e-5)


def test_callable_may_return_a_flow_and_names_resolve_in_flows():
    guide = AutoFlow(model, lambda d: pyroflows.Flow(small_flow(d)))
    guide()
    assert isinstance(guide.flow, pyroflows.Flow)
    with pytest.raises(ValueError, match="no_such_flow"):
        AutoFlow(model, "no_such_flow")()
    with pytest.raises(ValueError, match="event shape"):
        AutoFlow(model, lambda d: pyroflows.Flow(small_flow(d + 1)))()


def test_median_quantiles_predictive_and_inferencedata():
    guide = AutoFlow(plated_model, small_flow, num_quantile_samples=500)
    fit(guide, mdl=plated_model, steps=5)
    med = guide.median()
    assert set(med) == {"mu", "theta"} and med["theta"].shape == (3,) and med["mu"].shape == ()
    q = guide.quantiles([0.1, 0.5, 0.9])
    assert q["theta"].shape == (3, 3)
    assert (q["theta"][0] < q["theta"][1]).all() and (q["theta"][1] < q["theta"][2]).all()
    pred = Predictive(plated_model, guide=guide, num_samples=11)()
    assert pred["theta"].shape[0] == 11 and pred["theta"].shape[-1] == 3
    idata = guide.to_inferencedata(num_samples=13)
    assert idata.posterior["theta"].shape == (1, 13, 3)
    assert idata.posterior["mu"].shape == (1, 13)


def test_positive_site_stays_positive_in_constrained_draws():
    guide = AutoFlow(model, small_flow)
    fit(guide, steps=5)
    assert (guide.sample_posterior(200)["scale"] > 0).all()
    assert (guide.quantiles([0.01])["scale"] > 0).all()


def test_neutra_reparam_runs_nuts_in_the_flow_space():
    guide = AutoFlow(model, small_flow)
    fit(guide, steps=10)
    neutra = NeuTraReparam(guide)
    mcmc = MCMC(NUTS(neutra.reparam(model)), num_samples=10, warmup_steps=10, disable_progbar=True)
    mcmc.run()
    z = mcmc.get_samples()["loc_shared_latent"]
    assert z.shape == (10, 2) and torch.isfinite(z).all()
    samples = neutra.transform_sample(z)
    assert samples["loc"].shape == (10,) and (samples["scale"] > 0).all()


def test_discrete_site_is_refused_by_name():
    def mixture():
        pyro.sample("which", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'which'"):
        AutoFlow(mixture, small_flow)()


def test_diagnostics_exact_on_a_conjugate_model():
    """With the guide set to the exact posterior, k-hat is low, ESS ~ 1 and log Z is exact."""
    data = torch.tensor([0.5, -0.2, 1.3])

    def conj():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 3):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    guide = AutoFlow(conj, small_flow)
    guide()
    post_var = 1.0 / (1.0 + 3.0)
    post_mean = post_var * data.sum()
    with torch.no_grad():  # the affine layer alone carries the exact posterior
        bound = guide.standardise.transformer.log_scale_bound
        log_sd = 0.5 * torch.log(torch.tensor(post_var))
        guide.standardise.params[:, 0] = post_mean
        guide.standardise.params[:, 1] = bound * torch.atanh(log_sd / bound)
    diag = guide.diagnostics(num_samples=500)
    exact = dist.MultivariateNormal(torch.zeros(3), torch.eye(3) + torch.ones(3, 3)).log_prob(data)
    assert diag.ess > 0.99 and diag.khat < 0.5
    assert abs(diag.log_evidence - float(exact)) < 1e-3 and diag.log_evidence_se < 1e-3
    assert diag.reliable
    # a badly placed guide is flagged
    with torch.no_grad():
        guide.standardise.params[:, 0] = post_mean + 2.0
    bad = guide.diagnostics(num_samples=500)
    assert bad.ess < 0.5 and bad.khat > diag.khat


def test_diagnostics_kwargs_and_chunking_shape():
    guide = AutoFlow(model, small_flow)
    fit(guide, steps=3)
    lw = guide.log_importance_weights(DATA, num_samples=250, chunk_size=100)
    assert lw.shape == (250,) and torch.isfinite(lw).all()


@pytest.mark.parametrize("flow", [None, "maf", "iaf", "realnvp"])
def test_named_flows_train_a_few_svi_steps(flow):
    """AutoFlow(model) (default "nsf") and the other named architectures train under SVI."""
    kw = {"hidden_dims": (8, 8), "num_layers": 2}
    guide = AutoFlow(model, **kw) if flow is None else AutoFlow(model, flow, **kw)
    guide()
    before = {n: p.detach().clone() for n, p in guide.flow.named_parameters()}
    assert before, "the flow has trainable parameters"
    losses = fit(guide, steps=15, lr=0.02)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in guide.flow.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "SVI updated the flow's parameters"
    draws = guide.sample_posterior(200)
    assert torch.isfinite(draws["loc"]).all() and (draws["scale"] > 0).all()


# -- the path-derivative ("sticking the landing") estimator and the linear layer -------------

CONJ_DATA = torch.tensor([0.5, -0.2, 1.3])


def conj_model():
    """x ~ N(0, I_2), obs ~ N(x, 1): posterior N(sum/(1+n), 1/(1+n)) per coordinate."""
    x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("n", 3):
        pyro.sample("obs", dist.Normal(x, 1.0).to_event(1), obs=CONJ_DATA.unsqueeze(-1).expand(3, 2))


def _elbo_grads(guide, particles):
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True,
                      max_plate_nesting=1).differentiable_loss(conj_model, guide)
    params = [p for _, p in sorted(guide.named_parameters())]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_stl_log_prob_matches_the_posterior_and_needs_bijectors():
    guide = AutoFlow(conj_model, small_flow, stl=True)
    guide()
    with torch.no_grad():
        guide.linear.lower.normal_()  # a non-trivial guide
    post = guide.get_posterior()
    theta = post.rsample((5,))
    assert torch.allclose(guide._detached_log_prob(theta), post.log_prob(theta), atol=1e-5)
    from pyro.distributions.transforms import Permute
    with pytest.raises(ValueError, match="Bijector"):
        AutoFlow(conj_model, lambda d: [Permute(torch.tensor([1, 0]))], stl=True)()


def test_stl_gradient_is_zero_at_the_exact_posterior():
    """q = posterior: log p(x, theta) - log q(theta) is constant, so every path-derivative
    gradient vanishes, while the standard estimator's score term does not."""
    grads = {}
    for stl in (True, False):
        pyro.clear_param_store()
        guide = AutoFlow(conj_model, small_flow, stl=stl)
        guide()
        with torch.no_grad():
            bound = guide.standardise.transformer.log_scale_bound
            guide.standardise.params[:, 0] = CONJ_DATA.sum() / 4
            guide.standardise.params[:, 1] = bound * torch.atanh(0.5 * torch.log(torch.tensor(0.25)) / bound)
        grads[stl] = _elbo_grads(guide, 16)
    assert grads[True].abs().max() < 1e-4
    assert grads[False].abs().max() > 1e-2


def test_stl_and_standard_estimators_have_the_same_expected_gradient():
    grads = {}
    for stl in (True, False):
        pyro.set_rng_seed(1)
        pyro.clear_param_store()
        guide = AutoFlow(conj_model, small_flow, stl=stl, init_scale=0.5)
        guide()
        with torch.no_grad():
            guide.linear.lower.fill_(0.3)
            guide.flow.transforms[0].params.normal_(0, 0.3)
        grads[stl] = _elbo_grads(guide, 20000)
    assert torch.allclose(grads[True], grads[False], atol=0.05 * grads[False].abs().max())


def test_stl_fit_recovers_a_correlated_gaussian_posterior():
    """The default guide (linear layer + STL) fits a correlated 2-D Gaussian posterior."""
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])

    def corr_model():
        pyro.sample("x", dist.MultivariateNormal(torch.tensor([1.0, -1.0]), cov))

    guide = AutoFlow(corr_model, small_flow, init_scale=0.5)
    pyro.clear_param_store()
    svi = SVI(corr_model, guide, pyro.optim.Adam({"lr": 0.05}),
              Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0))
    for _ in range(150):
        svi.step()
    x = guide.sample_posterior(4000)["x"]
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -1.0]), atol=0.1)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.12)
    assert guide.diagnostics(num_samples=2000).ess > 0.95


def test_linear_layer_is_optional_and_part_of_the_transform():
    guide = AutoFlow(conj_model, small_flow, linear=False)
    guide()
    assert guide.linear is None and not any(n.startswith("linear") for n, _ in guide.named_parameters())
    guide = AutoFlow(conj_model, small_flow)
    guide()
    assert isinstance(guide.linear, pyroflows.transforms.linear.Triangular)
    assert guide.linear in guide.get_transform().parts
