"""AutoFlow's fused affine stage: exact log-det, round trip, and the same map as the layers it fuses."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

import pyroflows
from pyroflows.infer.guide_affine import GuideAffine


def _layer(linear: bool, whiten: bool, dim: int = 4) -> GuideAffine:
    torch.manual_seed(0)
    layer = GuideAffine(dim, linear=linear).double()
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
    if whiten:
        a = torch.randn(dim, dim, dtype=torch.float64)
        layer.set_whitening(torch.randn(dim, dtype=torch.float64), torch.linalg.cholesky(a @ a.T + torch.eye(dim)))
    return layer


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("whiten", [True, False])
def test_log_det_matches_the_jacobian_and_the_inverse_round_trips(linear, whiten):
    layer = _layer(linear, whiten)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x, cache=False)
    assert ladj.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            jac = jacobian(lambda v: layer.call_and_ladj(v, cache=False)[0], x[i, j])
            assert torch.allclose(ladj[i, j], torch.linalg.slogdet(jac)[1], atol=1e-10)
    x_back, ladj_back = layer.inverse_and_ladj(y, cache=False)
    assert torch.allclose(x_back, x, atol=1e-10) and torch.allclose(ladj_back, ladj, atol=1e-10)


def test_is_the_triangular_then_elementwise_then_whitening_composition():
    layer = _layer(True, True)
    tri = pyroflows.transforms.linear.Triangular(4).double()
    ew = pyroflows.transforms.elementwise(4, kind=layer.transformer).double()
    with torch.no_grad():
        tri.weight.copy_(layer.linear_weight)
        ew.params.copy_(layer.params)
    x = torch.randn(5, 4, dtype=torch.float64)
    u, l1 = tri.call_and_ladj(x)
    v, l2 = ew.call_and_ladj(u)
    y = layer.whiten_loc + v @ layer.whiten_tril.T
    l3 = layer.whiten_tril.diagonal().log().sum()
    out, ladj = layer.call_and_ladj(x)
    assert torch.allclose(out, y, atol=1e-12) and torch.allclose(ladj, l1 + l2 + l3, atol=1e-12)


def test_starts_at_the_identity_and_rejects_a_bad_whitening():
    layer = GuideAffine(3)
    x = torch.randn(6, 3)
    y, ladj = layer.call_and_ladj(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6))
    with pytest.raises(ValueError, match="positive diagonal"):
        layer.set_whitening(torch.zeros(3), -torch.eye(3))
    with pytest.raises(ValueError, match="scale_tril"):
        layer.set_whitening(torch.zeros(2), torch.eye(2))


def test_state_dict_round_trip_keeps_the_whitening():
    layer = _layer(True, True)
    fresh = GuideAffine(4).double()
    fresh.set_whitening(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(fresh(x), layer(x))


def test_triangular_loads_the_three_tensor_state_dict_of_earlier_versions():
    old = {"lower": torch.tensor([[9.0, 9.0], [0.5, 9.0]]), "log_diag": torch.tensor([0.1, -0.2]),
           "bias": torch.tensor([1.0, 2.0])}
    layer = pyroflows.transforms.linear.Triangular(2)
    layer.load_state_dict(old)
    expected = torch.tensor([[0.1, 0.0], [0.5, -0.2]]).diagonal().exp().diag() + torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    assert torch.allclose(layer.matrix(), expected) and torch.equal(layer.bias, old["bias"])
    assert list(layer.state_dict()) == ["weight"]
