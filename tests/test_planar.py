"""Planar, radial and Sylvester flows: constraints, variants, numerical inverses, errors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from pyroflows import flows
from pyroflows.transforms import (
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSylvester,
    ConvergenceError,
    Planar,
    Radial,
    Sylvester,
)
from pyroflows.transforms.planar import _planar_params, _radial_params, solve_tanh_equation


pytestmark = pytest.mark.usefixtures("default_float64")


def _randomize(module, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _check_exact(t, x):
    """log-det against autograd + slogdet, positive Jacobian determinant, and the round trip."""
    for xi in x:
        J = jacobian(lambda v: t._call(v), xi)
        sign, logabsdet = torch.linalg.slogdet(J)
        y, ladj = t._forward_pass(xi)
        assert sign > 0
        assert torch.allclose(ladj, logabsdet, atol=1e-8), (ladj, logabsdet)
    y = t._call(x)
    assert (t._inverse(y) - x).abs().max() < 1e-8


LAYERS = {
    "planar": lambda: Planar(3),
    "radial": lambda: Radial(3),
    "sylvester-orthogonal": lambda: Sylvester(4, num_vectors=2),
    "sylvester-orthogonal-full": lambda: Sylvester(3),
    "sylvester-householder": lambda: Sylvester(3, variant="householder", num_reflections=2),
    "sylvester-triangular": lambda: Sylvester(3, variant="triangular"),
    "sylvester-triangular-flip": lambda: Sylvester(3, variant="triangular", flip=True),
}


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("name", list(LAYERS))
def test_invertible_for_arbitrary_parameters(name, scale):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    _randomize(layer, scale)
    x = 2 * torch.randn(6, layer.event_shape[0])
    _check_exact(layer, x)


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_conditional_sylvester_variants(variant):
    torch.manual_seed(0)
    layer = ConditionalSylvester(3, 2, variant=variant)
    _randomize(layer, 0.5)
    for c in torch.randn(3, 2):
        _check_exact(layer.condition(c), torch.randn(4, 3))


def test_planar_and_radial_constraints_hold_for_any_theta():
    g = torch.Generator().manual_seed(0)
    # m = w . u_hat is what the log-det and the inverse use; it stays > -1 even when softplus underflows
    _, _, _, m = _planar_params(40 * torch.randn(1000, 2 * 3 + 1, generator=g), 3)
    assert (m > -1).all()
    u_hat, w, _, m = _planar_params(2 * torch.randn(1000, 2 * 3 + 1, generator=g), 3)
    assert ((w * u_hat).sum(-1) > -1).all()
    assert torch.allclose((w * u_hat).sum(-1), m, atol=1e-8)
    _, alpha, beta = _radial_params(20 * torch.randn(1000, 3 + 2, generator=g), 3)
    assert (alpha > 0).all() and (beta >= -alpha).all()


def test_sylvester_structure():
    torch.manual_seed(0)
    for variant, kw in [("orthogonal", {"num_vectors": 2}), ("householder", {}), ("triangular", {"flip": True})]:
        layer = Sylvester(4, variant=variant, **kw)
        _randomize(layer, 2.0)
        Q, R, Rt, _ = layer._params()
        M = Q.shape[-1]
        assert torch.allclose(Q.T @ Q, torch.eye(M), atol=1e-10)
        assert torch.equal(R, R.triu()) and torch.equal(Rt, Rt.triu())
        assert (R.diagonal() * Rt.diagonal() > -1).all()


def test_numerical_inverse_gradient_is_the_implicit_gradient():
    torch.manual_seed(0)
    layer = Sylvester(3, variant="triangular")
    _randomize(layer, 1.0)
    y = torch.randn(4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer._inverse(t), (y,))
    planar = Planar(3)
    _randomize(planar, 1.0)
    theta = planar.theta.detach().clone().requires_grad_()

    def inv(th):
        u_hat, w, b, m = _planar_params(th, 3)
        s = solve_tanh_equation((w * y.detach()).sum(-1) + b, m, torch.ones_like(m), torch.zeros_like(m))
        return y.detach() - u_hat * torch.tanh(s)[..., None]

    assert torch.autograd.gradcheck(inv, (theta,))


@pytest.mark.parametrize("make", [lambda: Planar(3, max_iter=1), lambda: Sylvester(3, max_iter=1)])
def test_numerical_inverse_failure_reports_the_residual(make):
    torch.manual_seed(0)
    layer = make()
    _randomize(layer, 3.0)
    with pytest.raises(ConvergenceError, match=r"did not converge in max_iter=1 .*residual reached"):
        layer._inverse(5 * torch.randn(20, 3))


@pytest.mark.parametrize("make,match", [
    (lambda: Sylvester(3, variant="cayley"), "variant"),
    (lambda: Sylvester(3, num_vectors=4), "num_vectors"),
    (lambda: Sylvester(3, variant="householder", num_vectors=2), "num_vectors"),
    (lambda: Sylvester(3, variant="householder", num_reflections=0), "num_reflections"),
    (lambda: Planar(0), "input_dim"),
    (lambda: Radial(2.5), "input_dim"),
    (lambda: ConditionalPlanar(3, 0), "input_dim"),
])
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("cls", [ConditionalPlanar, ConditionalRadial, ConditionalSylvester])
def test_conditional_layers_start_at_their_unconditional_twin_and_depend_on_context(cls):
    torch.manual_seed(0)
    layer = cls(3, 2)
    x = torch.randn(5, 3)
    a, b = layer.condition(torch.zeros(2))._call(x), layer.condition(torch.ones(2))._call(x)
    assert torch.allclose(a, b)  # zero-initialised context network
    _randomize(layer.net, 0.5)
    a, b = layer.condition(torch.zeros(2))._call(x), layer.condition(torch.ones(2))._call(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name,kw", [
    ("planar", {}), ("radial", {}), ("sylvester", {}), ("sylvester", {"variant": "triangular"}),
    ("sylvester", {"variant": "householder"}),
])
def test_named_flows_fit_a_correlated_gaussian(name, kw):
    """A few SGD steps of maximum likelihood lower the NLL, unconditionally and with a context."""
    torch.manual_seed(0)
    data = torch.randn(256, 2) @ torch.tensor([[1.0, 0.0], [0.9, 0.4]]) + 1.0
    for context_dim in (None, 3):
        flow = getattr(flows, name)(2, context_dim=context_dim, **kw)
        ctx = torch.randn(256, 3) if context_dim else None
        opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
        before = -flow.log_prob(data, ctx).mean().item()
        for _ in range(40):
            opt.zero_grad()
            loss = -flow.log_prob(data, ctx).mean()
            loss.backward()
            opt.step()
        assert loss.item() < before - 0.2, (name, context_dim, before, loss.item())
