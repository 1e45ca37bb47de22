"""MAF / IAF layers: one-pass and sequential directions, exactness, call counts."""

from __future__ import annotations

import pytest
import torch
from harness import perturb_parameters
from test_coupling import KINDS_LARGE, _count_calls, assert_finite_both_ways

import pyroflows.transforms as T
from pyroflows import Flow
from pyroflows.transforms.transformers import KINDS

LAYERS = {"maf": T.masked_autoregressive, "iaf": T.inverse_autoregressive}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_sample_then_score_is_consistent(name, kind):
    """log_prob(x) = log p0(z) - log|det J| for x = f(z), scored from scratch (no cache)."""
    layer = perturb_parameters(LAYERS[name](5, kind=kind, hidden_dims=(16,), permutation="random")).double()
    flow = Flow([layer]).double()
    z = torch.randn(64, 5, dtype=torch.float64)
    x, ladj = layer._call_and_ladj(z)
    base = flow.base_distribution().log_prob(z)
    score = flow.log_prob(x.clone())  # a new tensor: the cache cannot answer, the inverse really runs
    assert torch.allclose(score, base - ladj, atol=1e-8)
    assert torch.allclose(layer._inverse_and_ladj(x)[0], z, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_made_passes(name):
    D = 4
    layer = perturb_parameters(LAYERS[name](D, hidden_dims=(8,)))
    calls = _count_calls(layer.made)
    z = torch.randn(3, D)
    x, _ = layer._call_and_ladj(z)
    assert len(calls) == (D if name == "maf" else 1)
    calls.clear()
    layer._inverse_and_ladj(x)
    assert len(calls) == (1 if name == "maf" else D)


def test_iaf_log_prob_of_its_own_samples_is_free():
    D = 4
    flow = Flow([perturb_parameters(T.inverse_autoregressive(D, hidden_dims=(8,))) for _ in range(3)])
    calls = [_count_calls(layer.made) for layer in flow.transforms]
    d = flow()
    x = d.rsample((10,))
    lp = d.log_prob(x)
    assert [len(c) for c in calls] == [1, 1, 1], "scoring the flow's own sample ran the sequential inverse"
    assert torch.isfinite(lp).all()
    lp.mean().backward()  # the cached graph is intact
    # scoring a fresh copy runs the sequential inverse and agrees
    lp2 = d.log_prob(x.detach().clone())
    assert [len(c) for c in calls] == [1 + D] * 3
    assert torch.allclose(lp2, lp.detach(), atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_round_trip_after_training_far_out_float32(name):
    torch.manual_seed(0)
    D = 3
    layer = LAYERS[name](D, hidden_dims=(16, 16))
    flow = Flow([layer, T.reverse(D), LAYERS[name](D, hidden_dims=(16, 16))])
    data = torch.randn(256, D) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]]) + 1.0
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        (-flow.log_prob(data).mean()).backward()
        opt.step()
    x = 3.0 * torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]) * data.std(0) + data.mean(0)
    for t in flow.transforms:
        z, _ = t._inverse_and_ladj(x)
        assert (t._call_and_ladj(z)[0] - x).abs().max() < 1e-4
        x_back, _ = t._inverse_and_ladj(t._call_and_ladj(x)[0])
        assert (x_back - x).abs().max() < 1e-4


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("kind", KINDS_LARGE)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_large_inputs_give_finite_values_and_gradients(name, kind, conditional):
    if conditional:
        helper = {"maf": T.conditional_masked_autoregressive, "iaf": T.conditional_inverse_autoregressive}[name]
        layer = perturb_parameters(helper(3, 2, kind=kind, hidden_dims=(8,)))
    else:
        layer = perturb_parameters(LAYERS[name](3, kind=kind, hidden_dims=(8,)))
    assert_finite_both_ways(layer, [[1e3, -1e3, 1e3], [-1e3, 0.5, -0.5]], conditional)


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_conditional_output_depends_on_context_in_every_dimension(name):
    helper = {"maf": T.conditional_masked_autoregressive, "iaf": T.conditional_inverse_autoregressive}[name]
    layer = perturb_parameters(helper(3, 2, hidden_dims=(16,))).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    c1, c2 = torch.randn(2, 2, dtype=torch.float64)
    y1, y2 = layer._call_and_ladj(z, c1)[0], layer._call_and_ladj(z, c2)[0]
    assert ((y1 - y2).abs() > 1e-9).all()
    assert torch.allclose(layer._inverse_and_ladj(y1, c1)[0], z, atol=1e-8)


def test_made_and_transformer_must_agree():
    from pyroflows.nn import MADE
    from pyroflows.transforms.transformers import make_transformer
    with pytest.raises(ValueError, match="parameters"):
        T.MaskedAutoregressive(make_transformer("affine"), MADE(3, 1))
    with pytest.raises(ValueError, match="context_dim"):
        T.ConditionalMaskedAutoregressive(make_transformer("affine"), MADE(3, 2))


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_sequential_direction_by_dimension_equals_whole_passes(name, kind, conditional, monkeypatch):
    """Without gradients, large batches solve one dimension at a time (``MADE.solve``); the
    result, log-det included, is the one the D whole MADE passes give."""
    import pyroflows.transforms.autoregressive as AR
    if conditional:
        helper = {"maf": T.conditional_masked_autoregressive, "iaf": T.conditional_inverse_autoregressive}[name]
        layer = perturb_parameters(helper(4, 2, kind=kind, hidden_dims=(12, 9), permutation="random")).double()
        context = (torch.randn(3, 2, dtype=torch.float64),)
    else:
        layer = perturb_parameters(LAYERS[name](4, kind=kind, hidden_dims=(12, 9), permutation="random")).double()
        context = ()
    run = layer._call_and_ladj if name == "maf" else layer._inverse_and_ladj
    v = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(AR, "SOLVE_BY_DIMENSION_MIN_ROWS", 10**9)
        calls = _count_calls(layer.made)
        whole = run(v, *context)
        assert len(calls) == 4
        monkeypatch.setattr(AR, "SOLVE_BY_DIMENSION_MIN_ROWS", 1)
        calls.clear()
        by_dimension = run(v, *context)
        assert len(calls) == 0  # MADE.solve, not MADE.forward
    assert torch.allclose(by_dimension[0], whole[0], atol=1e-10)
    assert torch.allclose(by_dimension[1], whole[1], atol=1e-10)
