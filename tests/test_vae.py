"""Flows in VAEs: the encoder-driven base ``flow(h, base=q0)``, flow priors, per-datum IWAE bounds."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import flows
from pyroflows.infer import elbo_per_datum, iwae_bound, iwae_bounds, per_datum_log_weights
from pyroflows.infer.vae import POSTERIORS, VAE, make_posterior, train_vae

D, C, B = 3, 4, 5


def _q0(batch=(B,), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(*batch, D, generator=g, dtype=dtype)
    scale = torch.rand(*batch, D, generator=g, dtype=dtype) + 0.5
    return dist.Normal(loc, scale).to_event(1)


# ---------------------------------------------------------------- flow(context, base=q0)
@pytest.mark.parametrize("conditional", [True, False])
def test_identity_flow_over_base_is_exactly_the_base(conditional):
    # a freshly built IAF is the identity (its MADE output layer starts at zero)
    flow = flows.iaf(D, num_layers=2, hidden_dims=(8,), context_dim=C if conditional else None)
    h = torch.randn(B, C) if conditional else None
    q0 = _q0()
    q = flow(h, base=q0)
    assert q.batch_shape == q0.batch_shape and q.event_shape == q0.event_shape
    torch.manual_seed(1)
    z = q.rsample((2,))
    torch.manual_seed(1)
    z0 = q0.rsample((2,))
    assert torch.equal(z, z0)
    x = torch.randn(2, B, D)
    assert torch.equal(flow(h, base=q0).log_prob(x), q0.log_prob(x))


@pytest.mark.parametrize("kind", [k for k in POSTERIORS if k != "gaussian"])
def test_log_density_of_own_samples_matches_change_of_variables(kind):
    torch.manual_seed(0)
    flow = make_posterior(kind, D, C, hidden_dims=(8,)).double()
    for p in flow.parameters():  # move away from the identity initialisation
        p.data.add_(0.3 * torch.randn_like(p))
    h = torch.randn(B, C, dtype=torch.float64)
    q0 = _q0(dtype=torch.float64)
    q = flow(h, base=q0)
    z0 = q0.sample()
    x = z0
    for t in q.transforms:  # the sampling pass; log_prob below reuses its cached log-dets
        x = t(x)
    lp = q.log_prob(x)
    assert lp.shape == (B,)

    # recompute from scratch with autograd: log q0(z0) - log|det df/dz0|, one datum at a time
    for i in range(B):
        def f(z, i=i):
            out = z
            for t in flow(h[i], base=dist.Normal(q0.base_dist.loc[i], q0.base_dist.scale[i]).to_event(1)).transforms:
                out = t(out)
            return out

        jac = torch.autograd.functional.jacobian(f, z0[i])
        expected = q0.log_prob(z0)[i] - torch.linalg.slogdet(jac).logabsdet
        assert torch.allclose(lp[i], expected, atol=1e-8, rtol=1e-8), (kind, i, lp[i], expected)


def test_base_and_context_batch_shapes_broadcast():
    flow = flows.sylvester(D, num_layers=2, context_dim=C)
    h = torch.randn(B, C)
    q = flow(h, base=dist.Normal(torch.zeros(7, B, D), 1.0).to_event(1))
    assert q.batch_shape == (7, B)
    x = q.rsample()
    assert x.shape == (7, B, D) and q.log_prob(x).shape == (7, B)
    q = flow(torch.randn(7, B, C), base=_q0())  # context with more batch dims than the base
    assert q.batch_shape == (7, B)


def test_bad_bases_are_rejected():
    flow = flows.iaf(D, num_layers=1, hidden_dims=(8,), context_dim=C)
    h = torch.randn(B, C)
    with pytest.raises(ValueError, match="event shape"):
        flow(h, base=dist.Normal(torch.zeros(B, D + 1), 1.0).to_event(1))
    with pytest.raises(ValueError, match="broadcast"):
        flow(h, base=dist.Normal(torch.zeros(B + 1, D), 1.0).to_event(1))
    with pytest.raises(TypeError, match="Distribution"):
        flow(h, base="normal")


# ---------------------------------------------------------------- a tiny VAE, every posterior
@pytest.mark.parametrize("posterior,flow_prior",
                         [(p, False) for p in POSTERIORS] + [("gaussian", True), ("iaf", True)])
def test_tiny_vae_trains_with_each_posterior(posterior, flow_prior):
    torch.manual_seed(0)
    x = (torch.rand(40, 12) < 0.3).float()
    prior = flows.realnvp(2, num_layers=2, hidden_dims=(8,)) if flow_prior else None
    vae = VAE(12, latent_dim=2, hidden_dims=(16,), posterior=posterior, prior=prior, context_dim=4,
              **({} if posterior == "gaussian" else {"num_layers": 2}))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    hist = train_vae(vae, x, epochs=3, batch_size=20, lr=1e-2, seed=0)
    assert len(hist) == 3 and all(math.isfinite(h) for h in hist)
    moved = [k for k, v in vae.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("decoder") for k in moved) and any(k.startswith("encoder") for k in moved)
    if posterior != "gaussian":
        assert any(k.startswith("posterior") for k in moved)
    if flow_prior:
        assert any(k.startswith("prior") for k in moved)
    r = iwae_bounds(vae.model, vae.guide, x[:6], num_samples=8, chunk_size=3)
    assert r.iwae.shape == r.elbo.shape == (6,) and r.log_weights.shape == (8, 6)


# ---------------------------------------------------------------- iwae_bound on a linear-Gaussian model
L_DIM, X_DIM, S = 2, 3, 0.5
W = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]], dtype=torch.float64)
BIAS = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(L_DIM, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + BIAS, S).to_event(1), obs=x)


def lg_exact_log_likelihood(x):
    cov = W @ W.T + S**2 * torch.eye(X_DIM, dtype=x.dtype)
    return dist.MultivariateNormal(BIAS, cov).log_prob(x)


def lg_posterior(x):
    prec = torch.eye(L_DIM, dtype=x.dtype) + W.T @ W / S**2
    cov = torch.linalg.inv(prec)
    mean = (x - BIAS) @ W @ cov / S**2
    return mean, cov


def lg_exact_guide(x):
    mean, cov = lg_posterior(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal(mean, cov))


def lg_poor_guide(x):  # right mean, mean-field and too narrow: a loose bound
    mean, cov = lg_posterior(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(mean, 0.5 * cov.diagonal().sqrt()).to_event(1))


def _data(n=64):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, L_DIM, generator=g, dtype=torch.float64)
    return z @ W.T + BIAS + S * torch.randn(n, X_DIM, generator=g, dtype=torch.float64)


def test_iwae_equals_exact_log_likelihood_with_the_exact_posterior():
    x = _data()
    pyro.set_rng_seed(0)
    bound = iwae_bound(lg_model, lg_exact_guide, x, num_samples=10, chunk_size=4)
    assert bound.shape == (64,)
    assert torch.allclose(bound, lg_exact_log_likelihood(x), atol=1e-10)
    assert torch.allclose(elbo_per_datum(lg_model, lg_exact_guide, x, num_samples=3), bound, atol=1e-10)


def test_iwae_is_at_least_the_elbo_and_tightens_with_k():
    x = _data()
    pyro.set_rng_seed(0)
    r = iwae_bounds(lg_model, lg_poor_guide, x, num_samples=200, chunk_size=64)
    assert (r.iwae >= r.elbo).all()
    exact = lg_exact_log_likelihood(x)
    means = []
    for k in (1, 10, 1000):
        pyro.set_rng_seed(1)
        means.append(float(iwae_bound(lg_model, lg_poor_guide, x, num_samples=k, chunk_size=250).mean()))
    assert means[0] < means[1] < means[2] <= float(exact.mean()) + 0.01
    assert float(exact.mean()) - means[0] > 0.2  # the poor guide leaves a real gap at K = 1
    assert float(exact.mean()) - means[2] < 0.25 * (float(exact.mean()) - means[0])


def test_iwae_shapes_for_image_batches_and_nested_plates():
    x = (torch.rand(6, 1, 4, 4) < 0.5).float()
    dec = torch.nn.Linear(2, 16)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))
            logits = dec(z).reshape(*z.shape[:-1], 1, 4, 4)
            with pyro.plate("rows", 1, dim=-1):  # a nested plate, summed within the datum
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.reshape(-1, 1, 16)[..., :2], 1.0).to_event(1))

    lw = per_datum_log_weights(model, guide, x, num_samples=5, chunk_size=2)
    assert lw.shape == (5, 6) and torch.isfinite(lw).all()


def test_global_latents_are_rejected():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="global latent"):
        iwae_bound(model, guide, torch.zeros(4), num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        iwae_bound(lg_model, lg_exact_guide, _data(4), num_samples=0)


def test_example_vae_runs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from scripts import load_script

    example = load_script("examples/vae.py", "example_vae")
    out = tmp_path / "r.jsonl"
    example.main(["--epochs", "1", "--k", "4", "--posteriors", "iaf", "--seeds", "0",
                  "--out", str(out), "--img-dir", ""])
    records = [line for line in out.read_text().splitlines() if line]
    assert len(records) == 2  # the posterior, then the flow prior with it
    assert "| digits | iaf | realnvp | 1 |" in capsys.readouterr().out
