"""ActNorm and BatchNorm beyond the harness: data-dependent behaviour."""

from __future__ import annotations

import pytest
import torch

import pyroflows.transforms as T
from pyroflows import Flow


def _data(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64) \
        + torch.tensor([3.0, -1.0, 10.0], dtype=torch.float64)


def test_actnorm_initialises_on_the_first_normalizing_batch():
    layer = T.actnorm(3).double()
    assert not layer.initialized
    data = _data()
    z = layer.inv(data)
    assert layer.initialized
    assert torch.allclose(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(z.std(0, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-10)
    # a second batch does not re-initialise
    shift = layer.shift.detach().clone()
    layer.inv(_data(seed=1) + 5.0)
    assert torch.equal(layer.shift.detach(), shift)


def test_actnorm_initialisation_is_in_state_dict():
    layer = T.actnorm(3).double()
    Flow([layer]).log_prob(_data())  # the first log_prob initialises
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    fresh = T.actnorm(3).double()
    fresh.load_state_dict(state)
    assert fresh.initialized
    other = _data(seed=2) * 3.0
    assert torch.allclose(fresh.inv(other), layer.inv(other))  # no re-initialisation after loading


def test_actnorm_forward_first_only_marks_initialised():
    layer = T.actnorm(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(layer(x), x)  # identity at start
    assert layer.initialized
    assert torch.allclose(layer.inv(_data()), _data())  # no data-dependent initialisation any more


def test_actnorm_single_row_only_centres():
    layer = T.actnorm(3).double()
    row = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(layer.inv(row), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(layer.log_scale.detach(), torch.zeros(3, dtype=torch.float64))


def test_batchnorm_train_mode_uses_batch_statistics_and_updates_running_averages():
    layer = T.batchnorm(3, momentum=0.25).double()
    data = _data()
    layer.train()
    z = layer.inv(data)
    assert torch.allclose(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(z.std(0, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-4)  # epsilon
    expected_mean = 0.75 * torch.zeros(3, dtype=torch.float64) + 0.25 * data.mean(0)
    expected_var = 0.75 * torch.ones(3, dtype=torch.float64) + 0.25 * data.var(0)
    assert torch.allclose(layer.running_mean, expected_mean)
    assert torch.allclose(layer.running_var, expected_var)
    # log_prob in train mode reuses the batch log-det of the pass
    flow = Flow([layer]).double()
    lp = flow.log_prob(data)
    log_scale = 0.5 * torch.log(data.var(0, correction=0) + layer.epsilon) - layer.log_gamma
    base = torch.distributions.Normal(0.0, 1.0).log_prob(layer.inv(data)).sum(-1)
    assert torch.allclose(lp, base - log_scale.sum(), atol=1e-8)


def test_batchnorm_eval_mode_is_a_fixed_exact_affine_map():
    layer = T.batchnorm(3).double()
    layer.train()
    for seed in range(3):
        layer.inv(_data(seed=seed))
    layer.eval()
    running = layer.running_mean.clone(), layer.running_var.clone()
    data = _data(seed=9)
    z = layer.inv(data)
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(layer.running_var, running[1])
    # row-wise: one row gives the same answer as inside the batch
    assert torch.allclose(layer.inv(data[0]), z[0])
    assert torch.allclose(layer(z), data, atol=1e-10)
    expected = (data - layer.running_mean) / torch.sqrt(layer.running_var + layer.epsilon)
    assert torch.allclose(z, expected)


def test_batchnorm_train_mode_rejects_a_single_row():
    layer = T.batchnorm(2).train()
    with pytest.raises(ValueError, match="at least 2 rows"):
        layer.inv(torch.randn(1, 2))


@pytest.mark.parametrize("bad", [
    lambda: T.actnorm(0),
    lambda: T.ActNorm(3, eps=0.0),
    lambda: T.batchnorm(3, momentum=0.0),
    lambda: T.batchnorm(3, momentum=1.5),
    lambda: T.batchnorm(3, epsilon=-1.0),
    lambda: T.batchnorm("3"),
])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()
