"""The families added for Pyro parity: NAF, BNAF, sum-of-squares polynomial, matrix exponential.

The shared harness (``test_exactness.py``) already checks their log-determinants,
round trips, shapes, densities and SVI use; here: monotonicity, the root-finders'
accuracy far out, the conditional twins' use of the context, and equivalence
with Pyro's own layers given the same parameters.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as PT
import pytest
import torch

import pyroflows.transforms as T
from pyroflows.transforms.transformers import DeepSigmoid, SumOfSquaresPolynomial

ACTIVATIONS = ["sigmoid", "tanh", "ELU", "LeakyReLU"]
TRANSFORMERS = [DeepSigmoid(4, a) for a in ACTIVATIONS] + [SumOfSquaresPolynomial(), SumOfSquaresPolynomial(1, 2)]
IDS = [repr(t) for t in TRANSFORMERS]


def _params(transformer, dim, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(dim, transformer.num_params, generator=g, dtype=torch.float64)
    return transformer.identity_params().double() + scale * noise


def _far_grid(dim):
    """Each column: -50 .. 50 including far-out points (every dimension sees every value)."""
    x = torch.cat([torch.linspace(-50, 50, 41), torch.tensor([-1e-3, 0.0, 1e-3])]).double()
    return x[:, None].expand(-1, dim).contiguous()


@pytest.mark.parametrize("transformer", TRANSFORMERS, ids=IDS)
def test_transformer_is_strictly_increasing_and_its_log_derivative_exact(transformer):
    p = _params(transformer, 3, 1.0)
    x = torch.linspace(-8, 8, 401, dtype=torch.float64)[:, None].expand(-1, 3).contiguous().requires_grad_()
    y, log_d = transformer.forward(x, p)
    assert (y.diff(dim=0) > 0).all()
    grad = torch.autograd.grad(y.sum(), x)[0]
    assert torch.allclose(log_d, grad.log(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("transformer", TRANSFORMERS, ids=IDS)
@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_transformer_inverse_is_accurate_far_out(transformer, scale):
    p = _params(transformer, 3, scale, seed=1)
    x = _far_grid(3)
    y, log_d = transformer.forward(x, p)
    assert torch.isfinite(y).all() and torch.isfinite(log_d).all()
    x_back, log_d_back = transformer.inverse(y, p)
    assert ((x_back - x).abs() / (1 + x.abs())).max() <= 1e-6
    assert (log_d_back - log_d).abs().max() <= 1e-6


@pytest.mark.parametrize("transformer", TRANSFORMERS, ids=IDS)
def test_transformer_identity_params(transformer):
    x = _far_grid(2)
    y, log_d = transformer.forward(x, transformer.identity_params().double())
    assert torch.allclose(y, x, rtol=1e-6, atol=1e-6) and log_d.abs().max() < 1e-6


def test_sum_of_squares_identity_has_distinct_squares():
    """A symmetric start (equal squares) would stay symmetric under gradient steps."""
    a = SumOfSquaresPolynomial(4, 3).identity_params()[:-1].reshape(3, 5)[:, 0]
    assert len(set(a.tolist())) == 3


# --- layers ------------------------------------------------------------------------

def _perturbed(layer, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


LAYERS = {
    "naf": lambda: T.neural_autoregressive(3, [7], width=4),
    "naf-tanh": lambda: T.neural_autoregressive(3, [7], activation="tanh", width=4),
    "polynomial": lambda: T.polynomial(3, [9], count_degree=2, count_sum=2),
    "bnaf-normal": lambda: T.block_autoregressive(3, hidden_factors=[2, 2], residual="normal"),
    "bnaf-gated-elu": lambda: T.block_autoregressive(3, hidden_factors=[2], activation="ELU", residual="gated"),
    "bnaf-leaky": lambda: T.block_autoregressive(3, hidden_factors=[3], activation="LeakyReLU"),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip_far_out(name):
    """Far out in the base, not so far that the conditioner's outputs make the map flat to
    machine precision (a ReLU MADE fed x = -50 can give a NAF whose y_2 changes by less than
    1e-15 over x_2 in [19, 76]: no inverse can recover x_2 there)."""
    torch.manual_seed(0)
    layer = _perturbed(LAYERS[name]().double(), scale=0.1)
    x = torch.tensor([[12.0, -10.0, 8.0], [-12.0, 9.0, -11.0], [0.5, -0.2, 3.0]], dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    x_back, ladj_back = layer._inverse_and_ladj(y)
    assert ((x_back - x).abs() / (1 + x.abs())).max() <= 1e-6
    assert (ladj_back - ladj).abs().max() <= 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_block_autoregressive_is_triangular_and_increasing(activation):
    torch.manual_seed(0)
    layer = T.block_autoregressive(3, hidden_factors=[2, 3], activation=activation).double()
    x = torch.randn(3, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(layer._call, x)
    assert torch.equal(J.triu(1), torch.zeros_like(J))
    assert (J.diagonal() > 0).all()


def test_block_autoregressive_outside_its_image_has_zero_density():
    """Without a residual, tanh bounds the image; a point outside it gets density 0, not garbage."""
    torch.manual_seed(0)
    layer = T.block_autoregressive(2, hidden_factors=[2]).double()
    y = layer._call(torch.tensor([[1e3, 0.0], [-1e3, 0.0]], dtype=torch.float64))
    outside = torch.stack([y[0] + torch.tensor([1.0, 0.0], dtype=torch.float64),
                           y[1] - torch.tensor([1.0, 0.0], dtype=torch.float64)])
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [layer])
    assert (d.log_prob(outside).exp() == 0).all()


# --- conditional twins use the context --------------------------------------------

@pytest.mark.parametrize("helper", ["conditional_neural_autoregressive", "conditional_matrix_exponential"])
def test_conditional_twin_responds_to_context(helper):
    torch.manual_seed(0)
    layer = _perturbed(getattr(T, helper)(3, 2, [8]).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    c1, c2 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y1, y2 = layer.condition(c1)(x), layer.condition(c2)(x)
    assert (y1 - y2).abs().max() > 1e-3
    # and each context's map is inverted exactly
    assert (layer.condition(c2)._inverse(y2) - x).abs().max() < 1e-6


# --- the same map as Pyro's, given the same parameters -----------------------------

def test_matrix_exponential_matches_pyro():
    torch.manual_seed(0)
    ours = T.matrix_exponential(4).double()
    theirs = PT.MatrixExponential(4, iterations=30).double()
    with torch.no_grad():
        theirs.weights.copy_(ours.weights)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = ours(x)
    assert torch.allclose(y, theirs(x), atol=1e-10)
    assert torch.allclose(ours.log_abs_det_jacobian(x, y), theirs.log_abs_det_jacobian(x, y).expand(5))
    assert torch.allclose(ours._inverse(y), theirs._inverse(y), atol=1e-10)


def test_matrix_exponential_normalization_caps_the_norm():
    layer = T.matrix_exponential(3, normalization="spectral", bound=0.5)
    with torch.no_grad():
        layer.weights.mul_(100)
    assert torch.linalg.matrix_norm(layer.matrix(), ord=2) <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="bound"):
        T.matrix_exponential(3, normalization="weight")
    with pytest.raises(ValueError, match="normalization"):
        T.matrix_exponential(3, normalization="batch")


class _Net(torch.nn.Module):
    """Pyro's layers take their autoregressive network as a module: ours, re-laid out."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_neural_autoregressive_matches_pyro(activation):
    torch.manual_seed(0)
    width = 5
    ours = _perturbed(T.neural_autoregressive(3, [7], activation=activation, width=width).double())

    def arn(x):  # Pyro's AutoRegressiveNN layout: (A, W_pre, b), each (..., width, D)
        return tuple(p.transpose(-1, -2) for p in ours._params(x, None).split(width, dim=-1))

    theirs = PT.NeuralAutoregressive(_Net(arn), hidden_units=width, activation=activation)
    x = torch.randn(6, 3, dtype=torch.float64)
    y, ladj = ours.call_and_ladj(x)
    y_pyro = theirs(x)
    assert torch.allclose(y, y_pyro, atol=1e-9)
    assert torch.allclose(ladj, theirs.log_abs_det_jacobian(x, y_pyro), atol=1e-6)  # Pyro adds 1e-8 to a


def test_polynomial_matches_pyro_up_to_the_epsilon_slope():
    torch.manual_seed(0)
    from pyroflows.transforms.transformers import MIN_DERIVATIVE

    ours = _perturbed(T.polynomial(3, [9], count_degree=2, count_sum=2).double())
    # Pyro's network output: (..., (R+1)K, D), its coefficients unscaled (ours are theta_kr / r!)
    taylor = ours.transformer._taylor.repeat(2)

    def coefficients(x):
        return (ours._params(x, None)[..., :-1] * taylor).transpose(-1, -2)

    theirs = PT.Polynomial(_Net(coefficients), input_dim=3, count_degree=2, count_sum=2).double()
    for row in torch.randn(4, 3, dtype=torch.float64):
        x = row[None]
        with torch.no_grad():  # Pyro's shift c is a free parameter, ours an output of the MADE
            theirs.c.copy_(ours._params(x, None)[0, :, -1])
        y, ladj = ours.call_and_ladj(x)
        y_pyro = theirs(x)
        assert torch.allclose(y, y_pyro + MIN_DERIVATIVE * x, atol=1e-9)
        slope_pyro = theirs.log_abs_det_jacobian(x, y_pyro)  # log(sum of squares + 1e-8), summed
        slopes = ours.transformer.forward(x, ours._params(x, None))[1].exp() - MIN_DERIVATIVE
        assert torch.allclose(slopes.log().sum(-1), slope_pyro, atol=1e-6)


def test_block_autoregressive_matches_pyro():
    torch.manual_seed(0)
    ours = T.block_autoregressive(3, hidden_factors=[2, 3], residual="gated").double()
    theirs = PT.BlockAutoregressive(3, hidden_factors=[2, 3], residual="gated").double()
    with torch.no_grad():
        for a, b in zip(ours.layers, theirs.layers):
            b._weight.copy_(a.raw_weight)
            b._diag_weight.copy_(a.log_scale)
            b.bias.copy_(a.bias)
        theirs.gate.copy_(ours.gate)
    x = torch.randn(6, 3, dtype=torch.float64)
    y, ladj = ours.call_and_ladj(x)
    y_pyro = theirs(x)
    assert torch.allclose(y, y_pyro, atol=1e-6)  # Pyro adds 1e-8 to the row norms
    assert torch.allclose(ladj, theirs.log_abs_det_jacobian(x, y_pyro), atol=1e-6)


def test_helpers_have_pyros_signatures():
    import inspect

    for name in ["neural_autoregressive", "conditional_neural_autoregressive", "polynomial",
                 "matrix_exponential", "conditional_matrix_exponential"]:
        ours = inspect.signature(getattr(T, name)).parameters
        theirs = inspect.signature(getattr(PT, name)).parameters
        pyro_part = [(p.name, p.default) for p in ours.values() if p.kind != p.KEYWORD_ONLY]
        assert pyro_part == [(p.name, p.default) for p in theirs.values()], name
    # Pyro's block_autoregressive(input_dim, **kwargs) forwards to the class
    ours = inspect.signature(T.block_autoregressive).parameters
    theirs = inspect.signature(PT.BlockAutoregressive).parameters
    assert [(n, p.default) for n, p in ours.items()] == [
        (n, tuple(p.default) if isinstance(p.default, list) else p.default) for n, p in theirs.items()]
