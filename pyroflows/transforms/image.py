r"""Image layers over ``(..., C, H, W)``: the building blocks of Glow.

Every helper takes the image shape ``(C, H, W)`` (Pyro's own
``generalized_channel_permute`` helpers keep Pyro's signature and take it as
the keyword ``shape``).  All layers are exact bijections with cheap
log-determinants; in both directions each costs one pass (Prince,
*Understanding Deep Learning*, section 16.5.2; Kingma & Dhariwal, "Glow", 2018):

* :class:`Squeeze`: space-to-depth, ``(C, H, W) -> (4C, H/2, W/2)``, log-det 0;
  :class:`Unsqueeze` is its inverse;
* :class:`GeneralizedChannelPermute`: the invertible 1x1 convolution
  :math:`W = PLU`, log-det :math:`HW \sum_c \log|U_{cc}|`;
* :class:`ConvCoupling`: coupling over channels with a convolutional
  conditioner, log-det :math:`\sum \log g'`;
* :class:`ChannelActNorm`: per-channel affine map with data-dependent
  initialisation, log-det :math:`HW \sum_c s_c`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import constraints

from ..nn import MLP, ConvNet
from .base import Bijector, ConditionalBijector
from .coupling import DEFAULT_SPLINE
from .elementwise import check_context_dim
from .linear import lu_decompose, lu_factors, lu_matmul, lu_solve
from .normalization import ActNorm
from .transformers import Transformer, make_transformer

__all__ = [
    "ChannelActNorm",
    "ConditionalGeneralizedChannelPermute",
    "ConvCoupling",
    "GeneralizedChannelPermute",
    "Squeeze",
    "Unsqueeze",
    "channel_actnorm",
    "conditional_generalized_channel_permute",
    "conv_affine_coupling",
    "conv_spline_coupling",
    "generalized_channel_permute",
    "squeeze",
    "unsqueeze",
]

IMAGE = constraints.independent(constraints.real, 3)


def check_image_shape(shape) -> tuple[int, int, int]:
    """``shape`` as a tuple ``(C, H, W)`` of positive ints, else ``ValueError``."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"an image shape must be a sequence (C, H, W), got {shape!r}") from None
    if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"an image shape must be (C, H, W) of positive ints, got {shape!r}")
    return shape


def _batch(x):
    return x.shape[:-3]


# --- squeeze ----------------------------------------------------------------------

def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W) -> (..., 4C, H/2, W/2)``: each 2x2 block becomes 4 channels
    (channel ``4c + 2i + j`` holds pixel ``(i, j)`` of the block of channel ``c``)."""
    *batch, c, h, w = x.shape
    x = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (n, c, i, j, h/2, w/2)
    return x.reshape(*batch, 4 * c, h // 2, w // 2)


def depth_to_space(y: torch.Tensor) -> torch.Tensor:
    """``(..., 4C, H, W) -> (..., C, 2H, 2W)``, the inverse of :func:`space_to_depth`."""
    *batch, c4, h, w = y.shape
    y = y.reshape(-1, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (n, c, h, i, w, j)
    return y.reshape(*batch, c4 // 4, 2 * h, 2 * w)


class _Reshuffle(Bijector):
    """A fixed rearrangement of pixels that changes the event shape (log-det 0)."""

    domain = IMAGE
    codomain = IMAGE

    def __init__(self, shape, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = check_image_shape(shape)

    def _zero(self, x):
        return x.new_zeros(_batch(x))

    def _call_and_ladj(self, x):
        return self._there(x), self._zero(x)

    def _inverse_and_ladj(self, y):
        x = self._back(y)
        return x, self._zero(x)

    def forward_shape(self, shape):
        return (*shape[:-3], *self._out_shape(tuple(shape[-3:])))

    def inverse_shape(self, shape):
        return (*shape[:-3], *self.event_shape)

    def extra_repr(self):
        return f"shape={self.event_shape}"


class Squeeze(_Reshuffle):
    r"""Space-to-depth: :math:`(C, H, W) \to (4C, H/2, W/2)`, each 2x2 block of pixels
    becomes four channels (Dinh et al., "Real NVP", 2017).  A permutation of the
    entries: log-det 0, both directions a reshape.  ``H`` and ``W`` must be even.
    The inverse is :class:`Unsqueeze`."""

    def __init__(self, shape, cache_size: int = 1):
        super().__init__(shape, cache_size)
        _, h, w = self.event_shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs an even height and width, got shape {self.event_shape}")

    def _out_shape(self, shape):
        c, h, w = shape
        return 4 * c, h // 2, w // 2

    _there = staticmethod(space_to_depth)
    _back = staticmethod(depth_to_space)


class Unsqueeze(_Reshuffle):
    r"""Depth-to-space: :math:`(C, H, W) \to (C/4, 2H, 2W)`, the inverse of
    :class:`Squeeze` (``C`` must be a multiple of 4).  In a generative multi-scale
    flow this is the layer whose normalizing direction squeezes."""

    def __init__(self, shape, cache_size: int = 1):
        super().__init__(shape, cache_size)
        if self.event_shape[0] % 4:
            raise ValueError(f"unsqueeze needs channels divisible by 4, got shape {self.event_shape}")

    def _out_shape(self, shape):
        c, h, w = shape
        return c // 4, 2 * h, 2 * w

    _there = staticmethod(depth_to_space)
    _back = staticmethod(space_to_depth)


def squeeze(shape) -> Squeeze:
    """A :class:`Squeeze` layer (space-to-depth) for images of ``shape = (C, H, W)``."""
    return Squeeze(shape)


def unsqueeze(shape) -> Unsqueeze:
    """An :class:`Unsqueeze` layer (depth-to-space) for images of ``shape = (C, H, W)``."""
    return Unsqueeze(shape)


# --- invertible 1x1 convolution ---------------------------------------------------

def _channels_and_shape(channels, shape):
    if shape is not None:
        shape = check_image_shape(shape)
        if channels is not None and channels != shape[0]:
            raise ValueError(f"channels={channels} disagrees with shape={shape}")
        return shape[0], shape
    channels = 3 if channels is None else channels  # Pyro's default
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return channels, None


class _ChannelLU:
    r"""The 1x1-convolution math, :math:`y_{:,h,w} = W x_{:,h,w}` with :math:`W = P L U`:
    the LU linear layer's functions (:mod:`pyroflows.transforms.linear`) applied to
    the pixels as rows.  ``LU`` holds :math:`L` below the diagonal, :math:`U` above it
    and :math:`\log|U_{dd}|` on it."""

    domain = IMAGE
    codomain = IMAGE

    def _setup(self, channels, shape, permutation):
        self.channels = channels
        self.event_shape = shape
        with torch.no_grad():
            w, _ = torch.linalg.qr(torch.randn(channels, channels))  # a random rotation, as in Glow
            perm, lower, upper, log_abs_diag, sign = lu_decompose(w)
        if permutation is not None:
            perm = torch.as_tensor(permutation).long()
            if perm.shape != (channels,) or not torch.equal(perm.sort().values, torch.arange(channels)):
                raise ValueError(f"permutation must be a rearrangement of 0..{channels - 1}, got {permutation!r}")
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))
        self.register_buffer("diag_sign", sign)
        self.LU = nn.Parameter(lower + upper + torch.diag(log_abs_diag))

    def _mix(self, x, lu, inverse):
        log_abs_diag = torch.diagonal(lu, dim1=-2, dim2=-1)
        lower, upper = lu_factors(lu, lu, log_abs_diag, self.diag_sign)
        rows = x.flatten(-2).mT  # (..., H*W, C)
        if inverse:
            out = lu_solve(rows, lower, upper, self.inverse_permutation)
        else:
            out = lu_matmul(rows, lower, upper, self.permutation)
        out = out.mT.reshape(*out.shape[:-2], *x.shape[-3:])
        ladj = x.shape[-1] * x.shape[-2] * log_abs_diag.sum(-1)
        return out, ladj.expand(out.shape[:-3])


class GeneralizedChannelPermute(_ChannelLU, Bijector):
    r"""Invertible 1x1 convolution (Kingma & Dhariwal, "Glow", 2018), Pyro's
    ``GeneralizedChannelPermute``: every pixel's channel vector is multiplied by

    .. math::

        W = P\,L\,U, \qquad \log|\det J| = H\,W \sum_c \log|U_{cc}|,

    with a fixed permutation :math:`P`, a unit lower-triangular :math:`L` and an
    upper-triangular :math:`U` whose diagonal is :math:`\pm e^{s}` (stored as
    :math:`s`, so :math:`W` stays invertible for any parameter values).  The
    math is the :class:`~pyroflows.transforms.linear.LU` layer's.  Forward: a
    :math:`C \times C` matmul per pixel; inverse: two triangular solves; both cheap.
    Starts at a random rotation (its LU factors), as Glow does.

    Args:
        channels: :math:`C` (``None``, the default: ``shape[0]`` when ``shape`` is given, else Pyro's 3).
        permutation: channel indices of :math:`P` (default: the pivots of the
            random rotation).
        shape: the image shape ``(C, H, W)`` (optional: the layer works for any
            ``H, W``; giving it sets ``event_shape`` for :class:`~pyroflows.Flow`).
    """

    def __init__(self, channels: int | None = None, permutation=None, *, shape=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._setup(*_channels_and_shape(channels, shape), permutation)

    def _call_and_ladj(self, x):
        return self._mix(x, self.LU, inverse=False)

    def _inverse_and_ladj(self, y):
        return self._mix(y, self.LU, inverse=True)


class ConditionalGeneralizedChannelPermute(_ChannelLU, ConditionalBijector):
    r"""Invertible 1x1 convolution whose :math:`L, U` depend on a context :math:`c`:
    the dense ``LU`` parameter plus :math:`\mathrm{MLP}(c)` (last layer
    zero-initialised, so the layer starts unconditional).  The same math and
    costs as :class:`GeneralizedChannelPermute`; the permutation is fixed.
    """

    def __init__(self, context_dim: int, channels: int | None = None, hidden_dims: Sequence[int] | None = None,
                 *, shape=None, permutation=None):
        super().__init__()
        channels, shape = _channels_and_shape(channels, shape)
        self._setup(channels, shape, permutation)
        self.context_dim = check_context_dim(context_dim)
        hidden_dims = [channels * 10, channels * 10] if hidden_dims is None else hidden_dims
        self.net = MLP(self.context_dim, channels * channels, hidden_dims)

    def _lu(self, context):
        return self.LU + self.net(context).unflatten(-1, (self.channels, self.channels))

    def _call_and_ladj(self, x, context):
        return self._mix(x, self._lu(context), inverse=False)

    def _inverse_and_ladj(self, y, context):
        return self._mix(y, self._lu(context), inverse=True)


def _channels_of(channels: int, shape) -> int | None:
    """Pyro's ``channels`` (default 3), unless ``shape`` gives the image: then its ``C``."""
    if shape is None:
        return channels
    if channels not in (3, shape[0]):
        raise ValueError(f"channels={channels} disagrees with the image shape {tuple(shape)}")
    return None  # the layer reads C from shape


def generalized_channel_permute(*, channels: int = 3, permutation=None, shape=None) -> GeneralizedChannelPermute:
    """A :class:`GeneralizedChannelPermute` (invertible 1x1 convolution), Pyro's helper
    (Pyro's ``generalized_channel_permute(**kwargs)``: ``channels=3``, ``permutation``).
    With ``shape=(C, H, W)`` the channels are ``C``."""
    return GeneralizedChannelPermute(_channels_of(channels, shape), permutation, shape=shape)


def conditional_generalized_channel_permute(context_dim: int, channels: int = 3,
                                            hidden_dims: Sequence[int] | None = None, *,
                                            shape=None) -> ConditionalGeneralizedChannelPermute:
    """A :class:`ConditionalGeneralizedChannelPermute`, Pyro's helper (``hidden_dims``
    defaults to ``[10 C, 10 C]`` as in Pyro).  With ``shape=(C, H, W)`` the channels are ``C``."""
    return ConditionalGeneralizedChannelPermute(context_dim, _channels_of(channels, shape), hidden_dims,
                                                shape=shape)


# --- coupling with a convolutional conditioner ------------------------------------

class ConvCoupling(Bijector):
    r"""Coupling over channels with a convolutional conditioner (Glow's affine
    coupling; any transformer kind).

    Split the channels :math:`x = (x_a, x_b)` (the first :math:`\lfloor C/2
    \rfloor` and the rest; ``parity=1`` swaps which half is transformed), then

    .. math::

        y_a = x_a, \qquad y_b = g(x_b;\ \theta = \mathrm{CNN}(x_a)), \qquad
        \log|\det J| = \sum_{c,h,w} \log g'(x_{b,chw}).

    The network's last layer starts at zero and its output is offset by the
    transformer's identity parameters, so the layer starts at the identity.
    Both directions cost one network pass.  Reference: Kingma & Dhariwal,
    "Glow", 2018; Dinh et al., "Real NVP", 2017.

    Args:
        shape: ``(C, H, W)``, ``C >= 2``.
        transformer: the monotone map :math:`g` (a kind name or a
            :class:`~pyroflows.transforms.transformers.Transformer`).
        hidden_channels: widths of the conditioner's hidden layers.
        parity: 0 transforms the second half, 1 the first.
    """

    domain = IMAGE
    codomain = IMAGE

    def __init__(self, shape, transformer: Transformer | str = "affine", hidden_channels: Sequence[int] = (64, 64),
                 parity: int = 0, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = check_image_shape(shape)
        c = self.event_shape[0]
        if c < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels (one half conditions the other), "
                             f"got shape {self.event_shape}; squeeze first")
        self.transformer = make_transformer(transformer)
        self.parity = int(parity) % 2
        first = c // 2
        self._split = first
        n_keep, n_change = (first, c - first) if self.parity == 0 else (c - first, first)
        self._num_params = self.transformer.num_params
        self.net = ConvNet(n_keep, n_change * self._num_params, tuple(hidden_channels))
        offset = self.transformer.identity_params()
        self.register_buffer("param_offset", offset if bool(offset.ne(0).any()) else None)

    def _couple(self, x, transform):
        a, b = x[..., :self._split, :, :], x[..., self._split:, :, :]
        keep, change = (a, b) if self.parity == 0 else (b, a)
        params = self.net(keep).unflatten(-3, (-1, self._num_params)).movedim(-3, -1)
        if self.param_offset is not None:
            params = params + self.param_offset
        out, ladj = transform(change, params)
        y = torch.cat([keep, out] if self.parity == 0 else [out, keep], dim=-3)
        return y, ladj.sum((-3, -2, -1))

    def _call_and_ladj(self, x):
        return self._couple(x, self.transformer.forward)

    def _inverse_and_ladj(self, y):
        return self._couple(y, self.transformer.inverse)

    def extra_repr(self):
        return f"shape={self.event_shape}, transformer={self.transformer!r}, parity={self.parity}"


def conv_affine_coupling(shape, hidden_channels: Sequence[int] = (64, 64), parity: int = 0) -> ConvCoupling:
    """Glow's affine coupling: a :class:`ConvCoupling` with the affine transformer."""
    return ConvCoupling(shape, "affine", hidden_channels, parity)


def conv_spline_coupling(shape, kind: str | Transformer = DEFAULT_SPLINE, count_bins: int = 8,
                         bound: float = 5.0, hidden_channels: Sequence[int] = (64, 64),
                         parity: int = 0) -> ConvCoupling:
    """A :class:`ConvCoupling` with any transformer ``kind`` (default: the
    rational-quadratic spline with ``count_bins`` bins on ``[-bound, bound]``)."""
    return ConvCoupling(shape, make_transformer(kind, count_bins, bound), hidden_channels, parity)


# --- actnorm ----------------------------------------------------------------------

class ChannelActNorm(ActNorm):
    r"""Activation normalization over channels (Glow): one scale and shift per
    channel, shared by all pixels,

    .. math:: y = e^{s_c} x_{chw} + t_c, \qquad \log|\det J| = H W \sum_c s_c.

    The :class:`~pyroflows.transforms.normalization.ActNorm` layer with image
    parameters: the first batch in the normalizing direction sets
    :math:`t, s` so that each channel has zero mean and unit variance over the
    batch and the pixels.  Both directions :math:`O(CHW)`.
    """

    domain = IMAGE
    codomain = IMAGE

    def __init__(self, shape, eps: float = 1e-6, cache_size: int = 1):
        Bijector.__init__(self, cache_size=cache_size)
        self._setup(check_image_shape(shape), eps)

    def extra_repr(self):
        return f"shape={self.event_shape}, initialized={bool(self.initialized)}"


def channel_actnorm(shape) -> ChannelActNorm:
    """A :class:`ChannelActNorm` layer for images of ``shape = (C, H, W)``."""
    return ChannelActNorm(shape)
