"""Residual flows: memory-saving backprop, estimators, fixed points, constraints, training."""

from __future__ import annotations

import pytest
import torch
from harness import perturb_parameters

from pyroflows import flows
from pyroflows.nn import LipschitzMLP, SpectralLinear
from pyroflows.transforms import ConvergenceError, InvertibleResidual, ReversibleResidual


pytestmark = pytest.mark.usefixtures("default_float64")


# ----------------------------------------------------------------------------
# ReversibleResidual
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_memory_saving_gradients_equal_ordinary_backprop(direction):
    torch.manual_seed(0)
    layer = ReversibleResidual(5, num_blocks=4, hidden_dims=(16,))
    perturb_parameters(layer, 0.3)
    x = torch.randn(32, 5)

    def grads(memory_saving):
        layer.memory_saving = memory_saving
        xi = x.clone().requires_grad_()
        out, _ = layer._call_and_ladj(xi) if direction == "forward" else layer._inverse_and_ladj(xi)
        loss = (out.sin() * torch.arange(5.0)).sum()
        layer.zero_grad()
        loss.backward()
        return [xi.grad] + [p.grad.clone() for p in layer.parameters()]

    ordinary, saving = grads(False), grads(True)
    for a, b in zip(ordinary, saving):
        assert (a - b).abs().max() <= 1e-6 * (1 + a.abs().max())


def test_memory_saving_stores_no_activations_inside_the_stack():
    """Bytes the forward pass saves for backward (parameters excluded) do not grow with depth.

    (The backward pass then holds one block's recomputed graph at a time.)"""
    def saved_bytes(depth, memory_saving):
        torch.manual_seed(0)
        layer = ReversibleResidual(8, num_blocks=depth, hidden_dims=(32,), memory_saving=memory_saving)
        params = {p.data_ptr() for p in layer.parameters()}
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        x = torch.randn(64, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer._call_and_ladj(x)[0]
        y.sum().backward()
        return sum(seen.values())

    assert saved_bytes(16, True) == saved_bytes(2, True)
    assert saved_bytes(16, False) > 6 * saved_bytes(2, False)


def test_reversible_residual_invalid_arguments():
    with pytest.raises(ValueError, match="input_dim >= 2"):
        ReversibleResidual(1)
    with pytest.raises(ValueError, match="num_blocks"):
        ReversibleResidual(4, num_blocks=0)


# ----------------------------------------------------------------------------
# spectral normalisation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.3, 10.0])
def test_spectral_linear_bound_holds_for_any_weights(scale):
    torch.manual_seed(0)
    lin = SpectralLinear(7, 5, coeff=0.8)
    perturb_parameters(lin, scale)
    norm = torch.linalg.matrix_norm(lin.normalized_weight().detach(), 2)
    assert norm <= 0.8 * (1 + 1e-8)
    with torch.no_grad():
        lin.weight.mul_(1e-3)  # small weights are left alone (max(1, sigma/c))
    assert torch.allclose(lin.normalized_weight(), lin.weight)


def test_lipschitz_mlp_is_contractive():
    torch.manual_seed(0)
    g = LipschitzMLP(3, 3, (16, 16), coeff=0.9)
    perturb_parameters(g, 3.0)
    x, y = torch.randn(500, 3), torch.randn(500, 3)
    ratio = (g(x) - g(y)).norm(dim=-1) / (x - y).norm(dim=-1)
    assert ratio.max() < 0.9 ** 3 + 1e-8


def test_spectral_linear_rejects_bad_coeff():
    with pytest.raises(ValueError, match="coeff"):
        SpectralLinear(3, 3, coeff=0.0)


# ----------------------------------------------------------------------------
# InvertibleResidual: errors
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"coeff": 1.0}, "coeff"),
    ({"coeff": -0.5}, "coeff"),
    ({"log_det": "magic"}, "log_det"),
    ({"cheap": "both"}, "cheap"),
    ({"geom_p": 1.0}, "geom_p"),
    ({"tol": 0.0}, "tol"),
    ({"n_terms": 0}, "n_terms"),
])
def test_invertible_residual_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        InvertibleResidual(3, **kw)


@pytest.mark.parametrize("cheap", ["forward", "inverse"])
def test_fixed_point_failure_reports_the_residual(cheap):
    torch.manual_seed(0)
    layer = InvertibleResidual(3, coeff=0.95, cheap=cheap, max_iter=2)
    perturb_parameters(layer, 1.0)
    solve = layer._inverse_and_ladj if cheap == "forward" else layer._call_and_ladj
    with pytest.raises(ConvergenceError, match=r"did not converge in max_iter=2 .*residual reached \d"):
        solve(torch.randn(10, 3))


# ----------------------------------------------------------------------------
# InvertibleResidual: inverse and implicit gradients
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("cheap", ["forward", "inverse"])
def test_fixed_point_inverse_and_its_gradient(cheap):
    torch.manual_seed(0)
    layer = InvertibleResidual(3, hidden_dims=(8,), coeff=0.9, cheap=cheap)
    perturb_parameters(layer, 0.5)
    solve = layer._inverse_and_ladj if cheap == "forward" else layer._call_and_ladj
    explicit = layer._call_and_ladj if cheap == "forward" else layer._inverse_and_ladj
    v = torch.randn(4, 3)
    u = solve(v)[0]
    assert (explicit(u)[0] - v).abs().max() < 1e-10
    # input gradient: gradcheck against finite differences
    assert torch.autograd.gradcheck(lambda t: solve(t)[0], (v.clone().requires_grad_(),))
    # parameter gradient: the implicit-function value (I + J)^{-1} (-dg/dtheta)
    w = layer.g[0].weight
    def loss():
        return (solve(v)[0] ** 2).sum()
    (grad,) = torch.autograd.grad(loss(), w)
    e = torch.zeros_like(w)
    e[0, 1] = 1e-6
    with torch.no_grad():
        w.add_(e)
        up = loss()
        w.sub_(2 * e)
        down = loss()
        w.add_(e)
    assert abs((up - down).item() / 2e-6 - grad[0, 1].item()) < 1e-6


# ----------------------------------------------------------------------------
# log-det estimators
# ----------------------------------------------------------------------------
def _linear_case(seed=1, coeff=0.9):
    """g(x) = W x + b with ||W|| = coeff: the series terms tr(W^k) are known exactly."""
    torch.manual_seed(seed)
    layer = InvertibleResidual(4, hidden_dims=(), coeff=coeff, cheap="forward", log_det="exact")
    W = layer.g[0].normalized_weight().detach()
    exact = torch.linalg.slogdet(torch.eye(4) + W)[1]
    return layer, W, exact


def _estimates(layer, n=20000):
    x = torch.randn(4).expand(n, 4)  # every row an independent estimate
    with torch.no_grad():
        e = layer._call_and_ladj(x)[1]
    return e.mean(), e.std() / n ** 0.5


def test_power_series_bias_is_the_truncation_error():
    """Measured (seed 1, D=4, ||W||=0.9): bias +0.128 (1 term), -0.057 (2), +0.002 (5), -2.5e-5 (10)."""
    layer, W, exact = _linear_case()
    layer.log_det = "series"
    assert not layer.exact_log_det
    for n_terms in (1, 2):
        layer.n_terms = n_terms
        truncated = sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(W, k))
                        for k in range(1, n_terms + 1))
        mean, se = _estimates(layer)
        assert abs(mean - truncated) <= 4 * se  # unbiased for the truncated series...
        assert abs(mean - exact) > 4 * se  # ...which is a biased estimate of the log-det
    assert abs(truncated - exact) > 0.05


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_russian_roulette_is_unbiased(seed):
    layer, _, exact = _linear_case(seed)
    layer.log_det = "roulette"
    mean, se = _estimates(layer)
    assert abs(mean - exact) <= 4 * se


def test_russian_roulette_default_dims_and_flag():
    assert InvertibleResidual(3).log_det == "exact" and InvertibleResidual(3).exact_log_det
    layer = InvertibleResidual(4)
    assert layer.log_det == "roulette" and not layer.exact_log_det


@pytest.mark.parametrize("seed", [1, 2])
def test_neumann_gradient_is_unbiased(seed):
    """The mean gradient of many roulette estimates matches the gradient of the exact log-det
    (20 groups of 1000 estimates; every weight's z-score within 5), while the truncated
    series' gradient is visibly biased in the same check."""
    layer, _, _ = _linear_case(seed)
    x = torch.randn(4)
    w = layer.g[0].weight

    def grad_of(out):
        return torch.autograd.grad(out, w)[0].reshape(-1)

    exact = grad_of(layer._call_and_ladj(x)[1])

    def z_scores():
        groups = torch.stack([grad_of(layer._call_and_ladj(x.expand(1000, 4))[1].mean()) for _ in range(20)])
        return (groups.mean(0) - exact) / (groups.std(0) / 20 ** 0.5)

    layer.log_det = "roulette"
    assert z_scores().abs().max() <= 5
    layer.log_det, layer.n_terms = "series", 2
    assert z_scores().abs().max() > 20


def test_series_gradient_flows():
    torch.manual_seed(0)
    layer = InvertibleResidual(4, hidden_dims=(8,), log_det="series")
    ld = layer._call_and_ladj(torch.randn(5, 4))[1].sum()
    grads = torch.autograd.grad(ld, list(layer.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------
# named architectures train on a 2-D toy problem
# ----------------------------------------------------------------------------
def _ring(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = 2 * torch.pi * torch.rand(n, generator=g)
    return torch.stack([a.cos(), a.sin()], -1) * 2 + 0.2 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("name,kw", [
    ("iresnet", {}),
    ("residual_flow", {}),
    ("iresnet", {"log_det": "exact"}),
])
def test_architectures_train_on_2d_toy(name, kw):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    flow = getattr(flows, name)(2, num_blocks=2, hidden_dims=(32, 32), **kw)
    data = _ring(512)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    layers = list(flow.transforms)

    def exact_nll():
        methods = [t.log_det for t in layers]
        for t in layers:
            t.log_det = "exact"
        with torch.no_grad():
            nll = -flow.log_prob(data).mean().item()
        for t, m in zip(layers, methods):
            t.log_det = m
        return nll

    before = exact_nll()
    for _ in range(60):
        opt.zero_grad()
        (-flow.log_prob(data).mean()).backward()
        opt.step()
    after = exact_nll()
    assert after < before - 0.3, (before, after)
    flow.sample((5,))  # the fixed-point direction works on the trained flow


def test_no_conditional_residual_flows():
    with pytest.raises(ValueError, match="conditional"):
        flows.iresnet(2, context_dim=3)
