"""The base class's two promises: a pass's log-det is reused, and the cache is never stale."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyroflows import Flow
from pyroflows.transforms.base import Bijector, ConditionalBijector


class CountingAffine(Bijector):
    """y = exp(s) * x + b, counting how often each direction runs."""

    def __init__(self, dim=3):
        super().__init__()
        self.event_shape = (dim,)
        self.s = nn.Parameter(0.1 * torch.randn(dim))
        self.b = nn.Parameter(0.1 * torch.randn(dim))
        self.calls = {"forward": 0, "inverse": 0}

    def _call_and_ladj(self, x):
        self.calls["forward"] += 1
        return x * self.s.exp() + self.b, self.s.sum().expand(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        self.calls["inverse"] += 1
        return (y - self.b) * (-self.s).exp(), self.s.sum().expand(y.shape[:-1])


class CountingConditionalShift(ConditionalBijector):
    def __init__(self, dim=3, context_dim=2):
        super().__init__()
        self.event_shape, self.context_dim = (dim,), context_dim
        self.net = nn.Linear(context_dim, dim)
        self.calls = 0

    def _call_and_ladj(self, x, context):
        self.calls += 1
        return x + self.net(context), x.new_zeros(torch.broadcast_shapes(x.shape[:-1], context.shape[:-1]))

    def _inverse_and_ladj(self, y, context):
        self.calls += 1
        return y - self.net(context), y.new_zeros(torch.broadcast_shapes(y.shape[:-1], context.shape[:-1]))


def _reference_log_prob(layer, x):
    """log p(x) computed by hand, without any cache."""
    with torch.no_grad():
        z = (x - layer.b) * (-layer.s).exp()
        return dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - layer.s.sum()


def test_log_prob_of_own_sample_runs_no_second_pass():
    layer = CountingAffine()
    flow = Flow([layer])
    d = flow()
    y = d.rsample((5,))
    lp = d.log_prob(y)
    assert layer.calls == {"forward": 1, "inverse": 0}
    assert torch.allclose(lp, _reference_log_prob(layer, y), atol=1e-5)


def test_conditional_log_prob_of_own_sample_runs_no_second_pass():
    layer = CountingConditionalShift()
    flow = Flow([layer])
    c = torch.randn(4, 2)
    d = flow(c)
    y = d.rsample()
    d.log_prob(y)
    assert layer.calls == 1


def test_plain_training_loop_on_the_same_tensor_needs_no_clear_cache():
    torch.manual_seed(0)
    layer = CountingAffine()
    flow = Flow([layer])
    x = torch.randn(64, 3) * 2 + 1
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = -flow.log_prob(x).mean()
        # the value reflects the current parameters, not a stale cached pass
        assert torch.allclose(-loss.detach(), _reference_log_prob(layer, x).mean(), atol=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.calls["inverse"] == 5


def test_scoring_under_no_grad_then_with_grad_gives_gradients():
    layer = CountingAffine()
    flow = Flow([layer])
    x = torch.randn(8, 3)
    with torch.no_grad():
        flow.log_prob(x)
    loss = -flow.log_prob(x).sum()
    loss.backward()
    assert layer.s.grad is not None and torch.isfinite(layer.s.grad).all()


def test_scoring_twice_without_a_step_can_backward_twice():
    layer = CountingAffine()
    flow = Flow([layer])
    x = torch.randn(8, 3)
    for _ in range(2):
        (-flow.log_prob(x).sum()).backward()
    assert layer.calls["inverse"] == 2


def test_forward_on_the_same_tensor_after_backward_recomputes():
    layer = CountingAffine()
    z = torch.randn(8, 3)
    (layer(z) ** 2).sum().backward()
    # the cached graph was consumed by backward: the second call must not hand it out
    (layer(z) ** 2).sum().backward()
    assert layer.calls["forward"] == 2


def test_forward_cache_hit_when_nothing_changed():
    layer = CountingAffine()
    z = torch.randn(8, 3)
    with torch.no_grad():
        y1 = layer(z)
        y2 = layer(z)
    assert y1 is y2 and layer.calls["forward"] == 1


def test_load_state_dict_invalidates_the_cache():
    layer = CountingAffine()
    x = torch.randn(8, 3)
    with torch.no_grad():
        layer.inv(x)
        state = {k: v + 1.0 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        layer.inv(x)
    assert layer.calls["inverse"] == 2


def test_cache_size_zero_disables_caching():
    layer = CountingAffine()
    layer.with_cache(0)
    flow = Flow([layer])
    d = flow()
    d.log_prob(d.rsample())
    # uncached: log_prob inverts, then re-runs forward for the log-det
    assert layer.calls == {"forward": 2, "inverse": 1}


def test_conditional_context_shape_is_checked():
    layer = CountingConditionalShift(context_dim=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        layer.condition(torch.randn(4, 3))


def test_cache_follows_dtype_changes():
    layer = CountingAffine()
    x = torch.randn(4, 3)
    with torch.no_grad():
        layer(x)
        layer.double()
        xd = x.double()
        y = layer(xd)
    assert y.dtype == torch.float64 and layer.calls["forward"] == 2
    assert all(t.dtype == torch.float64 for t in layer._cache_dependencies())


def test_deepcopy_after_backward_drops_the_cached_pass():
    import copy

    layer = CountingAffine()
    flow = Flow([layer])
    (-flow.log_prob(torch.randn(8, 3)).sum()).backward()
    d = flow()
    d.log_prob(d.rsample())
    twin = copy.deepcopy(flow)
    x = torch.randn(5, 3)
    assert torch.equal(twin.log_prob(x), flow.log_prob(x))


# --- the cache key: every way a parameter's value can change ---------------------------

class Nested(Bijector):
    """A layer whose parameters live in a submodule (as a conditioner's do)."""

    def __init__(self, dim=3):
        super().__init__()
        self.event_shape = (dim,)
        self.inner = nn.Linear(1, dim)  # bias used as the shift, weight as the log-scale
        self.calls = 0

    def _call_and_ladj(self, x):
        self.calls += 1
        s = self.inner.weight[:, 0]
        return x * s.exp() + self.inner.bias, s.sum().expand(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        self.calls += 1
        s = self.inner.weight[:, 0]
        return (y - self.inner.bias) * (-s).exp(), s.sum().expand(y.shape[:-1])


def _cached_then(change, layer=None):
    """Run a pass, ``change(layer)``, then the same pass again: returns (layer, first, second)."""
    layer = layer or Nested()
    x = torch.randn(6, 3)
    with torch.no_grad():
        first = layer(x)
        change(layer)
        second = layer(x)
    return layer, first, second


def test_data_assignment_invalidates_the_cache():
    def change(layer):
        layer.inner.bias.data = layer.inner.bias.data + 1.0
    layer, first, second = _cached_then(change)
    assert layer.calls == 2 and torch.allclose(second, first + 1.0)


def test_repeated_data_assignment_never_reuses_a_storage_address():
    layer = Nested()
    x = torch.randn(6, 3)
    with torch.no_grad():
        for k in range(5):
            layer.inner.bias.data = torch.full((3,), float(k))
            y = layer(x)
            assert torch.allclose(y, x * layer.inner.weight[:, 0].exp() + k)


def test_replaced_parameter_object_in_a_submodule_invalidates_the_cache():
    def change(layer):
        layer.inner._parameters["bias"] = nn.Parameter(layer.inner.bias.detach() + 1.0)
    layer, first, second = _cached_then(change)
    assert layer.calls == 2 and torch.allclose(second, first + 1.0)


def test_load_state_dict_of_a_submodule_invalidates_the_cache():
    def change(layer):
        layer.inner.load_state_dict({k: v + 1.0 for k, v in layer.inner.state_dict().items()})
    layer, first, second = _cached_then(change)
    assert layer.calls == 2


def test_pyro_module_update_module_params_invalidates_the_cache(tmp_path):
    import pyro

    pyro.clear_param_store()
    layer = Nested()
    pyro.module("layer", layer)
    pyro.get_param_store().save(tmp_path / "params.pt")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    x = torch.randn(6, 3)
    with torch.no_grad():
        moved = layer(x)
        pyro.clear_param_store()
        pyro.get_param_store().load(tmp_path / "params.pt")
        pyro.module("layer", layer, update_module_params=True)  # replaces the Parameter objects
        restored = layer(x)
    assert layer.calls == 2 and not torch.allclose(moved, restored)
    assert torch.allclose(restored, x * layer.inner.weight[:, 0].exp() + layer.inner.bias)


# --- permutations are stored where Pyro's param store sees them -------------------------

@pytest.mark.parametrize("make", ["permute", "lu"])
def test_random_permutation_survives_state_dict_and_param_store(make, tmp_path):
    import pyro

    import pyroflows.transforms as T

    pyro.set_rng_seed(0)
    layer = getattr(T, make)(6)
    perm = layer.permutation.clone()
    fresh = getattr(T, make)(6)  # a different draw
    assert not torch.equal(fresh.permutation, perm)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.permutation, perm)

    pyro.clear_param_store()
    pyro.module("layer", layer)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    other = getattr(T, make)(6)
    assert not torch.equal(other.permutation, perm)
    pyro.get_param_store().load(tmp_path / "params.pt")
    pyro.module("layer", other, update_module_params=True)
    assert torch.equal(other.permutation, perm)
    x = torch.randn(4, 6)
    assert torch.allclose(other(x), layer(x))


def test_stored_permutation_is_never_trained():
    import pyroflows.transforms as T

    layer = T.permute(5)
    perm = layer.permutation.clone()
    key = layer.stored.key
    opt = torch.optim.Adam(layer.parameters(), lr=1.0)
    x = torch.randn(4, 5, requires_grad=True)
    layer(x).square().sum().backward()
    opt.step()
    assert key.grad is None and torch.equal(layer.permutation, perm)
