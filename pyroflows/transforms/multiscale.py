r"""Multi-scale flow with factor-out (Dinh et al., "Real NVP", 2017; Kingma &
Dhariwal, "Glow", 2018; Prince, *Understanding Deep Learning*, section 16.4),
as one bijection between a latent and an image of the same shape.

In the normalizing direction (image :math:`x` to latent :math:`z`) each level
squeezes (space-to-depth), runs its steps (ActNorm, invertible 1x1
convolution, coupling), and then *factors out* half of its channels: they
leave the computation and become part of the latent, while the other half
goes on to the next, coarser level.  The last level keeps everything.  The
latent is the concatenation of the factored parts, reshaped to the image
shape ``(C, H, W)``, so the whole thing is one ``TransformModule`` and
``Flow(multi_scale(...))`` is one Pyro distribution.

**Layout.**  Every stage acts on a *tail* of the flattened state: a stage at
level :math:`l` sees entries ``offset_l:`` viewed as that level's tensor, and
passes the head (the parts already factored out) unchanged.  Factoring out the
first half of the channels is then free: the offset moves past them.  So the
flow is a plain sequence of exactly invertible layers on one fixed-shape
tensor (:attr:`MultiScale.layers`), which the memory-saving backward of
:mod:`pyroflows.transforms.memory` can walk.

**Learned priors** (Glow): with ``learn_prior=True`` a factored part
:math:`z_l` gets the conditional Gaussian prior
:math:`N(\mu(h_l), \sigma(h_l)^2)` given the half :math:`h_l` that goes on.
As a bijection this is an affine coupling (conditioner: one zero-initialised
3x3 convolution of :math:`h_l`) mapping a standard normal :math:`\epsilon_l`
to :math:`z_l = \mu + \sigma\epsilon_l`, so the base stays a standard normal
and temperature (scaling :math:`\epsilon`) scales the prior's standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Bijector
from .image import IMAGE, ChannelActNorm, ConvCoupling, GeneralizedChannelPermute, Unsqueeze, check_image_shape
from .transformers import Transformer, make_transformer

__all__ = ["MultiScale", "multi_scale"]


class OnTail(Bijector):
    """Apply ``layer`` to the entries ``offset:`` of the flattened ``(C, H, W)`` state,
    viewed as ``layer``'s input shape (forward) or output shape (inverse); the head
    passes through unchanged."""

    domain = IMAGE
    codomain = IMAGE

    def __init__(self, layer: Bijector, offset: int, shape):
        super().__init__()
        self.layer, self.offset, self.event_shape = layer, int(offset), tuple(shape)
        self._in_shape = tuple(layer.event_shape)
        self._out_shape = tuple(layer.forward_shape(self._in_shape))

    def _run(self, x, pass_, shape):
        batch = x.shape[:-3]
        flat = x.flatten(-3)
        head, tail = flat[..., :self.offset], flat[..., self.offset:]
        out, ladj = pass_(tail.reshape(*batch, *shape))
        out = out.flatten(-3)
        if self.offset:
            out = torch.cat([head, out], dim=-1)
        return out.reshape(x.shape), ladj

    def _call_and_ladj(self, x):
        return self._run(x, lambda v: self.layer.call_and_ladj(v, cache=False), self._in_shape)

    def _inverse_and_ladj(self, y):
        return self._run(y, lambda v: self.layer.inverse_and_ladj(v, cache=False), self._out_shape)

    def extra_repr(self):
        return f"offset={self.offset}"


class MultiScale(Bijector):
    r"""A multi-scale flow from a latent of shape ``(C, H, W)`` to images of the
    same shape: a sequence of :class:`OnTail` stages (see the module docstring).

    Args:
        shape: the image shape ``(C, H, W)``.
        layers: the stages in the generative order (``layers[0]`` is applied
            to the latent); build them with :func:`multi_scale`.

    Both directions cost one pass through every stage; the log-determinant is
    the sum of the stages'.  :attr:`layers` is the flat list of exactly
    invertible stages (what the memory-saving backward walks).
    """

    domain = IMAGE
    codomain = IMAGE

    def __init__(self, shape, layers: Sequence[Bijector], cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = check_image_shape(shape)
        self.layers = nn.ModuleList(layers)

    def _call_and_ladj(self, x):
        ladj = x.new_zeros(x.shape[:-3])
        for layer in self.layers:
            x, l_ = layer.call_and_ladj(x, cache=False)
            ladj = ladj + l_
        return x, ladj

    def _inverse_and_ladj(self, y):
        ladj = y.new_zeros(y.shape[:-3])
        for layer in reversed(self.layers):
            y, l_ = layer.inverse_and_ladj(y, cache=False)
            ladj = ladj + l_
        return y, ladj


def level_shapes(shape, levels: int) -> list[tuple[int, int, int]]:
    """The tensor shape each level works on (after its squeeze): ``(4C, H/2, W/2)``
    at the first level, then half the channels squeezed again, and so on."""
    c, h, w = check_image_shape(shape)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive int, got {levels!r}")
    if h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"{levels} levels need height and width divisible by {2 ** levels}, got shape {shape}")
    out = []
    for _ in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        out.append((c, h, w))
        c = c - c // 2  # the first half is factored out
    return out


def multi_scale(shape, levels: int = 2, steps: int = 1, hidden_channels: Sequence[int] = (64, 64),
                kind: str | Transformer = "affine", count_bins: int = 8, bound: float = 5.0,
                learn_prior: bool = True) -> MultiScale:
    """A :class:`MultiScale` Glow: ``levels`` levels of ``steps`` steps each
    (ActNorm over channels, invertible 1x1 convolution, coupling of transformer
    ``kind`` with a :class:`~pyroflows.nn.ConvNet` conditioner of
    ``hidden_channels``), half the channels factored out after every level but
    the last, with learned conditional Gaussian priors when ``learn_prior``."""
    shape = check_image_shape(shape)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    make_transformer(kind, count_bins, bound)  # fail early on an unknown kind
    normalizing = []  # stages in the normalizing order (image -> latent); each runs inverse there
    offset = 0
    for level, (c, h, w) in enumerate(level_shapes(shape, levels)):
        lshape = (c, h, w)
        normalizing.append(OnTail(Unsqueeze(lshape), offset, shape))
        for k in range(steps):
            step = [ChannelActNorm(lshape), GeneralizedChannelPermute(shape=lshape),
                    ConvCoupling(lshape, make_transformer(kind, count_bins, bound), hidden_channels, k % 2)]
            normalizing += [OnTail(layer, offset, shape) for layer in step]
        if level < levels - 1:
            if learn_prior:  # the kept half (second) conditions the factored half (first)
                normalizing.append(OnTail(ConvCoupling(lshape, "affine", (), parity=1), offset, shape))
            offset += (c // 2) * h * w
    return MultiScale(shape, list(reversed(normalizing)))
