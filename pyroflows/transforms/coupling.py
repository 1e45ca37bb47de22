r"""Coupling layers (Prince, *Understanding Deep Learning*, eqs. 16.13-16.14).

Split :math:`x = (x_a, x_b)` with a fixed mask; :math:`x_a` passes unchanged
and conditions the transformer applied to :math:`x_b`:

.. math::

    y_a = x_a, \qquad y_b = g(x_b;\, \theta(x_a)), \qquad
    \log|\det J| = \sum_{d \in b} \log g'(x_{b,d};\, \theta(x_a)).

The Jacobian is block triangular, and since :math:`x_a = y_a` both
directions cost one conditioner pass.  Any transformer kind works:
additive is NICE (Dinh et al., 2015), affine is RealNVP (Dinh et al., 2017),
a rational-quadratic spline is the coupling neural spline flow (Durkan et
al., 2019).  The mask logic (:func:`half_mask`, :class:`MaskSplit`) lives here
once; the layers only call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import MLP
from .base import Bijector, ConditionalBijector
from .elementwise import check_input_dim
from .transformers import KINDS, Transformer, make_transformer, spline_kind

__all__ = [
    "ConditionalCoupling",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
    "conditional_spline_coupling",
    "spline_coupling",
]

#: The default transformer of the spline helpers: the rational-quadratic spline when present.
DEFAULT_SPLINE = "rq_spline" if "rq_spline" in KINDS else "piecewise_linear"


def half_mask(input_dim: int, flip: bool = False) -> torch.Tensor:
    """Boolean mask, ``True`` = passes unchanged: the first ``D // 2`` dimensions,
    or the others with ``flip=True`` (alternate it between layers)."""
    first = coupling_mask(input_dim)
    return ~first if flip else first


def default_hidden(input_dim: int) -> tuple[int, int]:
    """Default conditioner widths of the layer helpers: two hidden layers of ``max(32, 10 * D)`` units
    (Pyro scales its defaults with ``D`` the same way)."""
    return (max(32, 10 * input_dim),) * 2


def _as_range(idx: torch.Tensor):
    """``(start, stop)`` if ``idx`` is a run of consecutive integers, else ``None``."""
    start = int(idx[0])
    if torch.equal(idx, torch.arange(start, start + idx.numel())):
        return start, start + idx.numel()
    return None


class MaskSplit(nn.Module):
    """Split ``x`` into ``(x[..., mask], x[..., ~mask])`` and merge back.

    Contiguous halves (what :func:`half_mask` makes) are sliced as views and
    merged with one ``cat``; any other mask uses an index gather and one
    ``cat`` followed by a fixed permutation.
    """

    def __init__(self, mask: Sequence[bool] | torch.Tensor):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.all() or not mask.any():
            raise ValueError("a coupling mask must contain both True (unchanged) and False (transformed) entries")
        self.register_buffer("mask", mask)
        idx_a, idx_b = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        self.num_kept, self.num_transformed = idx_a.numel(), idx_b.numel()
        self.register_buffer("idx_a", idx_a)
        self.register_buffer("idx_b", idx_b)
        self.register_buffer("unsplit", torch.argsort(torch.cat([idx_a, idx_b])))
        ra, rb = _as_range(idx_a), _as_range(idx_b)
        self._ranges = (ra, rb) if ra is not None and rb is not None else None

    def split(self, x):
        if self._ranges is not None:
            (a0, a1), (b0, b1) = self._ranges
            return x[..., a0:a1], x[..., b0:b1]
        return x[..., self.idx_a], x[..., self.idx_b]

    def merge(self, a, b):
        if a.shape[:-1] != b.shape[:-1]:  # a context with a larger batch shape broadcast into b
            a = a.expand(*b.shape[:-1], a.shape[-1])
        if self._ranges is not None:
            return torch.cat([a, b] if self._ranges[0][0] == 0 else [b, a], dim=-1)
        return torch.cat([a, b], dim=-1)[..., self.unsplit]


class _CouplingMath:
    """The coupling computation, shared by :class:`Coupling` and :class:`ConditionalCoupling`."""

    def _setup(self, transformer: Transformer, conditioner: nn.Module, mask, identity: bool = True):
        self.transformer = transformer
        self.conditioner = conditioner
        self.split = MaskSplit(mask)
        self.event_shape = (self.split.mask.numel(),)
        self._num_params = transformer.num_params
        offset = transformer.identity_params()
        # zero identity parameters (affine, additive) need no offset at all
        self.register_buffer("param_offset", offset if bool(offset.ne(0).any()) else None)
        # identity=False: the conditioning half gets its own unconditional transformer (Pyro's
        # SplineCoupling), starting at the identity
        self.identity = bool(identity)
        self.kept_params = None if self.identity else nn.Parameter(
            offset.expand(self.split.num_kept, self._num_params).clone())

    def _couple(self, x, context, transform, inverse: bool = False):
        """``transform`` (the transformer's forward or inverse) applied to ``x``'s halves; the
        conditioner always sees the data-side (``x``-side) conditioning half."""
        ua, ub = self.split.split(x)
        va, ladj_a = ua, None
        if self.kept_params is not None:
            va, ladj_a = transform(ua, self.kept_params.expand(*ua.shape[:-1], -1, -1))
        xa = va if inverse else ua
        h = xa
        if context is not None:
            batch = torch.broadcast_shapes(xa.shape[:-1], context.shape[:-1])
            h = torch.cat([xa.expand(*batch, xa.shape[-1]), context.expand(*batch, context.shape[-1])], dim=-1)
        params = self.conditioner(h).unflatten(-1, (self.split.num_transformed, self._num_params))
        if self.param_offset is not None:
            params = params + self.param_offset
        vb, ladj = transform(ub, params)
        ladj = ladj.sum(-1)
        if ladj_a is not None:
            ladj = ladj + ladj_a.sum(-1)
        return self.split.merge(va, vb), ladj

    def extra_repr(self):
        return f"{self.transformer!r}, mask={self.split.mask.int().tolist()}"


class Coupling(_CouplingMath, Bijector):
    r"""Coupling layer :math:`y_a = x_a,\ y_b = g(x_b; \theta(x_a))` (with ``identity=False``:
    :math:`y_a = g(x_a; \phi)`, unconditional learned parameters :math:`\phi`, as Pyro's
    ``SplineCoupling``).

    Both directions are one conditioner pass (the inverse
    :math:`x_b = g^{-1}(y_b; \theta(y_a))` needs only :math:`y_a = x_a`);
    the log-determinant is the sum of the transformer's log-derivatives over
    the transformed half.  The conditioner's output is offset by the
    transformer's identity parameters, so a zero-initialised last layer starts
    the layer at the identity.

    Args:
        transformer: the monotone map :math:`g` (any
            :class:`~pyroflows.transforms.transformers.Transformer`).
        conditioner: a module mapping ``(..., n_a)`` to
            ``(..., n_b * transformer.num_params)``.
        mask: boolean ``(D,)``, ``True`` = conditions (and passes unchanged unless
            ``identity=False``).
        identity: ``False`` gives the conditioning half its own elementwise transformer with
            unconditional parameters (starting at the identity; its log-derivatives join
            the log-determinant).

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(self, transformer: Transformer, conditioner: nn.Module, mask, cache_size: int = 1, *,
                 identity: bool = True):
        super().__init__(cache_size=cache_size)
        self._setup(transformer, conditioner, mask, identity)

    def _call_and_ladj(self, x):
        return self._couple(x, None, self.transformer.forward)

    def _inverse_and_ladj(self, y):
        return self._couple(y, None, self.transformer.inverse, inverse=True)


class ConditionalCoupling(_CouplingMath, ConditionalBijector):
    r"""Conditional coupling layer :math:`y_b = g(x_b; \theta(x_a, c))`.

    As :class:`Coupling`, with the context :math:`c` of shape
    ``(..., context_dim)`` concatenated to the conditioner input (its batch
    shape broadcasts against that of ``x``).  Both directions are one
    conditioner pass.

    Args:
        transformer, mask: as in :class:`Coupling`.
        conditioner: a module mapping ``(..., n_a + context_dim)`` to
            ``(..., n_b * transformer.num_params)``.
        context_dim: width of the context.
    """

    def __init__(self, transformer: Transformer, conditioner: nn.Module, mask, context_dim: int):
        super().__init__()
        self._setup(transformer, conditioner, mask)
        self.context_dim = int(context_dim)

    def _call_and_ladj(self, x, context):
        return self._couple(x, context, self.transformer.forward)

    def _inverse_and_ladj(self, y, context):
        return self._couple(y, context, self.transformer.inverse, inverse=True)


def coupling_mask(input_dim: int, split_dim: int | None = None, dim: int = -1, mask=None) -> torch.Tensor:
    """The boolean mask (``True`` = passes unchanged) of Pyro's ``split_dim``: the first
    ``split_dim`` dimensions (default ``input_dim // 2``) condition the rest; an explicit
    ``mask`` wins.  ``dim`` is the event dimension to split (only ``-1``: vectors)."""
    check_input_dim(input_dim)
    if dim != -1:
        raise ValueError(f"only dim=-1 (the last, vector event dimension) is supported, got dim={dim!r}")
    if mask is not None:
        if split_dim is not None:
            raise ValueError("pass either split_dim or mask, not both")
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.numel() != input_dim:
            raise ValueError(f"mask has {mask.numel()} entries but input_dim is {input_dim}")
        return mask
    if input_dim < 2:
        raise ValueError(f"a coupling layer needs input_dim >= 2 (one half must condition the other), "
                         f"got {input_dim}")
    split_dim = input_dim // 2 if split_dim is None else split_dim
    if isinstance(split_dim, bool) or not isinstance(split_dim, int) or not 0 < split_dim < input_dim:
        raise ValueError(f"split_dim must be an int in [1, input_dim - 1] = [1, {input_dim - 1}], got {split_dim!r}")
    return torch.arange(input_dim) < split_dim


def build_coupling(input_dim, kind, count_bins, bound, hidden_dims, mask, context_dim=None, identity: bool = True):
    """A coupling layer (conditional when ``context_dim`` is given) with an MLP conditioner
    over the boolean ``mask`` (``True`` = conditions, see :func:`coupling_mask`; passes
    unchanged unless ``identity=False``)."""
    transformer = make_transformer(kind, count_bins, bound)
    n_a = int(mask.sum())
    net = MLP(n_a + (context_dim or 0), (input_dim - n_a) * transformer.num_params,
              default_hidden(input_dim) if hidden_dims is None else hidden_dims)
    if context_dim is None:
        return Coupling(transformer, net, mask, identity=identity)
    if not identity:
        raise ValueError("identity=False (a transformer on the conditioning half) is for unconditional couplings")
    return ConditionalCoupling(transformer, net, mask, context_dim)


def spline_coupling(input_dim: int, split_dim: int | None = None, hidden_dims: Sequence[int] | None = None,
                    count_bins: int = 8, bound: float = 3.0, *, order: str = "linear",
                    kind: str | Transformer | None = None, mask=None, identity: bool = False) -> Coupling:
    r"""Pyro's ``spline_coupling`` (its ``SplineCoupling``): the coupling neural spline flow
    of Durkan et al. 2019,

    .. math:: y_a = h(x_a;\ \phi), \qquad y_b = g(x_b;\ \theta(x_a)),

    where the first ``split_dim`` dimensions (default ``input_dim // 2``) :math:`x_a` condition,
    through an :class:`~pyroflows.nn.MLP`, a monotone rational spline :math:`g` (``order``
    ``"linear"`` or ``"quadratic"``, Pyro's) on the rest, and, as in Pyro, pass through their
    own unconditional spline :math:`h` with learned parameters :math:`\phi` (``identity=True``
    leaves them unchanged instead, the plain coupling layer).  Both splines start at the
    identity.  Ours on top: ``kind=`` any transformer (overrides ``order``), ``mask=`` any
    split.  Both directions one pass."""
    kind = spline_kind(order) if kind is None else kind
    return build_coupling(input_dim, kind, count_bins, bound, hidden_dims,
                          coupling_mask(input_dim, split_dim, -1, mask), identity=identity)


def affine_coupling(input_dim: int, hidden_dims: Sequence[int] | None = None, split_dim: int | None = None,
                    dim: int = -1, *, mask=None) -> Coupling:
    """Pyro's ``affine_coupling``: the RealNVP affine coupling layer (Dinh et al., 2017),
    softly clamped log-scale; both directions one pass."""
    return build_coupling(input_dim, "affine", 8, 5.0, hidden_dims, coupling_mask(input_dim, split_dim, dim, mask))


def additive_coupling(input_dim: int, hidden_dims: Sequence[int] | None = None, split_dim: int | None = None,
                      dim: int = -1, *, mask=None) -> Coupling:
    """The NICE additive (volume-preserving) coupling layer (Dinh et al., 2015)."""
    return build_coupling(input_dim, "additive", 8, 5.0, hidden_dims, coupling_mask(input_dim, split_dim, dim, mask))


def conditional_spline_coupling(input_dim: int, context_dim: int, split_dim: int | None = None,
                                hidden_dims: Sequence[int] | None = None, count_bins: int = 8,
                                bound: float = 3.0, *, order: str = "linear",
                                kind: str | Transformer | None = None, mask=None) -> ConditionalCoupling:
    """Conditional twin of :func:`spline_coupling` (context concatenated to the conditioner input)."""
    kind = spline_kind(order) if kind is None else kind
    return build_coupling(input_dim, kind, count_bins, bound, hidden_dims,
                          coupling_mask(input_dim, split_dim, -1, mask), context_dim)


def conditional_affine_coupling(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                split_dim: int | None = None, dim: int = -1, *, mask=None) -> ConditionalCoupling:
    """Pyro's ``conditional_affine_coupling``: conditional twin of :func:`affine_coupling`."""
    return build_coupling(input_dim, "affine", 8, 5.0, hidden_dims, coupling_mask(input_dim, split_dim, dim, mask),
                          context_dim)


def conditional_additive_coupling(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                  split_dim: int | None = None, dim: int = -1, *, mask=None) -> ConditionalCoupling:
    """Conditional twin of :func:`additive_coupling`."""
    return build_coupling(input_dim, "additive", 8, 5.0, hidden_dims,
                          coupling_mask(input_dim, split_dim, dim, mask), context_dim)
