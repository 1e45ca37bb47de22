"""Coupling layers and permutations (the generic checks are in test_exactness.py)."""

from __future__ import annotations

import pytest
import torch
from harness import perturb_parameters
from torch.autograd.functional import jacobian

import pyroflows.transforms as T
from pyroflows.nn import MLP
from pyroflows.transforms.coupling import build_coupling, half_mask
from pyroflows.transforms.transformers import KINDS, make_transformer


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_starts_at_identity(kind):
    layer = T.spline_coupling(5, kind=kind, hidden_dims=(8,))
    x = torch.randn(7, 5)
    y, ladj = layer._call_and_ladj(x)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(ladj, torch.zeros(7), atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_masked_half_passes_unchanged_and_one_conditioner_pass(flip):
    layer = perturb_parameters(T.affine_coupling(5, hidden_dims=(8,), mask=half_mask(5, flip))).double()
    calls = _count_calls(layer.conditioner)
    x = torch.randn(4, 5, dtype=torch.float64)
    y, _ = layer._call_and_ladj(x)
    assert len(calls) == 1
    mask = half_mask(5, flip)
    assert torch.equal(y[..., mask], x[..., mask])
    assert not torch.allclose(y[..., ~mask], x[..., ~mask])
    x_back, _ = layer._inverse_and_ladj(y)
    assert len(calls) == 2
    assert torch.allclose(x_back, x, atol=1e-10)


@pytest.mark.parametrize("identity", [True, False])
def test_any_mask_works(identity):
    mask = torch.tensor([True, False, False, True, False, True])
    layer = perturb_parameters(T.spline_coupling(6, kind="piecewise_linear", hidden_dims=(8,), mask=mask,
                                                 identity=identity)).double()
    x = torch.randn(6, dtype=torch.float64)
    y, ladj = layer._call_and_ladj(x)
    assert torch.equal(y[mask], x[mask]) == identity  # Pyro's default: the conditioning half has its own spline
    J = jacobian(lambda v: layer._call_and_ladj(v)[0], x)
    assert torch.allclose(ladj, torch.linalg.slogdet(J)[1], atol=1e-8)
    assert torch.allclose(layer._inverse_and_ladj(y)[0], x, atol=1e-10)


def test_generic_layer_with_custom_conditioner():
    transformer = make_transformer("affine")
    mask = half_mask(4)
    layer = T.Coupling(transformer, MLP(2, 2 * 2, hidden=(8,), zero_init=False), mask).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ladj = layer._call_and_ladj(x)
    x_back, ladj_inv = layer._inverse_and_ladj(y)
    assert torch.allclose(x_back, x, atol=1e-10) and torch.allclose(ladj, ladj_inv, atol=1e-10)


@pytest.mark.parametrize("helper", [T.affine_coupling, T.additive_coupling, T.spline_coupling])
def test_one_dimension_is_rejected(helper):
    with pytest.raises(ValueError, match="input_dim >= 2"):
        helper(1)


def test_bad_masks_are_rejected():
    with pytest.raises(ValueError, match="mask"):
        T.affine_coupling(3, mask=[True, True, True])
    with pytest.raises(ValueError, match="mask"):
        T.affine_coupling(3, mask=[True, False])


def test_conditional_output_depends_on_context():
    layer = perturb_parameters(T.conditional_affine_coupling(4, 2, hidden_dims=(8,))).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    c1, c2 = torch.randn(2, 2, dtype=torch.float64)
    y1, l1 = layer._call_and_ladj(x, c1)
    y2, l2 = layer._call_and_ladj(x, c2)
    assert not torch.allclose(y1, y2) and not torch.allclose(l1, l2)
    assert torch.allclose(layer._inverse_and_ladj(y1, c1)[0], x, atol=1e-10)


KINDS_LARGE = sorted(KINDS)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("kind", KINDS_LARGE)
def test_large_inputs_give_finite_values_and_gradients(kind, conditional):
    layer = (T.conditional_spline_coupling(4, 2, kind=kind, hidden_dims=(8,)) if conditional
             else T.spline_coupling(4, kind=kind, hidden_dims=(8,)))
    perturb_parameters(layer)
    assert_finite_both_ways(layer, [[1e3, -1e3, 1e3, -1e3], [-1e3, 1e3, 0.5, -0.5]], conditional)


def assert_finite_both_ways(layer, rows, conditional):
    """Inputs far outside the spline bound: finite outputs, log-dets and gradients in both directions."""
    x = torch.tensor(rows, requires_grad=True)
    args = (x, torch.full((2,), 1e3)) if conditional else (x,)
    for direction in (layer._call_and_ladj, layer._inverse_and_ladj):
        y, ladj = direction(*args)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        (g,) = torch.autograd.grad(y.sum() + ladj.sum(), x)
        assert torch.isfinite(g).all()


# permutations -------------------------------------------------------------------------

def test_permutation_round_trip_and_zero_log_det():
    torch.manual_seed(2)
    layer = T.permute(5)
    x = torch.randn(3, 5)
    y, ladj = layer._call_and_ladj(x)
    assert torch.equal(y, x[..., layer.permutation])
    assert torch.equal(ladj, torch.zeros(3))
    assert torch.equal(layer._inverse_and_ladj(y)[0], x)
    torch.manual_seed(2)
    assert torch.equal(T.permute(5).permutation, layer.permutation)  # torch's generator reproduces it
    assert torch.equal(T.reverse(4)._call_and_ladj(torch.arange(4.0))[0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(T.permute(3, permutation=[2, 0, 1])._call_and_ladj(torch.tensor([0.0, 1, 2]))[0],
                       torch.tensor([2.0, 0, 1]))


@pytest.mark.parametrize("perm", [[0, 0, 1], [1, 2, 3], []])
def test_bad_permutation_raises(perm):
    with pytest.raises(ValueError, match="permutation"):
        T.Permutation(perm)
    with pytest.raises(ValueError):
        T.permute(3, permutation=perm[:2])


def test_spline_coupling_is_pyros_with_a_spline_on_the_conditioning_half():
    """Pyro's SplineCoupling transforms x_a by an unconditional spline; the conditioner sees x_a
    (not y_a) in both directions, and the round trip and log-determinant stay exact."""
    layer = T.spline_coupling(3, 1, hidden_dims=(8,))
    assert layer.kept_params is not None and layer.kept_params.shape == (1, layer.transformer.num_params)
    assert sum(p.numel() for p in layer.parameters()) == (
        sum(p.numel() for p in layer.conditioner.parameters()) + layer.kept_params.numel())
    layer = perturb_parameters(layer).double()
    calls = _count_calls(layer.conditioner)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, ladj = layer._call_and_ladj(x)
    assert not torch.allclose(y[:, :1], x[:, :1])
    x_back, ladj_inv = layer._inverse_and_ladj(y)
    assert len(calls) == 2
    assert torch.allclose(x_back, x, atol=1e-10) and torch.allclose(ladj, ladj_inv, atol=1e-10)
    for row in range(5):
        J = jacobian(lambda v: layer._call_and_ladj(v)[0], x[row])
        assert torch.allclose(ladj[row], torch.linalg.slogdet(J)[1], atol=1e-8)
    with pytest.raises(ValueError, match="unconditional"):
        build_coupling(3, "rq_spline", 8, 3.0, (8,), half_mask(3), context_dim=2, identity=False)
