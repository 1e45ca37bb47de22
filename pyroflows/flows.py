"""Named flow architectures: each a function ``name(input_dim, **kw) -> Flow``.

``context_dim=`` makes an architecture conditional where that makes sense
(the flow is then called as ``flow(context)``).

Coupling architectures alternate which half is transformed (free) and put a
fresh random permutation (from torch's generator: ``pyro.set_rng_seed``
reproduces it) between consecutive layers when ``input_dim > 2``
(``mixing="permute"``, free) so every pair of dimensions eventually
interacts; ``mixing="lu"`` puts a learned LU linear layer there instead (Glow's
generalised permutation, Kingma & Dhariwal 2018; one D x D matmul, and a
triangular solve when sampling); ``mixing="alternate"`` uses the alternating
halves alone (fastest).
Autoregressive architectures alternate the MADE ordering (natural,
reversed), which costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .flow import Flow
from .nn import MADE
from .transforms.autoregressive import (
    ConditionalInverseAutoregressive,
    ConditionalMaskedAutoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
)
from .transforms.coupling import DEFAULT_SPLINE, build_coupling, half_mask
from .transforms.elementwise import check_input_dim, elementwise
from .transforms.linear import lu
from .transforms.permutation import permute
from .transforms.transformers import Inverted, Transformer, make_transformer
from .transforms.planar import ConditionalPlanar as _ConditionalPlanar
from .transforms.planar import ConditionalRadial as _ConditionalRadial
from .transforms.planar import ConditionalSylvester as _ConditionalSylvester
from .transforms.planar import Planar as _Planar
from .transforms.planar import Radial as _Radial
from .transforms.planar import Sylvester as _Sylvester
from .transforms.residual import InvertibleResidual as _InvertibleResidual

__all__ = ["iaf", "maf", "nice", "nsf", "realnvp"]


def _check(input_dim, num_layers):
    check_input_dim(input_dim)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")


def _coupling_flow(input_dim, kind, num_layers, hidden_dims, context_dim, count_bins, bound, mixing, final=None):
    _check(input_dim, num_layers)
    if input_dim < 2:
        raise ValueError(f"coupling flows need input_dim >= 2, got {input_dim}; use maf/iaf or an elementwise flow")
    if mixing not in ("permute", "lu", "alternate"):
        raise ValueError(f"mixing must be 'permute', 'lu' or 'alternate', got {mixing!r}")
    layers = []
    for i in range(num_layers):
        if i > 0 and mixing == "permute" and input_dim > 2:
            layers.append(permute(input_dim))
        elif i > 0 and mixing == "lu":
            layers.append(lu(input_dim))
        layers.append(build_coupling(input_dim, kind, count_bins, bound, hidden_dims, half_mask(input_dim, i % 2 == 1),
                                     context_dim))
    if final is not None:
        layers.append(final)
    return Flow(layers)


def nice(input_dim: int, *, num_layers: int = 4, hidden_dims: Sequence[int] = (64, 64),
         context_dim: int | None = None, mixing: str = "permute") -> Flow:
    """NICE (Dinh et al., 2015): additive (volume-preserving) couplings followed by a
    learned diagonal scaling; both directions one pass per layer."""
    return _coupling_flow(input_dim, "additive", num_layers, hidden_dims, context_dim, 8, 5.0, mixing,
                          final=elementwise(input_dim, kind="affine"))


def realnvp(input_dim: int, *, num_layers: int = 6, hidden_dims: Sequence[int] = (64, 64),
            context_dim: int | None = None, mixing: str = "permute") -> Flow:
    """RealNVP (Dinh et al., 2017): affine couplings (softly clamped log-scales);
    both directions one pass per layer."""
    return _coupling_flow(input_dim, "affine", num_layers, hidden_dims, context_dim, 8, 5.0, mixing)


def nsf(input_dim: int, *, num_layers: int = 4, hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None, count_bins: int = 8, bound: float = 5.0,
        kind: str | Transformer = DEFAULT_SPLINE, autoregressive: bool = False,
        mixing: str = "permute", direction: str = "normalizing") -> Flow:
    """Neural spline flow (Durkan et al., 2019): spline couplings (both directions one
    pass per layer), or with ``autoregressive=True`` MAF layers with spline
    transformers (one-pass density, sequential sampling).  1-D inputs use the
    autoregressive form (a coupling cannot split one dimension).

    ``direction="normalizing"`` (default) applies the spline on the scoring side,
    data to base (:class:`~pyroflows.transforms.transformers.Inverted`), as zuko
    and nflows do; it fits the 2-D toy densities better than
    ``direction="generative"`` (``docs/bench_quality_2d.md``)."""
    if direction not in ("normalizing", "generative"):
        raise ValueError(f"direction must be 'normalizing' or 'generative', got {direction!r}")
    if direction == "normalizing":
        kind = Inverted(make_transformer(kind, count_bins, bound))
    if autoregressive or input_dim == 1:
        return _autoregressive_flow(MaskedAutoregressive, ConditionalMaskedAutoregressive, input_dim, kind,
                                    num_layers, hidden_dims, context_dim, count_bins, bound)
    return _coupling_flow(input_dim, kind, num_layers, hidden_dims, context_dim, count_bins, bound, mixing)


def _autoregressive_flow(cls, conditional_cls, input_dim, kind, num_layers, hidden_dims, context_dim, count_bins,
                         bound, input_bound=None):
    _check(input_dim, num_layers)
    layers = []
    for i in range(num_layers):
        transformer = make_transformer(kind, count_bins, bound)
        made = MADE(input_dim, transformer.num_params, hidden_dims, context_dim=context_dim,
                    permutation="natural" if i % 2 == 0 else "reverse", input_bound=input_bound)
        layers.append(cls(transformer, made) if context_dim is None else conditional_cls(transformer, made))
    return Flow(layers)


def maf(input_dim: int, *, num_layers: int = 5, hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None, kind: str | Transformer = "affine", count_bins: int = 8,
        bound: float = 5.0) -> Flow:
    """Masked autoregressive flow (Papamakarios et al., 2017): ``log_prob`` is one MADE
    pass per layer, sampling is sequential (``input_dim`` passes per layer)."""
    return _autoregressive_flow(MaskedAutoregressive, ConditionalMaskedAutoregressive, input_dim, kind,
                                num_layers, hidden_dims, context_dim, count_bins, bound)


def iaf(input_dim: int, *, num_layers: int = 5, hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None, kind: str | Transformer = "affine", count_bins: int = 8,
        bound: float = 5.0, input_bound: float | None = None) -> Flow:
    """Inverse autoregressive flow (Kingma et al., 2016): sampling (and ``log_prob`` of
    its own samples) is one MADE pass per layer; scoring new data is sequential.
    The natural choice for variational posteriors (SVI guides).  ``input_bound``: see
    :class:`~pyroflows.nn.MADE` (conditioners that keep a heavy-tailed base's tails)."""
    return _autoregressive_flow(InverseAutoregressive, ConditionalInverseAutoregressive, input_dim, kind,
                                num_layers, hidden_dims, context_dim, count_bins, bound, input_bound)


# ----------------------------------------------------------------------------
# Residual flows and the classic VAE-posterior flows (planar, radial, Sylvester)
# ----------------------------------------------------------------------------

__all__ += ["iresnet", "planar", "radial", "residual_flow", "sylvester"]


def _no_context(name, context_dim):
    if context_dim is not None:
        raise ValueError(f"{name} has no conditional version (context_dim must be None)")


def iresnet(input_dim: int, *, num_blocks: int = 4, hidden_dims: Sequence[int] = (64, 64), coeff: float = 0.9,
            log_det: str = "series", n_terms: int = 5, context_dim: int | None = None, **kw) -> Flow:
    r"""i-ResNet (Behrmann et al. 2019): ``num_blocks`` :class:`InvertibleResidual` blocks
    with the truncated power-series log-det (biased; pass ``log_det="exact"`` in
    low dimensions).  Scoring is the cheap direction (one residual pass per
    block); sampling solves a fixed point per block."""
    _no_context("iresnet", context_dim)
    kw.setdefault("cheap", "inverse")
    return Flow([_InvertibleResidual(input_dim, hidden_dims, coeff, log_det, n_terms=n_terms, **kw)
                  for _ in range(num_blocks)])


def residual_flow(input_dim: int, *, num_blocks: int = 4, hidden_dims: Sequence[int] = (64, 64),
                  coeff: float = 0.98, log_det: str = "roulette", n_exact_terms: int = 2,
                  context_dim: int | None = None, **kw) -> Flow:
    r"""Residual Flow (Chen et al. 2019): :class:`InvertibleResidual` blocks with LipSwish,
    the unbiased Russian-roulette log-det and its Neumann-series gradient.
    Scoring is the cheap direction; sampling solves a fixed point per block."""
    _no_context("residual_flow", context_dim)
    kw.setdefault("cheap", "inverse")
    return Flow([_InvertibleResidual(input_dim, hidden_dims, coeff, log_det,
                                               n_exact_terms=n_exact_terms, **kw)
                  for _ in range(num_blocks)])


def planar(input_dim: int, *, num_layers: int = 8, context_dim: int | None = None, **kw) -> Flow:
    """A stack of planar layers (Rezende & Mohamed 2015); conditional with ``context_dim``."""
    if context_dim is None:
        return Flow([_Planar(input_dim, **kw) for _ in range(num_layers)])
    return Flow([_ConditionalPlanar(input_dim, context_dim, **kw) for _ in range(num_layers)])


def radial(input_dim: int, *, num_layers: int = 8, context_dim: int | None = None, **kw) -> Flow:
    """A stack of radial layers (Rezende & Mohamed 2015); conditional with ``context_dim``."""
    if context_dim is None:
        return Flow([_Radial(input_dim, **kw) for _ in range(num_layers)])
    return Flow([_ConditionalRadial(input_dim, context_dim, **kw) for _ in range(num_layers)])


def sylvester(input_dim: int, *, num_layers: int = 4, variant: str = "orthogonal",
              num_vectors: int | None = None, context_dim: int | None = None, **kw) -> Flow:
    """A stack of Sylvester layers (van den Berg et al. 2018); the triangular variant
    alternates the identity and the reversal permutation.  Conditional with ``context_dim``."""
    layers = []
    for k in range(num_layers):
        if variant == "triangular":
            kw["flip"] = k % 2 == 1
        if context_dim is None:
            layers.append(_Sylvester(input_dim, num_vectors, variant, **kw))
        else:
            layers.append(_ConditionalSylvester(input_dim, context_dim, num_vectors, variant, **kw))
    return Flow(layers)


__all__ += ["ffjord"]


def ffjord(input_dim: int, *, num_layers: int = 1, hidden_dims: Sequence[int] = (64, 64),
           context_dim: int | None = None, trace: str = "auto", **kw) -> Flow:
    """FFJORD (Grathwohl et al. 2019): ``num_layers`` continuous normalizing flows in a row,
    each a neural ODE with an MLP vector field ``hidden_dims`` wide (tanh).

    ``trace="auto"`` uses the exact divergence up to 8 dimensions and Hutchinson's
    estimator above; further keywords (``method``, ``rtol``, ``atol``,
    ``max_num_steps``, ``adjoint``, ``kinetic_energy``, ``jacobian_norm``,
    ``activation``) go to :class:`~pyroflows.transforms.ContinuousFlow`.  Both
    directions cost one ODE solve.  Conditional with ``context_dim``.  Needs
    the ``ode`` extra (torchdiffeq).
    """
    from .transforms.continuous import ConditionalContinuousFlow, ContinuousFlow

    check_input_dim(input_dim)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if context_dim is None:
        return Flow([ContinuousFlow(input_dim, hidden_dims, trace=trace, **kw) for _ in range(num_layers)])
    return Flow([ConditionalContinuousFlow(input_dim, context_dim, hidden_dims, trace=trace, **kw)
                 for _ in range(num_layers)])


# ----------------------------------------------------------------------------
# Glow: a multi-scale flow over images, one Pyro distribution
# ----------------------------------------------------------------------------

__all__ += ["glow"]


def glow(image_shape, levels: int = 3, steps: int = 8, hidden_channels: int | Sequence[int] = 128, *,
         kind: str | Transformer = "affine", count_bins: int = 8, bound: float = 5.0,
         learn_prior: bool = True, dequantization: str = "uniform", num_values: int = 256,
         memory_saving: bool = False, context_dim: int | None = None) -> Flow:
    r"""Glow (Kingma & Dhariwal, 2018): a multi-scale flow
    (:func:`~pyroflows.transforms.multi_scale`) over images of ``image_shape =
    (C, H, W)``, ``levels`` levels of ``steps`` steps (ActNorm, invertible 1x1
    convolution, coupling of transformer ``kind`` with a convolutional
    conditioner of two hidden layers of ``hidden_channels``), half the channels
    factored out per level with learned conditional Gaussian priors.

    The result is one :class:`~pyroflows.Flow` on images in :math:`[0, 1)`
    (``flow.log_prob``, ``sample``, ``rsample``, usable as a prior in a Pyro
    model).  ``flow.dequantizer`` maps integer images with ``num_values`` grey
    levels into that range: ``dequantization="uniform"`` or ``"variational"``
    (Flow++); see :mod:`pyroflows.images` for bits/dim, temperature sampling and
    interpolation.  ``memory_saving=True`` recomputes activations in the
    backward pass (training memory independent of depth).  Both directions are
    one pass per layer."""
    from .images import UniformDequantization, VariationalDequantization
    from .transforms.image import check_image_shape
    from .transforms.multiscale import multi_scale

    if context_dim is not None:
        raise ValueError("glow has no conditional version yet (context_dim must be None)")
    shape = check_image_shape(image_shape)
    hidden = (hidden_channels,) * 2 if isinstance(hidden_channels, int) else tuple(hidden_channels)
    layer = multi_scale(shape, levels, steps, hidden, kind=kind, count_bins=count_bins, bound=bound,
                        learn_prior=learn_prior)
    flow = Flow(layer, memory_saving=memory_saving) if memory_saving else Flow(layer)
    if dequantization == "uniform":
        flow.dequantizer = UniformDequantization(num_values)
    elif dequantization == "variational":
        flow.dequantizer = VariationalDequantization(shape, num_values)
    else:
        raise ValueError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
    return flow


# ----------------------------------------------------------------------------
# Elementwise flows (1-D data) and the registry of named architectures
# ----------------------------------------------------------------------------

#: Transformer kinds whose density is piecewise constant with knots that move with the
#: parameters: used in the generative direction, a point crossing a moving knot jumps in
#: log-density, which the gradient cannot see, and maximum likelihood drifts.  In the
#: normalizing direction the knots sit at fixed places in the data space and the
#: likelihood is smooth in the parameters, so such layers are placed inverted.
NORMALIZING_DIRECTION_KINDS = ("piecewise_linear",)


def best_elementwise_kind() -> str:
    """The most flexible elementwise transformer available (a spline once it exists)."""
    from .transforms.transformers import KINDS

    return next((k for k in ("rq_spline", "rational_quadratic", "cubic_spline", "piecewise_quadratic")
                 if k in KINDS), "piecewise_linear")


def elementwise_flow(input_dim: int, *, kind: str | None = None, num_layers: int = 2,
                     count_bins: int = 32, bound: float = 4.0) -> Flow:
    """A composition of elementwise layers (eq. 16.2): ``num_layers`` times an
    affine layer followed by ``elementwise(input_dim, kind)`` with ``count_bins`` bins
    on ``[-bound, bound]``.  It models each dimension's marginal only (the
    default for 1-D data); both directions are one pass per layer.

    ``kind`` defaults to :func:`best_elementwise_kind`.  A piecewise-linear
    layer is used through its inverse (``layer.inv``), so that its equal-width
    bins lie in the data space of the normalizing direction (see
    :data:`NORMALIZING_DIRECTION_KINDS`); its parameters stay registered on
    the flow as ``flow.inverted``.
    """
    from torch import nn

    _check(input_dim, num_layers)
    kind = kind or best_elementwise_kind()
    stack, inverted = [], []
    for _ in range(num_layers):
        layer = elementwise(input_dim, kind=kind, count_bins=count_bins, bound=bound)
        if kind in NORMALIZING_DIRECTION_KINDS:
            inverted.append(layer)
            layer = layer.inv
        stack += [elementwise(input_dim, kind="affine"), layer]
    flow = Flow(stack, event_shape=(input_dim,))
    if inverted:
        flow.inverted = nn.ModuleList(inverted)  # Pyro's .inv wrapper is not a module
    return flow


#: The one registry of named architectures: name -> builder ``(input_dim, **kw) -> Flow``.
#: :func:`make_flow`, the CLI's ``--flow`` and ``AutoFlow(model, flow="name")`` all
#: read it.  It holds every architecture in ``__all__`` above; add one with
#: :func:`register_flow`.
REGISTRY: dict[str, Callable[..., Flow]] = {}

#: Architectures tried, in order, by the name ``"auto"`` (data of two or more dimensions).
PREFERRED = ("nsf", "realnvp", "maf")


def register_flow(name: str, builder: Callable[..., Flow], *, replace: bool = False) -> None:
    """Add ``builder`` (``(input_dim, **kw) -> Flow``) to :data:`REGISTRY` as ``name``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"an architecture name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    if name in REGISTRY and not replace:
        raise ValueError(f"architecture {name!r} is already registered (pass replace=True)")
    REGISTRY[name] = builder


for _name in __all__:
    register_flow(_name, globals()[_name])
del _name
register_flow("elementwise", elementwise_flow)


def _auto_tabular(input_dim: int, **kw) -> Flow:
    """The architecture :func:`pyroflows.auto.fit_auto` chose (rebuilt from its ``flow_kwargs``)."""
    from .auto import auto_flow

    return auto_flow(input_dim, **kw)


register_flow("auto_tabular", _auto_tabular)


def available_flows() -> list[str]:
    """The registered architecture names (besides ``"auto"``), sorted."""
    return sorted(REGISTRY)


def resolve_flow_name(name: str, input_dim=2) -> str:
    """``"auto"`` -> ``"elementwise"`` for 1-D data, else the first registered of
    :data:`PREFERRED`; any other name is returned unchanged."""
    if name != "auto":
        return name
    if input_dim == 1:
        return "elementwise"
    return next((n for n in PREFERRED if n in REGISTRY), "elementwise")


def make_flow(name: str, input_dim, **kw) -> Flow:
    """Build the registered architecture ``name`` (or ``"auto"``) for ``input_dim``.

    Raises ``ValueError`` listing the available names for an unknown name.
    """
    if not isinstance(name, str):
        raise TypeError(f"an architecture name must be a string, got {type(name).__name__}")
    resolved = resolve_flow_name(name, input_dim)
    if resolved not in REGISTRY:
        raise ValueError(f"unknown flow architecture {name!r}; available: {', '.join(available_flows())}, auto")
    return REGISTRY[resolved](input_dim, **kw)


__all__ += ["PREFERRED", "REGISTRY", "available_flows", "best_elementwise_kind", "elementwise_flow", "make_flow",
            "register_flow", "resolve_flow_name"]
