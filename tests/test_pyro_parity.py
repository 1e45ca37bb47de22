"""``pyroflows.transforms`` as a drop-in for ``pyro.distributions.transforms``.

* every lowercase helper in Pyro's ``__all__`` exists here with Pyro's positional
  parameters (same names, same order), accepts Pyro's keyword names and has
  Pyro's defaults, checked against the installed Pyro so parity cannot drift;
* Pyro's meaning: the direction of the cheap pass, the spline orders, a fresh
  permutation per ``permute`` call;
* a generic suite in the spirit of Pyro's ``tests/distributions/test_transforms.py``
  (inverse, shapes, Jacobian, autodiff) over every helper, through Pyro's own
  ``Transform`` interface;
* Pyro's normalizing-flows tutorial (parts 1 and 2), with only its import changed.
"""

from __future__ import annotations

import inspect

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as P
import pytest
import torch
from harness import Case, bind, build, cases, make_context, sample_domain
from torch.autograd.functional import jacobian

import pyroflows.transforms as T
from pyroflows.transforms.permutation import StoredPermutation
from pyroflows.transforms.transformers import LinearRationalSpline, RationalQuadraticSpline

PYRO_HELPERS = sorted(n for n in P.__all__ if n[0].islower())
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _positional(sig):
    return [p.name for p in sig.parameters.values() if p.kind in _POSITIONAL]


def _named(sig):
    return {p.name: p for p in sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


@pytest.mark.parametrize("name", PYRO_HELPERS)
def test_every_pyro_helper_has_pyros_signature(name):
    # no skips: a helper still missing here fails, by name
    assert hasattr(T, name), f"pyroflows.transforms has no {name!r} (Pyro has)"
    assert name in T.__all__
    ours, theirs = getattr(T, name), getattr(P, name)
    if not callable(theirs) or not inspect.isfunction(theirs):  # an object, e.g. identity_transform
        assert type(ours) is type(theirs)
        return
    sig_ours, sig_theirs = inspect.signature(ours), inspect.signature(theirs)
    pos_theirs = _positional(sig_theirs)
    assert _positional(sig_ours)[: len(pos_theirs)] == pos_theirs, (
        f"{name}: positional parameters {_positional(sig_ours)} do not start with Pyro's {pos_theirs}")
    named_ours = _named(sig_ours)
    for pname, param in _named(sig_theirs).items():
        assert pname in named_ours, f"{name}: Pyro's keyword {pname!r} is not accepted"
        if param.default is not param.empty:
            assert named_ours[pname].default == param.default, (
                f"{name}({pname}=...): default {named_ours[pname].default!r}, Pyro's is {param.default!r}")
    # our own options are keyword-only: every positional slot is Pyro's
    extra = [p for p in _positional(sig_ours) if p not in pos_theirs]
    assert not extra, f"{name}: our options {extra} must be keyword-only"


# --- meaning --------------------------------------------------------------------------

@pytest.mark.parametrize("helper,args", [
    ("affine_autoregressive", (3,)), ("spline_autoregressive", (3,)),
    ("conditional_affine_autoregressive", (3, 2)), ("conditional_spline_autoregressive", (3, 2)),
])
def test_autoregressive_helpers_sample_in_one_pass_as_pyros(helper, args):
    """Pyro's autoregressive helpers are IAF-style: the forward (sampling) pass is one MADE call."""
    layer = getattr(T, helper)(*args)
    calls = []
    layer.made.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(5, 3)
    t = layer.condition(torch.randn(5, 2)) if len(args) == 2 else layer
    t.call_and_ladj(x)
    assert len(calls) == 1
    t.inverse_and_ladj(torch.randn(5, 3))
    assert len(calls) == 1 + 3  # the inverse is the sequential direction


@pytest.mark.parametrize("order,cls", [("linear", LinearRationalSpline), ("quadratic", RationalQuadraticSpline)])
def test_spline_order_means_pyros_spline(order, cls):
    assert isinstance(T.spline(2, order=order).transformer, cls)
    assert isinstance(T.spline_coupling(4, order=order).transformer, cls)
    assert isinstance(T.spline_autoregressive(3, order=order).transformer, cls)
    assert isinstance(T.conditional_spline(2, 3, order=order).transformer, cls)
    with pytest.raises(ValueError, match="order"):
        T.spline(2, order="cubic")


def test_spline_coupling_split_dim_is_pyros():
    layer = T.spline_coupling(5, 3)  # Pyro: split_dim=3, the first three condition the other two
    assert layer.split.mask.tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="split_dim"):
        T.spline_coupling(3, 3)


def test_parameter_free_helpers_are_pyros():
    x = torch.tensor([-2.0, 0.5])
    assert torch.allclose(T.leaky_relu()(x), P.leaky_relu()(x))
    assert torch.allclose(T.elu()(x), P.elu()(x))
    assert list(T.leaky_relu().parameters()) == [] and list(T.elu().parameters()) == []


def test_permute_draws_a_fresh_permutation_per_call_reproducibly():
    pyro.set_rng_seed(0)
    perms = [tuple(T.permute(2).permutation.tolist()) for _ in range(20)]
    assert {(0, 1), (1, 0)} <= set(perms)  # not always the identity
    pyro.set_rng_seed(0)
    assert perms == [tuple(T.permute(2).permutation.tolist()) for _ in range(20)]


def test_iterated_composes_fresh_layers():
    layer = T.iterated(3, T.planar, 2)
    assert len(layer.parts) == 3 and len({id(p) for p in layer.parts}) == 3
    assert len(list(layer.parameters())) == 3 * len(list(T.planar(2).parameters()))


# --- a generic suite over every helper, through Pyro's Transform interface ------------

CASES = cases()


def _setup(case: Case, batch=(5,)):
    layer = build(case)
    context = make_context(batch) if case.conditional else None
    t = bind(layer, case, context)
    x = sample_domain(layer.domain, (*batch, *layer.event_shape), torch.Generator().manual_seed(3))
    return layer, t, x


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generic_inverse_and_shapes(case):
    layer, t, x = _setup(case)
    y = t(x)
    assert y.shape == t.forward_shape(x.shape)  # the input's shape, except for reshaping layers (squeeze)
    assert torch.allclose(t.inv(y), x, atol=1e-6)
    assert t.log_abs_det_jacobian(x, y).shape == x.shape[: x.dim() - t.domain.event_dim]
    assert t.inv.domain is t.codomain and t.inv.codomain is t.domain


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generic_inverse_jacobian_is_the_inverse_matrix(case):
    layer, t, x = _setup(case, batch=())
    x = x.reshape(-1)
    shape = (*layer.event_shape,)
    out_shape = t.forward_shape(shape)
    J = jacobian(lambda v: t._call(v.reshape(shape)).reshape(-1), x)
    y = t._call(x.reshape(shape)).reshape(-1)
    J_inv = jacobian(lambda v: t._inverse(v.reshape(out_shape)).reshape(-1), y)
    assert torch.allclose(J_inv @ J, torch.eye(x.numel(), dtype=x.dtype), atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generic_autodiff_reaches_inputs_and_parameters(case):
    layer, t, x = _setup(case)
    x = x.clone().requires_grad_()
    y = t(x)
    loss = y.square().sum() + t.log_abs_det_jacobian(x, y).sum()
    # a stored permutation's key is a parameter by design never differentiated
    params = [p for m in layer.modules() if not isinstance(m, StoredPermutation)
              for p in m.parameters(recurse=False) if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
    used = [g for g in grads[1:] if g is not None]
    assert all(torch.isfinite(g).all() for g in used)
    if params:
        assert used, f"{case}: no parameter receives a gradient"


# --- Pyro's normalizing-flows tutorial, with only the import swapped -------------------

def _circles(n=256):
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    X, _ = datasets.make_circles(n_samples=n, factor=0.5, noise=0.05, random_state=0)
    return torch.tensor(StandardScaler().fit_transform(X), dtype=torch.float)


def test_pyro_tutorial_univariate_and_multivariate_run_with_the_import_swapped():
    import pyroflows.transforms as T  # the tutorial's `import pyro.distributions.transforms as T`

    pyro.set_rng_seed(0)
    dataset = _circles()
    for spline_transform in (T.Spline(2, count_bins=16), T.spline_coupling(2, count_bins=16),
                             T.affine_autoregressive(2)):
        base_dist = dist.Normal(torch.zeros(2), torch.ones(2))
        flow_dist = dist.TransformedDistribution(base_dist, [spline_transform])
        optimizer = torch.optim.Adam(spline_transform.parameters(), lr=1e-2)
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = -flow_dist.log_prob(dataset).mean()
            loss.backward()
            optimizer.step()
            flow_dist.clear_cache()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (type(spline_transform).__name__, losses[0], losses[-1])
        X_flow = flow_dist.sample(torch.Size([100])).detach().numpy()
        assert X_flow.shape == (100, 2)


def test_pyro_tutorial_conditional_part_runs_with_the_import_swapped():
    import pyroflows.transforms as T

    pyro.set_rng_seed(0)
    dataset = _circles()
    dist_base = dist.Normal(torch.zeros(1), torch.ones(1))
    x1_transform = T.spline(1)
    dist_x1 = dist.TransformedDistribution(dist_base, [x1_transform])
    x2_transform = T.conditional_spline(1, context_dim=1)
    dist_x2_given_x1 = dist.ConditionalTransformedDistribution(dist_base, [x2_transform])
    modules = torch.nn.ModuleList([x1_transform, x2_transform])
    optimizer = torch.optim.Adam(modules.parameters(), lr=3e-3)
    x1, x2 = dataset[:, 0][:, None], dataset[:, 1][:, None]
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        ln_p_x1 = dist_x1.log_prob(x1)
        ln_p_x2_given_x1 = dist_x2_given_x1.condition(x1.detach()).log_prob(x2.detach())
        loss = -(ln_p_x1 + ln_p_x2_given_x1).mean()
        loss.backward()
        optimizer.step()
        dist_x1.clear_cache()
        dist_x2_given_x1.clear_cache()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    x1_flow = dist_x1.sample(torch.Size([100]))
    x2_flow = dist_x2_given_x1.condition(x1_flow).sample(torch.Size([100]))
    assert x1_flow.shape == x2_flow.shape == (100, 1)
