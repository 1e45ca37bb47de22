"""``pyroflows.Flow``: the nn.Module wrapper that returns a Pyro distribution."""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows.transforms as T
from pyroflows import Flow


def _flow(dim=2):
    torch.manual_seed(0)
    flow = Flow([T.elementwise(dim, kind="affine"), T.leaky_relu(), T.elementwise(dim, kind="affine")])
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_flow_returns_a_pyro_transformed_distribution():
    flow = _flow()
    d = flow()
    assert isinstance(d, dist.TransformedDistribution)
    assert d.event_shape == (2,)
    x = d.sample((5,))
    assert x.shape == (5, 2)
    assert torch.allclose(flow.log_prob(x), d.log_prob(x))


def test_base_is_held_as_buffers_and_moves_with_dtype():
    flow = _flow().to(torch.float64)
    names = dict(flow.named_buffers())
    assert {"base.loc", "base.scale"} <= set(names)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert flow.log_prob(x).dtype == torch.float64
    assert flow.sample((3,)).dtype == torch.float64


def test_state_dict_round_trip_gives_identical_log_prob():
    flow = _flow()
    x = torch.randn(10, 2)
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    fresh = Flow([T.elementwise(2, kind="affine"), T.leaky_relu(), T.elementwise(2, kind="affine")])
    assert not torch.equal(fresh.log_prob(x), flow.log_prob(x))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.log_prob(x), flow.log_prob(x))


def test_pyro_module_registers_the_parameters():
    pyro.clear_param_store()
    flow = _flow()
    pyro.module("flow", flow)
    n_params = sum(1 for _ in flow.parameters())
    assert len([k for k in pyro.get_param_store().keys() if k.startswith("flow$$$")]) == n_params


def test_wrong_event_shape_names_the_expected_shape():
    flow = _flow()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\).*got \(5, 3\)"):
        flow.log_prob(torch.randn(5, 3))


def test_wrong_dtype_is_named():
    flow = _flow()
    with pytest.raises(TypeError, match="float64"):
        flow.log_prob(torch.randn(5, 2, dtype=torch.float64))


def test_unit_interval_layers_get_a_uniform_base():
    flow = Flow([T.piecewise_linear(2)])
    x = flow.sample((1000,))
    assert ((x > 0) & (x < 1)).all()
    assert torch.allclose(flow.log_prob(torch.full((1, 2), 0.5)), torch.zeros(1), atol=1e-6)


def test_non_conditional_flow_rejects_a_context_and_vice_versa():
    flow = _flow()
    with pytest.raises(ValueError, match="not conditional"):
        flow(torch.randn(3))


def test_empty_transform_list_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        Flow([])


def test_rsample_is_differentiable_and_sample_is_not():
    flow = _flow()
    assert flow.rsample((4,)).requires_grad
    assert not flow.sample((4,)).requires_grad


@pytest.mark.parametrize("name", ["iaf", "nsf"])
def test_jit_trace_elbo_with_a_flow_guide_runs_without_warnings(name):
    """A flow guide under JitTrace_ELBO: no TracerWarning (or any other) from pyroflows."""
    import warnings

    import pyro
    from pyro.infer import SVI, JitTrace_ELBO

    from pyroflows import flows

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = torch.randn(20, 2) + 1.0
    flow = getattr(flows, name)(2, num_layers=2, hidden_dims=(8,))

    def model(data):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(z, torch.ones(2)).to_event(1), obs=data)

    def guide(data):
        pyro.module("flow", flow)
        pyro.sample("z", flow())

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # torch itself deprecates torch.jit.trace, which Pyro's JIT ELBOs call: not ours
        warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated", category=DeprecationWarning)
        losses = [svi.step(data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_import_pyroflows_loads_train_and_data_but_not_matplotlib():
    import subprocess
    import sys

    code = ("import sys, pyroflows; assert callable(pyroflows.train.fit); assert pyroflows.data is not None; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- one route: the composed transform -------------------------------------------------

def test_flow_keeps_every_transform_and_is_usable_as_a_pyro_transform():
    from torch.distributions.transforms import ExpTransform

    torch.manual_seed(0)
    exp = ExpTransform()
    flow = Flow([T.elementwise(2, kind="affine"), exp])
    assert flow.transforms[1] is exp and len(flow.transforms) == 2
    x = flow.sample((4,))
    assert (x > 0).all()  # the parameter-free ExpTransform ran
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    d = dist.TransformedDistribution(base, [flow.transform()])
    assert torch.allclose(d.log_prob(x), flow.log_prob(x))
    assert torch.allclose(flow().log_prob(x), flow.log_prob(x))
    assert torch.allclose(flow.log_prob(x, cache=False), flow.log_prob(x))
    # a flow's composed transform composes again
    from pyroflows import flows

    d2 = dist.TransformedDistribution(base, [flows.nsf(2, num_layers=1, hidden_dims=(8,)).transform(),
                                             flow.transform()])
    assert d2.rsample((3,)).shape == (3, 2)


def test_conditional_flow_routes_and_per_call_base():
    from pyroflows import flows

    torch.manual_seed(0)
    flow = flows.realnvp(2, num_layers=2, hidden_dims=(8,), context_dim=3)
    c = torch.randn(5, 3)
    x = flow.sample((), c)
    assert x.shape == (5, 2)
    lp = flow.log_prob(x, c)
    assert torch.allclose(lp, flow(c).log_prob(x), atol=1e-6)
    assert torch.allclose(lp, dist.TransformedDistribution(flow.base_distribution((5,)), [flow.transform(c)])
                          .log_prob(x), atol=1e-6)
    # flow(context, base=q0): the same layers over a base given for this call
    q0 = dist.Normal(torch.ones(5, 2), 0.5 * torch.ones(5, 2)).to_event(1)
    d = flow(c, base=q0)
    z, ladj = flow.transform(c).inverse_and_ladj(x, cache=False)
    assert torch.allclose(d.log_prob(x), q0.log_prob(z) - ladj, atol=1e-6)
    assert torch.allclose(flow.log_prob(x, c, base=q0), d.log_prob(x), atol=1e-6)


def test_base_is_a_module_and_a_fixed_distribution_is_accepted():
    from pyroflows.flow import StandardNormal

    assert isinstance(_flow().base, StandardNormal)
    fixed = dist.Normal(torch.ones(2), torch.ones(2)).to_event(1)
    flow = Flow([T.elementwise(2, kind="affine")], base=fixed)
    assert isinstance(flow.base, torch.nn.Module) and flow.base_distribution() is fixed


def test_torch_transforms_in_a_flow_after_zuko_patched_them():
    # zuko adds a call_and_ladj of its own to torch's Transform class; ours is recognised by type
    zuko = pytest.importorskip("zuko")
    from torch.distributions.transforms import ExpTransform

    assert zuko is not None and hasattr(ExpTransform(), "call_and_ladj")
    torch.manual_seed(0)
    flow = Flow([T.elementwise(2, kind="affine"), ExpTransform()])
    x = flow.sample((4,))
    assert torch.allclose(flow.log_prob(x), flow().log_prob(x))


def test_student_t_base_is_a_learnable_tail_weight():
    """StudentTBase: the density is the product of Student-t's with nu = min_df + exp(rho),
    starting at 30; a flow over it integrates to 1; rsample is differentiable in nu, so
    a forward-KL fit to Cauchy-like data lowers nu (heavier tails)."""
    from pyroflows import StudentTBase

    base = StudentTBase(2)
    assert torch.allclose(base.df, torch.full((2,), 30.0))
    z = torch.randn(7, 2)
    expect = dist.StudentT(30.0, 0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(base().log_prob(z), expect, atol=1e-5)
    flow = Flow([T.elementwise(1, kind="affine")], base=StudentTBase(1))
    grid = torch.linspace(-200, 200, 400_001).unsqueeze(-1)
    with torch.no_grad():
        mass = torch.trapezoid(flow.log_prob(grid).exp(), grid.squeeze(-1))
    assert abs(float(mass) - 1.0) < 1e-3
    draws = flow.rsample((64,))
    (g,) = torch.autograd.grad(draws.abs().sum(), flow.base.raw_df)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="df > min_df"):
        StudentTBase(2, df=1.5)
    torch.manual_seed(0)
    data = dist.StudentT(2.5).sample((2000, 1))
    fit = Flow([T.elementwise(1, kind="affine")], base=StudentTBase(1))
    opt = torch.optim.Adam(fit.parameters(), lr=5e-2)
    for _ in range(150):
        opt.zero_grad()
        (-fit.log_prob(data).mean()).backward()
        opt.step()
    assert float(fit.base.df.detach()) < 6.0


def test_tail_mixture_base_density_draws_and_gradients():
    """TailMixtureBase: an equal mixture of independent t coordinates and an elliptical t; the
    density integrates to 1, the draws follow it, the variance is the mixture's, and ``rsample``
    carries gradients to every degree of freedom."""
    from pyroflows import TailMixtureBase

    base = TailMixtureBase(2).double()
    with torch.no_grad():
        base.raw_df.copy_(torch.tensor([0.2, 1.0, -0.5]))  # the coordinates', then the elliptical part's
    d = base()
    g = torch.linspace(-80, 80, 1601, dtype=torch.float64)
    h = g[1] - g[0]
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    density = d.log_prob(z).exp()
    assert abs(float(density.sum() * h * h) - 1.0) < 2e-3  # the rest is beyond the grid's +-80
    region = (z[..., 0] > 1.05) & (z[..., 1] > 0.55)  # cell edges of the grid (midpoint rule)
    exact = float(density[region].sum() * h * h)
    torch.manual_seed(0)
    x = d.sample((400000,))
    assert abs(float(((x[:, 0] > 1.05) & (x[:, 1] > 0.55)).double().mean()) - exact) < 2e-3
    # the elliptical part puts far more mass on the diagonal than the product part alone
    diag = ((x[:, 0] > 6) & (x[:, 1] > 6)).double().mean()
    product = torch.distributions.StudentT(base.df.detach()).sample((400000,))
    assert diag > 5 * ((product[:, 0] > 6) & (product[:, 1] > 6)).double().mean()
    nu, nu0 = base.df.detach(), base.joint_df.detach()
    assert torch.allclose(d.variance, 0.5 * nu / (nu - 2) + 0.5 * nu0 / (nu0 - 2))
    (grad,) = torch.autograd.grad(base().rsample((16,)).square().sum(), [base.raw_df])
    assert bool(grad.abs().gt(0).all())
    with pytest.raises(ValueError, match="df"):
        TailMixtureBase(2, df=1.0)
    # a state dict from when the elliptical part's degrees of freedom were a parameter of their own
    saved = {"loc": base.loc.clone(), "raw_df": base.raw_df.detach()[:2].clone(), "raw_joint_df": base.raw_df.detach()[2].clone()}
    reloaded = TailMixtureBase(2).double()
    reloaded.load_state_dict(saved)
    assert torch.equal(reloaded.raw_df, base.raw_df)
    with pytest.raises(ValueError, match="joint_weight"):
        TailMixtureBase(2, joint_weight=1.0)
    # another weight: still a density, the mixture of its two parts
    light = TailMixtureBase(2, joint_weight=0.2).double()
    with torch.no_grad():
        light.raw_df.copy_(base.raw_df)
    assert abs(float(light().log_prob(z).exp().sum() * h * h) - 1.0) < 2e-3
    point = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    assert torch.allclose(light().log_prob(point).exp(),
                          0.8 * torch.distributions.StudentT(nu).log_prob(point).sum(-1).exp()
                          + 0.2 * (d.log_prob(point).exp() * 2 - torch.distributions.StudentT(nu).log_prob(point).sum(-1).exp()))
