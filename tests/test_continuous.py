"""Continuous normalizing flows (FFJORD): trace modes, directions, solver errors, training."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.autograd.functional import jacobian

from pyroflows import flows
from pyroflows.train import fit
from pyroflows.transforms import ConvergenceError
from pyroflows.transforms.continuous import ContinuousFlow, conditional_continuous_flow, regularization_loss


def _layer(**kw):
    torch.manual_seed(0)
    layer = ContinuousFlow(2, (8, 8), **kw).double()
    with torch.no_grad():  # a non-trivial vector field (the output layer starts at zero)
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    return layer


def _exact_logdet(t, x):
    return torch.linalg.slogdet(jacobian(t._call, x))[1]


def test_exact_trace_matches_autograd_jacobian_both_directions():
    layer = _layer(trace="exact")
    x = torch.tensor([0.7, -1.2], dtype=torch.float64)
    y, ladj = layer._call_and_ladj(x)
    exact = _exact_logdet(layer, x)
    assert abs(exact) > 0.05  # the field is not volume preserving
    assert abs(ladj - exact) < 1e-8
    x_back, ladj_inv = layer._inverse_and_ladj(y)
    assert abs(ladj_inv - exact) < 1e-8
    assert (x_back - x).abs().max() < 1e-8


def test_conditional_exact_trace_and_context_matters():
    torch.manual_seed(0)
    layer = conditional_continuous_flow(2, 3, (8, 8)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.tensor([0.3, 0.4], dtype=torch.float64)
    c1, c2 = torch.ones(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)
    t = layer.condition(c1)
    assert abs(t.log_abs_det_jacobian(x, t(x)) - _exact_logdet(t, x)) < 1e-8
    assert (t(x) - layer.condition(c2)(x)).abs().max() > 1e-3


def test_hutchinson_estimate_is_unbiased():
    layer = _layer(trace="hutchinson")
    assert layer.exact_log_det is False
    x = torch.tensor([0.7, -1.2], dtype=torch.float64)
    with torch.no_grad():
        # 2000 rows of the same point: each row gets its own fixed noise for the solve
        _, est = layer._call_and_ladj(x.expand(2000, 2))
    layer.trace = "exact"
    exact = _exact_logdet(layer, x)
    se = est.std() / len(est) ** 0.5
    assert est.std() > 0  # it is an estimate
    assert abs(est.mean() - exact) <= 4 * se, (est.mean(), exact, se)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_round_trip_within_solver_tolerance(dtype, tol):
    layer = _layer().to(dtype)
    x = torch.randn(64, 2, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert (y - x).abs().max() > 0.1
        assert (layer._inverse(y) - x).abs().max() < tol


def test_adjoint_gradients_match_backprop():
    x = torch.randn(16, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        layer = _layer(adjoint=adjoint, rtol=1e-10, atol=1e-10)
        y, ladj = layer._call_and_ladj(x)
        (y.square().sum() + ladj.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_solver_step_budget_raises_convergence_error():
    layer = _layer(max_num_steps=2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConvergenceError, match="max_num_steps=2"):
        layer(torch.randn(4, 2, dtype=torch.float64))


def test_non_finite_input_raises_convergence_error():
    layer = _layer()
    with pytest.raises(ConvergenceError):
        layer(torch.tensor([float("nan"), 0.0], dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="trace"):
        ContinuousFlow(2, trace="fast")
    with pytest.raises(ValueError, match="rtol"):
        ContinuousFlow(2, rtol=0.0)
    with pytest.raises(ValueError, match="max_num_steps"):
        ContinuousFlow(2, max_num_steps=0)
    with pytest.raises(ValueError, match="penalty"):
        ContinuousFlow(2, kinetic_energy=-1.0)


def test_missing_torchdiffeq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match=r"pyroflows\[ode\]"):
        ContinuousFlow(2)(torch.zeros(2))


def test_regularization_values_and_nfe():
    layer = _layer(trace="exact", kinetic_energy=1.0, jacobian_norm=0.0)
    x = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    layer(x)
    assert layer.nfe > 0 and layer.nfe_total >= layer.nfe
    # kinetic energy of the path: the integral of |f(z(t), t)|^2, by the trapezoid rule on a fine grid
    with torch.no_grad():
        ts = torch.linspace(0, 1, 401, dtype=torch.float64)
        zs = [x]
        for a, b in zip(ts[:-1], ts[1:]):  # RK4 on the same field
            h, z = b - a, zs[-1]
            k1 = layer.dynamics(z, a)
            k2 = layer.dynamics(z + h / 2 * k1, a + h / 2)
            k3 = layer.dynamics(z + h / 2 * k2, a + h / 2)
            k4 = layer.dynamics(z + h * k3, b)
            zs.append(z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
        sq = torch.stack([layer.dynamics(z, t).square().sum() for z, t in zip(zs, ts)])
        kinetic = torch.trapezoid(sq, ts)
    reg = regularization_loss(layer)
    assert abs(reg - kinetic) < 1e-4 * kinetic
    assert regularization_loss(layer) == 0.0  # handed out once
    layer._inverse_and_ladj(layer(x))  # the scoring direction integrates 1 -> 0: the same penalty
    assert abs(regularization_loss(layer) - reg) < 1e-8
    # the Jacobian-Frobenius penalty: Hutchinson's estimate is unbiased for the exact one
    exact_j = _layer(trace="exact", jacobian_norm=1.0)
    exact_j(x)
    hutch = _layer(trace="hutchinson", jacobian_norm=1.0)
    with torch.no_grad():
        hutch(x.expand(2000, 2))  # one noise per row; regularization is the batch mean
    assert abs(hutch.regularization - exact_j.regularization) < 0.1 * exact_j.regularization


def test_tiny_ffjord_trains_with_fit_and_penalties():
    torch.manual_seed(0)
    data = torch.randn(256, 2) * torch.tensor([0.5, 2.0]) + torch.tensor([1.0, 0.0])
    flow = flows.ffjord(2, hidden_dims=(16, 16), kinetic_energy=0.01, jacobian_norm=0.01)
    hist = fit(flow, data, epochs=4, batch_size=128, lr=2e-2, progress=False)
    assert hist.train_nll[-1] < hist.train_nll[0] - 0.1, hist.train_nll
    (layer,) = [m for m in flow.modules() if isinstance(m, ContinuousFlow)]
    assert layer.nfe > 0


def test_ffjord_conditional_flow_samples_and_scores():
    flow = flows.ffjord(2, hidden_dims=(8,), context_dim=3)
    c = torch.randn(5, 3)
    with torch.no_grad():
        s = flow(c).sample()
        assert s.shape == (5, 2)
        assert flow(c).log_prob(s).shape == (5,)


def test_ffjord_as_autoflow_guide_and_in_distill(monkeypatch):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    from pyroflows.infer import AutoFlow, distill

    pyro.clear_param_store()

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(1.0))

    guide = AutoFlow(model, "ffjord", hidden_dims=(8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))

    distill_module = sys.modules["pyroflows.infer.distill"]  # the module (the package exports the function)
    added = []

    def spy(module):
        added.append(regularization_loss(module))
        return added[-1]

    monkeypatch.setattr(distill_module, "regularization_loss", spy)
    flow = flows.ffjord(2, hidden_dims=(8,), kinetic_energy=0.1)
    res = distill(flow, lambda x: -0.5 * (x - 1).square().sum(-1), num_steps=3, num_samples=32,
                  num_eval_samples=64, progress=False)
    assert len(res.losses) == 3
    # distill added each step's kinetic-energy penalty, with its graph, to the loss
    # (the vector field starts at zero, so the first penalty is 0)
    assert len(added) == 3 and all(torch.is_tensor(a) and a.requires_grad for a in added)
    assert added[-1] > 0


def test_conditional_ffjord_as_vae_posterior_over_a_per_datum_base():
    import pyro.distributions as dist

    flow = flows.ffjord(2, hidden_dims=(8,), context_dim=4)
    c = torch.randn(6, 4)
    q0 = dist.Normal(torch.randn(6, 2), torch.rand(6, 2) + 0.5).to_event(1)
    q = dist.TransformedDistribution(q0, [t.condition(c) for t in flow.transforms])
    z = q.rsample()
    assert z.shape == (6, 2)
    lp = q.log_prob(z)
    assert lp.shape == (6,) and torch.isfinite(lp).all()
    lp.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_deepcopy_after_a_penalised_pass():
    import copy

    flow = flows.ffjord(2, hidden_dims=(8,), kinetic_energy=0.1)
    flow.log_prob(torch.randn(4, 2))
    (layer,) = [m for m in flow.modules() if isinstance(m, ContinuousFlow)]
    assert layer.regularization is not None and layer.regularization.requires_grad
    clone = copy.deepcopy(flow)  # the recorded penalty (a live graph) is not copied
    assert [m.regularization for m in clone.modules() if isinstance(m, ContinuousFlow)] == [None]
