"""``Flow``: a composed transform plus a base density, as an ``nn.Module``.

Calling the module returns a Pyro :class:`~pyro.distributions.TransformedDistribution`,
so a flow drops into anything Pyro does: a prior in a model, an SVI guide, an
amortized posterior.  ``flow.transform(context)`` is the composed transform
itself, usable wherever Pyro takes a transform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import _standard_normal, _sum_rightmost

from .transforms.compose import ComposedModule
from .transforms.memory import check_memory_saving, memory_saving_log_prob

__all__ = ["Flow", "StandardNormal", "StandardUniform", "StudentTBase", "TailMixtureBase"]


class StandardNormal(nn.Module):
    """The default base: a standard normal over ``event_shape``, held as buffers
    (``.to(device)`` and ``state_dict`` carry it)."""

    def __init__(self, event_shape):
        super().__init__()
        self.register_buffer("loc", torch.zeros(event_shape))
        self.register_buffer("scale", torch.ones(event_shape))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(self.loc.dim())


class StandardUniform(StandardNormal):
    """The base of flows whose first layer is defined on the unit interval: a standard
    uniform over ``event_shape`` (buffers ``loc`` = 0, ``scale`` = 1)."""

    def forward(self):
        return dist.Uniform(self.loc, self.loc + self.scale).to_event(self.loc.dim())


def _t_log_density(square_norm: torch.Tensor, df: torch.Tensor, dim: int | torch.Tensor = 1) -> torch.Tensor:
    r"""Log-density of a standard multivariate Student-t in ``dim`` dimensions at a point of
    squared norm ``square_norm``:
    :math:`\log\Gamma(\frac{\nu + k}{2}) - \log\Gamma(\frac{\nu}{2}) - \frac k2 \log(\nu\pi)
    - \frac{\nu + k}{2} \log(1 + r^2 / \nu)` (``dim`` = 1: the univariate t, in the order of
    torch's ``StudentT.log_prob``, so the values are the same to the last bit; a tensor ``dim``
    gives each entry of the last axis its own dimension and degrees of freedom)."""
    log_norm = (0.5 * dim * df.log() + 0.5 * dim * math.log(math.pi) + torch.lgamma(0.5 * df)
                - torch.lgamma(0.5 * (df + dim)))
    return -0.5 * (df + dim) * torch.log1p(square_norm / df) - log_norm


class _StandardStudentT(dist.StudentT):
    """Pyro's ``StudentT`` at location 0 and scale 1, with the location and scale arithmetic
    left out of ``rsample`` and ``log_prob``: the same values (the same draws from the same
    random numbers) with fewer tensor operations, which matters in the many small SVI steps
    of a guide."""

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        x = _standard_normal(shape, dtype=self.df.dtype, device=self.df.device)
        return x * torch.rsqrt(self._chi2.rsample(sample_shape) / self.df)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return _t_log_density(value.square(), self.df)


class StudentTBase(nn.Module):
    r"""A tail-adaptive base: independent standard Student-t coordinates whose degrees of
    freedom are learned, one per dimension,

    .. math::

        p_0(z) = \prod_d t_{\nu_d}(z_d), \qquad \nu_d = \nu_{\min} + e^{\rho_d}.

    A flow of Lipschitz layers (affine and spline autoregressive or coupling layers) maps a
    Gaussian base to tails no heavier than Gaussian (Jaini et al., "Tails of Lipschitz
    triangular flows", ICML 2020); with this base the tails of each coordinate are
    polynomial with an index the fit chooses, from Cauchy-like (:math:`\nu \to 1`) to
    Gaussian (:math:`\nu \to \infty`).  Reference: Laszkiewicz, Lederer & Fischer,
    "Marginal tail-adaptive normalizing flows", ICML 2022.

    Args:
        event_shape: the base's event shape.
        df: the starting degrees of freedom (default 30: close to a standard normal, so a
            flow that starts at the identity starts near the Gaussian it would have had).
        min_df: the lower bound :math:`\nu_{\min}` (default 2: the base, and so the flow's
            draws, keep a finite variance, which posterior sds need).

    ``rsample`` is reparametrised in :math:`\nu` too (the Gamma draw behind it has an
    implicit gradient), so the tail weights train by SVI like any other parameter.
    """

    def __init__(self, event_shape, df: float = 30.0, min_df: float = 2.0):
        super().__init__()
        if not df > min_df > 0:
            raise ValueError(f"need df > min_df > 0, got df={df}, min_df={min_df}")
        self.min_df = float(min_df)
        # learned on the log scale: an optimizer step of size lr changes nu by a fraction ~lr of
        # itself, so 30 -> 3 takes a few hundred steps (a softplus scale would take thousands)
        raw = math.log(df - min_df)
        self.register_buffer("loc", torch.zeros(event_shape))
        self.register_buffer("scale", torch.ones_like(self.loc), persistent=False)
        self.raw_df = nn.Parameter(torch.full_like(self.loc, raw))

    @property
    def df(self) -> torch.Tensor:
        r""":math:`\nu`, one per coordinate."""
        return self.min_df + self.raw_df.exp()

    def forward(self):
        # df > 0 holds by construction, so the argument checks are skipped (they are a fifth of
        # the base's operations in an SVI step)
        with pyro.validation_enabled(False):
            base = _StandardStudentT(self.df, self.loc, self.scale)
        return base.to_event(self.loc.dim())


class _TailMixture(TorchDistribution):
    """The density of :class:`TailMixtureBase` (standard location and scale), from one tensor of
    ``D + 1`` degrees of freedom: the coordinates' and, last, the elliptical part's.  Both parts
    are computed together, over the ``D`` squared coordinates and their sum, so the mixture costs
    a handful of tensor operations more than the product part alone."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, dfs: torch.Tensor, dims: torch.Tensor, joint_weight: float = 0.5):
        self.dfs, self.dims = dfs, dims  # dims: 1 for each coordinate, D for the elliptical part
        self.joint_weight = joint_weight
        super().__init__(torch.Size(), dfs.shape[:-1] + (dfs.shape[-1] - 1,), validate_args=False)

    @property
    def df(self) -> torch.Tensor:
        return self.dfs[:-1]

    @property
    def joint_df(self) -> torch.Tensor:
        return self.dfs[-1]

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.event_shape
        kw = {"dtype": self.dfs.dtype, "device": self.dfs.device}
        normal = _standard_normal(shape, **kw)
        # chi^2_nu / nu = Gamma(nu / 2) / (nu / 2): per coordinate, and one per draw for the joint part
        half = 0.5 * self.dfs
        gamma = torch._standard_gamma(half.expand(shape[:-1] + half.shape)).clamp_min(torch.finfo(normal.dtype).tiny)
        inverse_scale = torch.rsqrt(gamma / half)
        joint_part = torch.rand(shape[:-1] + (1,), **kw) < self.joint_weight
        return normal * torch.where(joint_part, inverse_scale[..., -1:], inverse_scale[..., :-1])

    def log_prob(self, z):
        square = z.square()
        terms = _t_log_density(torch.cat([square, square.sum(-1, keepdim=True)], -1), self.dfs, self.dims)
        w = self.joint_weight
        if w == 0.5:  # one operation fewer
            return torch.logaddexp(terms[..., -1], terms[..., :-1].sum(-1)) - math.log(2.0)
        return torch.logaddexp(terms[..., -1] + math.log(w), terms[..., :-1].sum(-1) + math.log1p(-w))

    @property
    def mean(self):
        return torch.zeros_like(self.df)

    @property
    def variance(self):
        nu, df = self.joint_df, self.df
        w = self.joint_weight
        return w * nu / (nu - 2.0) + (1.0 - w) * df / (df - 2.0)


class TailMixtureBase(StudentTBase):
    r"""A tail-adaptive base heavy in every direction: :class:`StudentTBase`'s independent
    Student-t coordinates (one learned degrees of freedom each) in an equal mixture with a
    multivariate (elliptical) Student-t (one learned degrees of freedom),

    .. math::

        p_0(z) = (1 - w) \prod_d t_{\nu_d}(z_d) + w\, t_{\nu_0, D}(z), \qquad
        t_{\nu, D}(z) = \frac{\Gamma(\frac{\nu + D}{2})}{\Gamma(\frac{\nu}{2})
        (\nu\pi)^{D/2}} \left(1 + \frac{\|z\|^2}{\nu}\right)^{-\frac{\nu + D}{2}}.

    Each part alone misses some tails: along an axis the product decays like
    :math:`|z|^{-(\nu_d + 1)}` and the elliptical part like :math:`|z|^{-(\nu_0 + D)}`,
    while along a diagonal the product decays like :math:`|z|^{-\sum_d (\nu_d + 1)}`,
    far faster than the elliptical part.  The mixture has the heavier of the two in every
    direction, so ``p / q`` stays bounded for a posterior with independent heavy-tailed
    coordinates and for one with joint (elliptical) heavy tails.  (Tail-adaptive flows:
    Laszkiewicz, Lederer & Fischer, "Marginal tail-adaptive normalizing flows", ICML 2022;
    why the base must carry the tails: Jaini et al., "Tails of Lipschitz triangular
    flows", ICML 2020.)

    ``rsample`` is reparametrised in every degree of freedom (the Gamma draws have
    implicit gradients); the part each draw comes from is chosen with the fixed weight
    :math:`w` (default :math:`\frac12`), which leaves the pathwise gradient unbiased.  All ``D + 1`` degrees of
    freedom are one parameter, ``raw_df`` (the elliptical part's last), so the base is one
    tensor to the optimizer.

    Args:
        event_shape: ``(D,)``.
        df: the starting degrees of freedom of both parts (default 5).
        min_df: the lower bound of every degree of freedom (default 2: finite variances).
        joint_weight: the elliptical part's weight :math:`w` (default :math:`\frac12`; the
            density is then :math:`(1 - w) \prod_d t_{\nu_d} + w\, t_{\nu_0, D}`).  As
            :class:`~pyroflows.infer.AutoFlow`'s base, 0.2 fitted the 5-D multivariate t worse
            than 0.5 (k-hat 0.21 / 0.44 against 0.13 / 0.10, seeds 0 / 1).
    """

    def __init__(self, event_shape, df: float = 5.0, min_df: float = 2.0, joint_weight: float = 0.5):
        super().__init__(event_shape, df=df, min_df=min_df)
        if not 0.0 < joint_weight < 1.0:
            raise ValueError(f"joint_weight must be in (0, 1), got {joint_weight}")
        self.joint_weight = float(joint_weight)
        if self.loc.dim() != 1:
            raise ValueError(f"TailMixtureBase needs a vector event shape (D,), got {tuple(self.loc.shape)}")
        dim = self.loc.shape[0]
        self.raw_df = nn.Parameter(torch.cat([self.raw_df.detach(), self.raw_df.detach()[:1]]))
        dims = torch.ones(dim + 1)
        dims[-1] = dim
        self.register_buffer("dims", dims, persistent=False)
        self._register_load_state_dict_pre_hook(self._pack_joint_df)

    @staticmethod
    def _pack_joint_df(state_dict, prefix, *args):
        """Loads a state dict saved when the elliptical part's degrees of freedom were a
        parameter of their own (``raw_joint_df``)."""
        joint = state_dict.pop(prefix + "raw_joint_df", None)
        if joint is not None:
            state_dict[prefix + "raw_df"] = torch.cat([state_dict[prefix + "raw_df"], joint.reshape(1)])

    @property
    def dfs(self) -> torch.Tensor:
        r"""All degrees of freedom: :math:`(\nu_1, \dots, \nu_D, \nu_0)`."""
        return self.min_df + self.raw_df.exp()

    @property
    def df(self) -> torch.Tensor:
        r""":math:`\nu_d`, one per coordinate."""
        return self.dfs[:-1]

    @property
    def joint_df(self) -> torch.Tensor:
        r""":math:`\nu_0`, the elliptical part's degrees of freedom."""
        return self.dfs[-1]

    def forward(self):
        return _TailMixture(self.dfs, self.dims, self.joint_weight)


class FixedBase(nn.Module):
    """A fixed Pyro distribution given as the base (not moved by ``.to``)."""

    def __init__(self, distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self):
        return self.distribution


def _is_unit_interval(c) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return isinstance(c, constraints._Interval) and c.lower_bound == 0.0 and c.upper_bound == 1.0


def _default_base(first_layer, event_shape) -> nn.Module:
    unit = _is_unit_interval(getattr(first_layer, "domain", constraints.real_vector))
    return (StandardUniform if unit else StandardNormal)(event_shape)


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f_K \circ \dots \circ f_1(z)`, :math:`z \sim p_0`.

    .. math::

        \log p(x) = \log p_0(z) - \sum_k \log\left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|

    Args:
        transforms: a transform or a list of transforms (pyroflows layers or any
            Pyro ``Transform`` / ``ConditionalTransform``, parameter-free ones
            included), in the generative order: ``transforms[0]`` is applied to
            the base sample.  They are held as one
            :class:`~pyroflows.transforms.compose.ComposedModule`.
        base: ``None`` for a standard normal over the event shape (a standard
            uniform when the first layer's domain is the unit interval), held as
            buffers; an ``nn.Module`` whose call ``base()`` returns a
            distribution (its parameters are then part of the flow); or a fixed
            Pyro distribution.
        event_shape: the shape of the base sample; inferred from the layers when
            they carry it (every pyroflows helper sets it).  Layers that reshape
            the event (squeeze) make ``flow.event_shape``, the shape of one
            sample, differ from it.
        memory_saving: ``log_prob`` with gradients stores only the base-side
            output and recomputes each layer's input from its output in the
            backward pass, so training memory does not grow with depth
            (:mod:`pyroflows.transforms.memory`); refused for layers whose
            inverse is not exact.

    ``flow()`` returns the distribution, ``flow(context)`` the distribution
    conditioned on ``context`` (of shape ``(..., context_dim)``, which sets the
    batch shape), ``flow(context, base=q0)`` the same layers over a base
    distribution given for this call.  ``transform(context)`` is the composed
    transform; ``log_prob``, ``sample`` and ``rsample`` go through it.
    """

    def __init__(self, transforms, base=None, event_shape: Iterable[int] | None = None, *,
                 memory_saving: bool = False):
        super().__init__()
        if isinstance(transforms, Flow):
            transforms, base = transforms.transforms, transforms.base if base is None else base
        elif isinstance(transforms, (torch.distributions.Transform, ConditionalTransform, nn.Module)) and not \
                isinstance(transforms, nn.ModuleList):
            transforms = [transforms]
        transforms = list(transforms)
        if not transforms:
            raise ValueError("Flow needs at least one transform")
        self.layers = ComposedModule(transforms)
        if event_shape is None:
            event_shape = self.layers.event_shape
        if event_shape is None and isinstance(base, torch.distributions.Distribution):
            event_shape = base.event_shape
        if event_shape is None:
            raise ValueError("cannot infer the event shape: pass event_shape= or a base distribution")
        self.base_event_shape = torch.Size(event_shape)
        for t in transforms:  # layers that reshape the event (squeeze) make the sample shape differ
            event_shape = t.forward_shape(event_shape) if hasattr(t, "forward_shape") else event_shape
        self.event_shape = torch.Size(event_shape)
        self.memory_saving = bool(memory_saving)
        if self.memory_saving:
            check_memory_saving(transforms)  # refuses layers whose input cannot be recomputed exactly
        if base is None:
            base = _default_base(self.transforms[0], self.base_event_shape)
        elif isinstance(base, torch.distributions.Distribution):
            base = FixedBase(base)
        elif not isinstance(base, nn.Module):
            raise TypeError(f"base must be None, an nn.Module or a Distribution, got {type(base).__name__}")
        self.base = base

    @property
    def transforms(self) -> list:
        """Every transform of the flow, in the generative order."""
        return self.layers.parts

    @property
    def is_conditional(self) -> bool:
        return self.layers.is_conditional

    @property
    def context_dim(self) -> int | None:
        return self.layers.context_dim

    # ------------------------------------------------------------------
    def base_distribution(self, batch_shape=()):
        """The base density :math:`p_0`, expanded to ``batch_shape``."""
        d = self.base()
        if batch_shape and d.batch_shape != batch_shape:
            d = d.expand(torch.Size(batch_shape))
        return d

    def transform(self, context: torch.Tensor | None = None):
        """The composed transform base -> data (bound to ``context`` for a conditional flow):
        a Pyro ``Transform`` whose ``call_and_ladj`` / ``inverse_and_ladj`` run every layer."""
        if self.is_conditional:
            if context is None:
                raise ValueError(
                    f"this flow is conditional: call it with a context of shape (..., {self.context_dim})")
            return self.layers.condition(self._check_context(context))
        if context is not None:
            raise ValueError("this flow is not conditional: call it without a context")
        return self.layers

    def _base_for(self, context, base):
        batch_shape = context.shape[:-1] if context is not None else torch.Size()
        if base is None:
            return self.base_distribution(batch_shape)
        # a per-call base (an encoder's Gaussian): checked, and broadcast with the context's batch shape
        if not isinstance(base, torch.distributions.Distribution):
            raise TypeError(f"base must be a Distribution, got {type(base).__name__}")
        if base.event_shape != self.base_event_shape:
            raise ValueError(f"base has event shape {tuple(base.event_shape)} but the flow's is "
                             f"{tuple(self.base_event_shape)}; use .to_event(...) on the base")
        try:
            shape = torch.broadcast_shapes(base.batch_shape, batch_shape)
        except RuntimeError:
            raise ValueError(f"the base's batch shape {tuple(base.batch_shape)} does not broadcast with "
                             f"the context's {tuple(batch_shape)}") from None
        return base if shape == base.batch_shape else base.expand(shape)

    def forward(self, context: torch.Tensor | None = None, *, base=None):
        """The flow's distribution, conditioned on ``context`` if given, over ``base`` if given."""
        transform = self.transform(context)
        return dist.TransformedDistribution(self._base_for(context, base), [transform])

    def _check_context(self, context):
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.dim() == 0 or (self.context_dim is not None and context.shape[-1] != self.context_dim):
            raise ValueError(
                f"expected a context of shape (..., {self.context_dim}), got {tuple(context.shape)}"
            )
        return context

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a ``ValueError``/``TypeError`` naming the problem if ``x`` cannot be scored."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        n = len(self.event_shape)
        if x.dim() < n or x.shape[x.dim() - n:] != self.event_shape:
            raise ValueError(
                f"expected inputs of shape (..., {', '.join(map(str, self.event_shape))}) "
                f"(event shape {tuple(self.event_shape)}), got {tuple(x.shape)}"
            )
        ref = next(iter(self.parameters()), None)
        if ref is None:
            ref = next(iter(self.buffers()), None)
        if ref is not None and x.dtype != ref.dtype:
            raise TypeError(f"inputs have dtype {x.dtype} but the flow's parameters are {ref.dtype}; "
                            f"use flow.to({x.dtype}) or x.to({ref.dtype})")
        return x

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None, *, base=None,
                 cache: bool = True) -> torch.Tensor:
        """:math:`\\log p(x)` (per row: the batch shape of ``x``).  The flow's own samples
        are scored from the cached passes; ``cache=False`` recomputes every layer."""
        self.check_input(x)
        if self.memory_saving and context is None and base is None and torch.is_grad_enabled():
            return memory_saving_log_prob(self.transforms, self.base_distribution(), x)
        transform = self.transform(context)
        if dist.is_validation_enabled() and not bool(transform.codomain.check(x).all()):
            raise ValueError(f"Expected value argument ({type(x).__name__} of shape {tuple(x.shape)}) "
                             f"to be within the support ({transform.codomain!r}) of the flow, but found "
                             f"invalid values")
        z, ladj = transform.inverse_and_ladj(x, cache=cache)
        p0 = self._base_for(context, base)
        n = max(len(p0.event_shape), transform.codomain.event_dim)
        return _sum_rightmost(p0.log_prob(z), n - len(p0.event_shape)) - _sum_rightmost(
            ladj, n - transform.codomain.event_dim)

    def rsample(self, sample_shape=(), context: torch.Tensor | None = None, *, base=None) -> torch.Tensor:
        """Draw reparametrised samples (differentiable in the parameters)."""
        p0 = self._base_for(context, base)
        z = p0.rsample(torch.Size(sample_shape)) if p0.has_rsample else p0.sample(torch.Size(sample_shape))
        return self.transform(context).call_and_ladj(z)[0]

    def sample(self, sample_shape=(), context: torch.Tensor | None = None, *, base=None) -> torch.Tensor:
        """Draw samples without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, context, base=base)

    def extra_repr(self):
        return f"event_shape={tuple(self.event_shape)}"


