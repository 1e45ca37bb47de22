"""Transformers as pure tensor functions: every kind in ``KINDS``, the same checks.

A new kind registered in ``KINDS`` is covered without editing this file.
Splines (transformers with ``knot_positions``) also get the knot checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyroflows.transforms.transformers import (
    KINDS,
    Affine,
    CubicSpline,
    LogisticMixtureCDF,
    PiecewiseQuadratic,
    RationalQuadraticSpline,
    SigmoidAffine,
    Transformer,
    make_transformer,
)

ALL = sorted(KINDS)
D = 3
BOUND = 5.0
#: kinds whose derivative is continuous at the interior knots / also at +-bound
SMOOTH_INSIDE = {"piecewise_quadratic", "cubic_spline", "rq_spline"}
SMOOTH_AT_BOUND = {"rq_spline"}
SPLINES = [k for k in ALL if hasattr(make_transformer(k), "knot_positions")]


def _transformer(kind) -> Transformer:
    return make_transformer(kind, bins=8, bound=BOUND)


def _params(t: Transformer, dtype=torch.float64, seed=0, scale=0.3, batch=()):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*batch, D, t.num_params, generator=g, dtype=torch.float64)
    return (t.identity_params().to(torch.float64) + scale * noise).to(dtype)


def _grid(lo, hi, n, dtype=torch.float64):
    return torch.linspace(lo, hi, n, dtype=dtype).unsqueeze(-1).expand(n, D)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_float64(kind, seed):
    t = _transformer(kind)
    p = _params(t, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([2.0 * torch.randn(500, D, generator=g, dtype=torch.float64), _grid(-7, 7, 501)])
    y, ld = t.forward(x, p)
    x_back, ld_back = t.inverse(y, p)
    assert (x_back - x).abs().max() <= 1e-6
    # the inverse reports the forward log-derivative at the point it recovered (at a
    # knot of a map whose slope jumps, x_back may land one ulp into the next bin)
    assert (ld_back - t.forward(x_back, p)[1]).abs().max() <= 1e-6
    smooth = (ld_back - ld).abs() <= 1e-6
    assert smooth.float().mean() > 0.99
    y2 = 2.0 * torch.randn(500, D, generator=g, dtype=torch.float64)
    assert (t.forward(t.inverse(y2, p)[0], p)[0] - y2).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ALL)
def test_round_trip_far_from_identity(kind):
    """Parameters 2 N(0, 1) from the identity: steep and flat pieces side by side
    (the case where plain Newton cycles; the iterative inverses must still converge)."""
    t = _transformer(kind)
    g = torch.Generator().manual_seed(12)
    p = (t.identity_params().double() + 2.0 * torch.randn(64, t.num_params, generator=g, dtype=torch.float64))
    x = torch.cat([3 * torch.randn(500, 64, generator=g, dtype=torch.float64), torch.linspace(-50, 50, 101, dtype=torch.float64).unsqueeze(-1).expand(-1, 64)])
    y, _ = t.forward(x, p)
    assert ((t.inverse(y, p)[0] - x).abs() / (1 + x.abs())).max() <= 1e-6


@pytest.mark.parametrize("kind", ALL)
def test_round_trip_float32_three_sd(kind):
    t = _transformer(kind)
    for seed in range(3):
        p = _params(t, torch.float32, seed=seed)
        # a grid out to 3 standard deviations, offset so that no point sits exactly on a
        # knot (where a kink makes the one-sided log-derivative ambiguous)
        x = _grid(-3, 3, 2001, torch.float32) + 1.234e-4
        y, ld = t.forward(x, p)
        assert y.dtype == ld.dtype == torch.float32
        x_back, ld_back = t.inverse(y, p)
        assert (x_back - x).abs().max() <= 1e-4, f"{kind}: {(x_back - x).abs().max()}"
        # the inverse reports the forward log-derivative at the point it returns
        assert (ld_back - t.forward(x_back, p)[1]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ALL)
def test_log_derivative_matches_autograd(kind):
    t = _transformer(kind)
    p = _params(t, seed=3)
    x = torch.cat([1.5 * torch.randn(200, D, dtype=torch.float64), _grid(-6, 6, 97)]).requires_grad_()
    y, ld = t.forward(x, p)
    (dy,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(ld, dy.log(), atol=1e-9, rtol=0)
    # the inverse's derivative: dx/dy = 1 / g'(x)
    y = y.detach().requires_grad_()
    x_back, ld_back = t.inverse(y, p)
    (dx,) = torch.autograd.grad(x_back.sum(), y)
    assert torch.allclose(-ld_back, dx.log(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", ALL)
def test_gradcheck_both_directions(kind):
    """Gradients w.r.t. inputs and parameters (the iterative inverses use implicit gradients)."""
    t = _transformer(kind)
    p = _params(t, seed=4).requires_grad_()
    x = torch.tensor([[-6.0, -0.7, 2.2], [0.3, 4.1, -3.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p: t.forward(x, p), (x, p))
    y = t.forward(x, p)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda y, p: t.inverse(y, p), (y, p), atol=1e-6)


@pytest.mark.parametrize("kind", ALL)
def test_monotone_on_dense_grid(kind):
    t = _transformer(kind)
    for seed in range(3):
        p = _params(t, seed=seed, scale=1.0)
        x = _grid(-8, 8, 40001)
        y, ld = t.forward(x, p)
        assert (y.diff(dim=0) > 0).all(), kind
        assert torch.isfinite(ld).all()


@pytest.mark.parametrize("kind", SPLINES)
def test_continuous_at_knots(kind):
    t = _transformer(kind)
    p = _params(t, seed=5, scale=1.0)
    knots = t.knot_positions(p)  # (D, K + 1)
    assert torch.allclose(knots[..., 0], torch.tensor(-BOUND, dtype=torch.float64))
    assert torch.allclose(knots[..., -1], torch.tensor(BOUND, dtype=torch.float64))
    h = 1e-9
    for k in range(knots.shape[-1]):
        y_lo, ld_lo = t.forward(knots[..., k] - h, p)
        y_hi, ld_hi = t.forward(knots[..., k] + h, p)
        assert (y_hi - y_lo).abs().max() <= 1e-6, f"{kind}: value jumps at knot {k}"
        interior = 0 < k < knots.shape[-1] - 1
        if kind in SMOOTH_AT_BOUND or (interior and kind in SMOOTH_INSIDE):
            assert (ld_hi - ld_lo).abs().max() <= 1e-5, f"{kind}: derivative jumps at knot {k}"


@pytest.mark.parametrize("kind", SPLINES)
def test_tails_are_exact_identity(kind):
    t = _transformer(kind)
    p = _params(t, seed=6, scale=1.0)
    for dtype in (torch.float64, torch.float32):
        z = torch.tensor([BOUND + 1e-3, BOUND + 1.0, 1e2, 1e3, 1e6], dtype=dtype)
        z = torch.cat([z, -z]).unsqueeze(-1).expand(-1, D)
        for fn in (t.forward, t.inverse):
            out, ld = fn(z, p.to(dtype))
            assert torch.equal(out, z)
            assert torch.equal(ld, torch.zeros_like(z))


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_far_inputs_finite_values_and_gradients(kind, dtype):
    t = _transformer(kind)
    p = _params(t, dtype, seed=7).requires_grad_()
    z = torch.tensor([1e3, 1e6, 40.0], dtype=dtype)
    z = torch.cat([z, -z, torch.tensor([0.5], dtype=dtype)]).unsqueeze(-1).expand(-1, D).clone().requires_grad_()
    for fn in (t.forward, t.inverse):
        out, ld = fn(z, p)
        assert torch.isfinite(out).all() and torch.isfinite(ld).all(), f"{kind} {fn.__name__}"
        gz, gp = torch.autograd.grad((out + ld).sum(), (z, p))
        assert torch.isfinite(gz).all() and torch.isfinite(gp).all(), f"{kind} {fn.__name__}"


@pytest.mark.parametrize("kind", ALL)
def test_identity_params_give_identity(kind):
    t = _transformer(kind)
    p = t.identity_params()
    assert p.shape == (t.num_params,)
    x = _grid(-12, 12, 1201)
    p = p.to(torch.float64).expand(D, -1)
    for fn in (t.forward, t.inverse):
        out, ld = fn(x, p)
        assert torch.allclose(out, x, atol=1e-6, rtol=0)
        assert ld.abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ALL)
def test_params_broadcast_against_inputs(kind):
    t = _transformer(kind)
    p = _params(t, seed=8)
    x = 1.5 * torch.randn(4, D, dtype=torch.float64)
    y, ld = t.forward(x, p)  # shared params
    y_full, ld_full = t.forward(x, p.expand(4, D, -1))
    assert y.shape == ld.shape == (4, D)
    assert torch.allclose(y, y_full, atol=1e-12) and torch.allclose(ld, ld_full, atol=1e-12)
    # per-row params against one input row
    pb = _params(t, seed=9, batch=(4,))
    y1, ld1 = t.inverse(x[0], pb)
    assert y1.shape == ld1.shape == (4, D)
    assert torch.allclose(y1, t.inverse(x[0].expand(4, D), pb)[0], atol=1e-12)


def _check_compiled(t: Transformer, backend: str):
    p = _params(t, torch.float32, seed=10)
    x = 2.0 * torch.randn(5, D)
    x[0] = torch.tensor([1e3, -1e6, 0.0])
    for fn in (t.forward, t.inverse):
        torch._dynamo.reset()
        out, ld = torch.compile(fn, fullgraph=True, backend=backend)(x, p)
        out_e, ld_e = fn(x, p)
        assert torch.allclose(out, out_e, atol=1e-4, rtol=1e-5)
        assert torch.allclose(ld, ld_e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ALL)
def test_traces_as_one_graph(kind):
    """Both directions capture as a single graph (``fullgraph=True``: no graph
    breaks, no data-dependent control flow).  The ``aot_eager`` backend checks
    capture and functionalisation without the slow code generation; the
    iterative inverses run few steps since their loop unrolls into the graph."""
    t = _transformer(kind)
    if hasattr(t, "iters"):
        t.iters = 3
    _check_compiled(t, "aot_eager")


def test_compiled_rq_spline_matches_eager():
    """The default (inductor) backend end to end, for the spline the coupling flows use."""
    _check_compiled(_transformer("rq_spline"), "inductor")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown transformer kind"):
        make_transformer("no_such_kind")
    for cls in (PiecewiseQuadratic, CubicSpline, RationalQuadraticSpline):
        with pytest.raises(ValueError, match="bins"):
            cls(bins=0)
        with pytest.raises(ValueError, match="bins"):
            cls(bins=1024)
        with pytest.raises(ValueError, match="bound"):
            cls(bins=4, bound=0.0)
    with pytest.raises(ValueError, match="components"):
        LogisticMixtureCDF(0)


def test_every_kind_is_a_transformer_with_its_declared_param_count():
    for kind in ALL:
        t = _transformer(kind)
        assert isinstance(t, Transformer)
        assert make_transformer(t) is t
        x = torch.randn(2, D)
        out, ld = t.forward(x, t.identity_params().expand(D, -1))
        assert out.shape == ld.shape == x.shape


@pytest.mark.parametrize("kind", SPLINES)
@pytest.mark.parametrize("bins", [1, 2, 32])
def test_splines_with_few_or_many_bins(kind, bins):
    t = make_transformer(kind, bins=bins, bound=BOUND)
    p = _params(t, seed=11)
    x = torch.cat([2.0 * torch.randn(300, D, dtype=torch.float64), _grid(-6, 6, 101)])
    y, ld = t.forward(x, p)
    x_back, ld_back = t.inverse(y, p)
    assert (x_back - x).abs().max() <= 1e-6
    assert (ld_back - ld).abs().max() <= 1e-6
    assert torch.isfinite(ld).all() and (y.diff(dim=0)[300:] > 0).all()


@pytest.mark.parametrize("kind", ["rq_spline", "affine"])
def test_inverted_transformer_is_the_inverse_map(kind):
    from pyroflows.transforms.transformers import Inverted

    base = _transformer(kind)
    t = Inverted(base)
    p = _params(t, seed=3)
    x = torch.linspace(-6, 6, 97, dtype=torch.float64).unsqueeze(-1).expand(97, D).clone().requires_grad_()
    y, ld = t.forward(x, p)
    assert torch.allclose(base.forward(y, p)[0], x, atol=1e-9)  # h = g^{-1}
    dy = torch.autograd.grad(y.sum(), x)[0]
    assert torch.allclose(ld, dy.log(), atol=1e-8)  # elementwise: log h'(x)
    x_back, ld_back = t.inverse(y.detach(), p)
    assert torch.allclose(x_back, x, atol=1e-9) and torch.allclose(ld_back, ld, atol=1e-8)


def test_sinh_arcsinh_has_separate_tail_weights_and_is_smooth_at_zero():
    """Far out |g(x)| grows like |x|^{a_L} on the left and |x|^{a_R} on the right
    (the tail shape changes, unlike the splines' identity tails); with a_L != a_R
    the derivative is still continuous at 0."""
    from pyroflows.transforms.transformers import SinhArcsinh

    t = SinhArcsinh()
    a_left, a_right = 2.0, 0.5
    raw = lambda a: math.log(4.0) * math.atanh(math.log(a) / math.log(4.0))  # noqa: E731
    p = torch.tensor([0.3, raw(a_left), raw(a_right)], dtype=torch.float64)
    x = torch.tensor([-1e4, -1e5, 1e4, 1e5], dtype=torch.float64)
    y, _ = t.forward(x, p)
    slope = (y.abs().log().diff() / x.abs().log().diff())[[0, 2]]
    assert torch.allclose(slope, torch.tensor([a_left, a_right], dtype=torch.float64), atol=1e-2)
    h = torch.tensor([-1e-9, 1e-9], dtype=torch.float64)
    _, ld = t.forward(h, p)
    assert (ld[1] - ld[0]).abs() <= 1e-7
    with pytest.raises(ValueError, match="max_tail"):
        SinhArcsinh(max_tail=1.0)


def test_sigmoid_affine_inverse_never_expands_by_more_than_one_over_sigmoid_of_shift():
    """Glow's sigmoid scale: whatever the parameters, the normalizing direction multiplies
    a difference by at most 1/sigma(2) = 1.135; Affine's may reach e^5."""
    torch.manual_seed(0)
    params = torch.randn(1000, 2, dtype=torch.float64) * torch.tensor([1.0, 1e3], dtype=torch.float64)
    y1 = torch.randn(1000, dtype=torch.float64)
    y2 = y1 + 1e-3
    limit = 1 / torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    sigmoid_gain = (SigmoidAffine().inverse(y2, params)[0] - SigmoidAffine().inverse(y1, params)[0]) / 1e-3
    affine_gain = (Affine().inverse(y2, params)[0] - Affine().inverse(y1, params)[0]) / 1e-3
    assert sigmoid_gain.max() <= limit * (1 + 1e-9)
    assert sigmoid_gain.max() > 0.99 * limit  # the bound is reached, not just respected
    assert affine_gain.max() > 100.0
    x, ladj = SigmoidAffine().inverse(y1, params)
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    assert torch.allclose(SigmoidAffine().forward(x, params)[0], y1, atol=1e-9)


def test_sigmoid_affine_is_the_identity_at_zero_parameters():
    x = torch.randn(5, dtype=torch.float64)
    y, ladj = SigmoidAffine().forward(x, torch.zeros(5, 2, dtype=torch.float64))
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(5, dtype=torch.float64))
