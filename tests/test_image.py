"""Image layers, the multi-scale flow, Glow's tools and the memory-saving backward."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import pyroflows.images as I
import pyroflows.transforms as T
from pyroflows import Flow
from pyroflows.flows import glow
from pyroflows.transforms.image import depth_to_space, space_to_depth
from pyroflows.transforms.multiscale import OnTail, level_shapes

SHAPE = (2, 4, 4)


def _multiscale(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"levels": 2, "steps": 2, "hidden_channels": (8,), **kw}
    m = T.multi_scale(SHAPE, **kw).double()
    with torch.no_grad():  # move away from the identity start
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).reshape(1, 4, 4)
    y = space_to_depth(x)
    assert y.shape == (4, 2, 2)
    # channel 2i + j holds pixel (i, j) of every 2x2 block
    assert y[:, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[:, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]
    assert torch.equal(depth_to_space(y), x)
    with pytest.raises(ValueError, match="even"):
        T.squeeze((1, 3, 4))


def test_channel_permute_is_a_1x1_convolution_with_pyros_signature():
    layer = T.generalized_channel_permute()  # Pyro's default: 3 channels, any H, W
    assert layer.channels == 3
    x = torch.randn(2, 3, 5, 7)
    y = layer(x)
    lower, upper = T.linear.lu_factors(layer.LU, layer.LU, torch.diagonal(layer.LU), layer.diag_sign)
    w = (lower @ upper)[layer.permutation]
    assert torch.allclose(y, F.conv2d(x, w[:, :, None, None]), atol=1e-5)
    assert torch.allclose(layer.log_abs_det_jacobian(x, y), 35 * torch.linalg.slogdet(w)[1].expand(2), atol=1e-4)
    cond = T.conditional_generalized_channel_permute(4, channels=3, hidden_dims=[8])
    assert cond.condition(torch.randn(2, 4))(x).shape == x.shape
    with pytest.raises(ValueError, match="disagrees"):
        T.generalized_channel_permute(channels=2, shape=(3, 4, 4))


def test_shapes_through_every_level():
    assert level_shapes(SHAPE, 2) == [(8, 2, 2), (16, 1, 1)]
    assert level_shapes((1, 8, 8), 3) == [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    with pytest.raises(ValueError, match="divisible"):
        level_shapes((1, 6, 6), 2)
    m = _multiscale()
    seen = {}
    for stage in m.layers:
        assert isinstance(stage, OnTail)
        seen.setdefault(tuple(stage.layer.event_shape), set()).add(stage.offset)
    # level 1 works on (8, 2, 2) from offset 0; half of it (16 entries) is factored out before level 2
    assert seen[(8, 2, 2)] == {0}
    assert seen[(16, 1, 1)] == {16}
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    z, ladj = m.inverse_and_ladj(x)
    assert z.shape == x.shape and ladj.shape == (5,)


def test_factored_part_leaves_the_computation():
    m = _multiscale(learn_prior=False)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    z = m._inverse(x)
    # changing the factored-out latent entries (the first 16) must not change the
    # coarser level's contribution: those entries pass the second level untouched
    z2 = z.clone().flatten(1)
    z2[:, :16] += 1.0
    z2 = z2.reshape(z.shape)
    last_level = [s for s in m.layers if s.offset == 16]
    a, b = z, z2
    for s in last_level:
        a, b = s(a), s(b)
    assert torch.allclose((b - a).flatten(1)[:, :16], torch.ones(3, 16, dtype=torch.float64))
    assert torch.allclose((b - a).flatten(1)[:, 16:], torch.zeros(3, 16, dtype=torch.float64))


def test_exact_inverse_of_the_whole_multiscale_flow():
    m = _multiscale()
    x = torch.rand(7, *SHAPE, dtype=torch.float64)
    z, ladj = m._inverse_pass(x)
    x_back, ladj_fwd = m._forward_pass(z)
    assert (x_back - x).abs().max() < 1e-10
    assert torch.allclose(ladj, ladj_fwd, atol=1e-10)
    flow = Flow(m).double()
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum((-3, -2, -1)) - ladj
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-10)


def test_glow_is_one_pyro_distribution_usable_as_a_prior():
    flow = glow(SHAPE, levels=2, steps=1, hidden_channels=8).double()
    d = flow()
    assert isinstance(d, dist.TransformedDistribution) and d.event_shape == SHAPE
    x = d.rsample((4,))
    assert x.shape == (4, *SHAPE) and x.requires_grad
    assert flow.log_prob(x).shape == (4,)

    def model():
        img = pyro.sample("img", flow())
        pyro.sample("obs", dist.Normal(img.mean(), 1.0), obs=torch.tensor(0.2, dtype=torch.float64))

    trace = pyro.poutine.trace(model).get_trace()
    assert trace.nodes["img"]["value"].shape == SHAPE
    assert torch.isfinite(trace.log_prob_sum())


class _UniformOnUnitCube:
    """A known density: 1 on [0, 1)^D."""

    event_shape = torch.Size(SHAPE)

    def log_prob(self, v):
        assert ((v >= 0) & (v < 1)).all()
        return v.new_zeros(v.shape[:-3])


def test_bits_per_dim_of_known_densities():
    k = torch.randint(0, 256, (10, *SHAPE)).float()
    # uniform on the cube: P(k) = 256^-D exactly, 8 bits per dimension
    assert I.bits_per_dim(_UniformOnUnitCube(), k, I.UniformDequantization(256)) == pytest.approx(8.0, abs=1e-6)
    # a standard normal: -(log N(v) - D log L) / (D ln 2) at the dequantized points
    flow = Flow(T.channel_actnorm(SHAPE))
    flow.transforms[0].initialized.fill_(True)  # keep the identity
    torch.manual_seed(3)
    got = I.bits_per_dim(flow, k, I.UniformDequantization(256))
    torch.manual_seed(3)
    v = I.UniformDequantization(256)(k)[0]
    D = math.prod(SHAPE)
    ll = dist.Normal(0.0, 1.0).log_prob(v).sum((-3, -2, -1)) - D * math.log(256)
    assert got == pytest.approx(float((-ll / (D * math.log(2))).mean()), rel=1e-6)


def test_dequantizers_stay_in_the_cell_and_variational_is_trainable():
    k = torch.randint(0, 17, (6, *SHAPE)).float()
    for deq in (I.UniformDequantization(17), I.VariationalDequantization(SHAPE, 17, hidden_channels=(4,))):
        v, log_q = deq(k)
        assert torch.equal(torch.floor(v * 17), k) and log_q.shape == (6,)
    flow = glow(SHAPE, levels=1, steps=1, hidden_channels=4, dequantization="variational", num_values=17)
    loss = -I.dequantized_log_prob(flow, k).mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.dequantizer.parameters())


def test_temperature_zero_gives_the_image_of_the_base_mode():
    m = _multiscale()
    flow = Flow(m).double()
    x = I.sample_at_temperature(flow, (3,), temperature=0.0)
    mode = m(torch.zeros(SHAPE, dtype=torch.float64))
    assert torch.allclose(x, mode.expand(3, *SHAPE), atol=1e-12)
    hot, cold = (I.sample_at_temperature(flow, (200,), t) for t in (1.0, 0.5))
    assert cold.std(0).mean() < hot.std(0).mean()


def test_interpolation_ends_reproduce_the_images():
    flow = Flow(_multiscale()).double()
    x0, x1 = torch.rand(2, *SHAPE, dtype=torch.float64)
    strip = I.interpolate(flow, x0, x1, num_steps=5)
    assert strip.shape == (5, *SHAPE)
    assert torch.allclose(strip[0], x0, atol=1e-9) and torch.allclose(strip[-1], x1, atol=1e-9)


@pytest.mark.parametrize("kind", ["affine", "rq_spline"])
def test_memory_saving_backward_equals_ordinary_backprop(kind):
    m = _multiscale(kind=kind)
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    plain, saving = Flow(m).double(), Flow(m, memory_saving=True).double()
    params = list(m.parameters())
    lp = plain.log_prob(x)
    g_plain = torch.autograd.grad(lp.sum(), params)
    x_req = x.clone().requires_grad_()
    ls = saving.log_prob(x_req)
    g_saving = torch.autograd.grad(ls.sum(), [*params, x_req])
    assert torch.allclose(lp, ls, atol=1e-10)
    for a, b in zip(g_plain, g_saving[:-1]):
        assert (a - b).abs().max() <= 1e-5
    x_ref = x.clone().requires_grad_()
    g_x = torch.autograd.grad(plain.log_prob(x_ref).sum(), x_ref)[0]
    assert (g_saving[-1] - g_x).abs().max() <= 1e-5


def test_memory_saving_is_refused_for_inexact_inverses():
    with pytest.raises(ValueError, match="InvertibleResidual"):
        Flow(T.InvertibleResidual(3), memory_saving=True)
    with pytest.raises(ValueError, match="BatchNorm"):
        Flow(T.batchnorm(3), memory_saving=True)  # train mode: batch statistics
    with pytest.raises(ValueError, match="stochastic"):
        Flow(T.InvertibleResidual(3, log_det="roulette"), memory_saving=True)
