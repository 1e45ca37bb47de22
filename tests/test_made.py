"""MADE: autoregressive structure (via autograd), shapes, orderings, context."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from pyroflows.nn import MADE, MaskedLinear
from pyroflows.nn.made import input_degrees


def _perturbed(made, scale=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in made.parameters():
            p.add_(scale * torch.randn_like(p))
    return made.double()


@pytest.mark.parametrize("order", [None, "reverse", "random", [3, 1, 5, 2, 4]])
def test_jacobian_is_strictly_triangular_in_the_ordering(order):
    D, P = 5, 3
    made = _perturbed(MADE(D, P, hidden=(16, 16), permutation=order, seed=3))
    x = torch.randn(D, dtype=torch.float64)
    J = jacobian(lambda v: made(v), x)  # (D, P, D)
    deg = made.degrees
    depends = J.abs().sum(1) > 0  # (D_out, D_in)
    allowed = deg[:, None] > deg[None, :]
    assert not (depends & ~allowed).any(), "an output depends on itself or a later dimension"
    # and the network is not trivially sparse: the last dimension in the ordering sees all others
    last = int(torch.argmax(deg))
    assert depends[last].sum() == D - 1
    # the matrix is strictly lower triangular after sorting by the ordering
    perm = torch.argsort(deg)
    Jp = J.abs().sum(1)[perm][:, perm]
    assert torch.equal(Jp, torch.tril(Jp, diagonal=-1))


def test_output_layout_and_zero_init():
    made = MADE(4, 3, hidden=(8,))
    out = made(torch.randn(2, 5, 4))
    assert out.shape == (2, 5, 4, 3)
    assert torch.equal(out, torch.zeros_like(out))


def test_context_feeds_every_output_and_broadcasts():
    D, C = 3, 2
    made = _perturbed(MADE(D, 2, hidden=(16, 16), context_dim=C))
    x = torch.randn(D, dtype=torch.float64)
    c = torch.randn(C, dtype=torch.float64)
    Jc = jacobian(lambda v: made(x, v), c)  # (D, 2, C)
    assert (Jc.abs().sum((1, 2)) > 0).all(), "some dimension (the first one?) ignores the context"
    Jx = jacobian(lambda v: made(v, c), x).abs().sum(1)
    assert torch.equal(Jx, torch.tril(Jx, diagonal=-1))
    # broadcasting, both ways
    xs = torch.randn(4, 1, D, dtype=torch.float64)
    cs = torch.randn(3, C, dtype=torch.float64)
    assert made(xs, cs).shape == (4, 3, D, 2)
    assert made(xs[0, 0], cs).shape == (3, D, 2)
    with pytest.raises(ValueError, match="context"):
        made(xs)


def test_random_order_is_seeded():
    a = input_degrees(6, "random", seed=4)
    assert torch.equal(a, input_degrees(6, "random", seed=4))
    assert sorted(a.tolist()) == list(range(1, 7))
    assert not all(torch.equal(a, input_degrees(6, "random", seed=s)) for s in range(5, 10))


@pytest.mark.parametrize("order", ["sideways", [1, 1, 2], [0, 1, 2], [1, 2]])
def test_bad_order_raises(order):
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, 2, permutation=order)


def test_one_dimension_gives_constant_outputs():
    made = _perturbed(MADE(1, 2, hidden=(4,)))
    a, b = made(torch.tensor([[0.0], [5.0]], dtype=torch.float64))
    assert torch.equal(a, b)


def test_one_parameter_tensor_per_made():
    """Every weight and bias lives in one flat tensor (Pyro steps each tensor separately)."""
    made = MADE(4, 3, hidden=(8, 6), context_dim=2)
    (param,) = made.parameters()
    (layers, context_weight) = made.layers()
    shapes = [tuple(w.shape) for w, _ in layers] + [tuple(b.shape) for _, b in layers]
    assert shapes == [(8, 4), (6, 8), (12, 6), (8,), (6,), (12,)]
    assert context_weight.shape == (8, 2)
    assert param.numel() == sum(math.prod(s) for s in shapes) + 16
    parts = made.unpacked()  # raw (unmasked) views, in the layout of the flat tensor
    assert [tuple(q.shape) for q in parts] == [(8, 4), (8,), (6, 8), (6,), (12, 6), (12,), (8, 2)]
    with torch.no_grad():
        parts[-1].fill_(7.0)
    assert param[-16:].eq(7.0).all() and made.layers()[1].eq(7.0).all()

def test_masked_linear_sees_only_its_mask():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    layer = MaskedLinear(mask).double()
    J = jacobian(layer, torch.randn(3, dtype=torch.float64))
    assert torch.equal(J != 0, mask.bool())
    with torch.no_grad():  # the reused product follows an in-place change of the weight
        before = layer(torch.ones(3, dtype=torch.float64))
        layer.weight.add_(1.0)
        assert torch.allclose(layer(torch.ones(3, dtype=torch.float64)), before + mask.sum(1).double())


@pytest.mark.parametrize("order", [None, "reverse", [3, 1, 5, 2, 4]])
@pytest.mark.parametrize("hidden", [(16, 12), (3,)], ids=["wide", "fewer-units-than-degrees"])
@pytest.mark.parametrize("context_dim", [None, 2])
def test_solve_equals_repeated_whole_passes(order, hidden, context_dim):
    """``solve`` (each hidden unit computed once) gives what D whole forward passes give."""
    made = _perturbed(MADE(5, 3, hidden=hidden, context_dim=context_dim, permutation=order))
    v = torch.randn(4, 1, 5, dtype=torch.float64)
    context = torch.randn(3, context_dim, dtype=torch.float64) if context_dim else None

    def g(v_d, params):  # an increasing map of v_d whose parameters depend on the earlier inputs
        return v_d * params[..., 0].exp() + params[..., 1] * params[..., 2]

    solved = made.solve(lambda d, params: g(v[..., d], params), v.shape[:-1], context)
    shape = (4, 3, 5) if context_dim else (4, 1, 5)
    u = torch.zeros(shape, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(5):  # pass k fixes the input of degree k
            u = g(v, made(u, context))
    assert solved.shape == shape
    assert torch.allclose(solved, u, atol=1e-12)


def test_solve_one_dimension_reads_only_the_bias():
    made = _perturbed(MADE(1, 2, hidden=(4,)))
    seen = []
    made.solve(lambda d, params: seen.append(params) or params[..., 0], (3,))
    assert torch.equal(seen[0], made.unpacked()[-1].expand(3, 2))


@pytest.mark.parametrize("context_dim", [None, 2])
def test_input_bound_keeps_the_structure_and_solve(context_dim):
    """With ``input_bound`` the first layer reads ``b tanh(x / b)``: still autoregressive, ``solve``
    still agrees with whole passes, and the outputs stop growing far out (bounded inputs)."""
    made = _perturbed(MADE(5, 3, hidden=(16, 12), context_dim=context_dim, input_bound=2.0))
    context = torch.randn(context_dim, dtype=torch.float64) if context_dim else None
    x = torch.randn(5, dtype=torch.float64)
    J = jacobian(lambda v: made(v, context), x).abs().sum(1)
    perm = torch.argsort(made.degrees)
    assert torch.equal(J[perm][:, perm], torch.tril(J[perm][:, perm], diagonal=-1)) and J.sum() > 0
    v = torch.randn(4, 5, dtype=torch.float64)

    def g(v_d, params):
        return v_d * params[..., 0].exp() + params[..., 1]

    solved = made.solve(lambda d, params: g(v[..., d], params), (4,), context)
    u = torch.zeros(4, 5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(5):
            u = g(v, made(u, context))
    assert torch.allclose(solved, u, atol=1e-12)
    with torch.no_grad():
        far, farther = made(1e3 * x, context), made(1e6 * x, context)
    assert torch.allclose(far, farther, atol=1e-9)  # the inputs saturate at +-b
    plain = MADE(5, 3, hidden=(16, 12), context_dim=context_dim).double()
    plain.load_state_dict(made.state_dict())
    assert torch.allclose(made(x, context), plain(2.0 * torch.tanh(x / 2.0), context))
    with pytest.raises(ValueError, match="input_bound"):
        MADE(3, 2, input_bound=0.0)


def test_iaf_with_bounded_inputs_is_exact_and_asymptotically_linear():
    """An affine IAF layer whose MADE reads bounded inputs: log|det J| against autograd in
    float64, the inverse round trip, and a slope that stays bounded far out (Lipschitz)."""
    from pyroflows import flows

    flow = flows.iaf(4, num_layers=1, kind="affine", input_bound=3.0).double()
    layer = flow.transforms[0]
    _perturbed(layer.made, scale=0.3)
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x, cache=False)
    for i in range(3):
        jac = jacobian(lambda v: layer.call_and_ladj(v, cache=False)[0], x[i])
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac)[1], atol=1e-10)
    assert torch.allclose(layer.inverse_and_ladj(y, cache=False)[0], x, atol=1e-9)
    with torch.no_grad():
        ratio = layer(1e8 * x) / layer(1e7 * x)
    assert torch.allclose(ratio, torch.full_like(ratio, 10.0), rtol=1e-4)  # linear far out
