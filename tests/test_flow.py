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
