"""``Flow``: a stack of pyroflows layers plus a base density, as an ``nn.Module``.

Calling the module returns a Pyro :class:`~pyro.distributions.TransformedDistribution`,
so a flow drops into anything Pyro does: a prior in a model, an SVI guide, an
amortized posterior.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions import constraints

from .transforms.base import Bijector
from .transforms.memory import check_memory_saving, memory_saving_log_prob

__all__ = ["Flow"]


def _event_shape_of(transforms) -> tuple[int, ...] | None:
    for t in transforms:
        shape = getattr(t, "event_shape", None)
        if shape is not None:
            return tuple(shape)
    return None


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f_K \circ \dots \circ f_1(z)`, :math:`z \sim p_0`.

    .. math::

        \log p(x) = \log p_0(z) - \sum_k \log\left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|

    Args:
        transforms: a layer or a list of layers (``Bijector`` /
            ``ConditionalBijector`` or any Pyro ``Transform``), in the
            generative order: ``transforms[0]`` is applied to the base sample.
        base: ``None`` for the default base, a standard normal over the event
            shape (or a standard uniform when the first layer's domain is the
            unit interval), held as buffers so ``.to(device)`` and
            ``state_dict`` carry it; or an ``nn.Module`` whose call
            ``base()`` returns a distribution (its parameters are then part of
            the flow); or a fixed Pyro distribution.
        event_shape: the shape of one sample; inferred from the layers when
            they carry it (every pyroflows helper sets it).
        memory_saving: ``log_prob`` with gradients stores only the base-side
            output and recomputes each layer's input from its output in the
            backward pass, so training memory does not grow with depth
            (:mod:`pyroflows.transforms.memory`); refused for layers whose
            inverse is not exact.

    ``flow()`` returns the distribution, ``flow(context)`` the distribution
    conditioned on ``context`` (of shape ``(..., context_dim)``, which sets the
    batch shape).  ``log_prob``, ``sample`` and ``rsample`` are shortcuts.
    """

    def __init__(self, transforms, base=None, event_shape: Iterable[int] | None = None, *,
                 memory_saving: bool = False):
        super().__init__()
        if isinstance(transforms, (nn.Module, torch.distributions.Transform)) and not isinstance(
            transforms, nn.ModuleList
        ):
            transforms = [transforms]
        transforms = list(transforms)
        if not transforms:
            raise ValueError("Flow needs at least one transform")
        self.transforms = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
        self._all_transforms = transforms  # keeps parameter-free Pyro transforms too
        if event_shape is None:
            event_shape = _event_shape_of(transforms)
        if event_shape is None and isinstance(base, torch.distributions.Distribution):
            event_shape = base.event_shape
        if event_shape is None:
            raise ValueError("cannot infer the event shape: pass event_shape= or a base distribution")
        base_shape = torch.Size(event_shape)
        for t in transforms:  # layers that reshape the event (squeeze) make the sample shape differ
            event_shape = t.forward_shape(event_shape) if hasattr(t, "forward_shape") else event_shape
        self.event_shape = torch.Size(event_shape)
        self.memory_saving = bool(memory_saving)
        if self.memory_saving:
            check_memory_saving(transforms)  # refuses layers whose input cannot be recomputed exactly
        self.is_conditional = any(isinstance(t, ConditionalTransform) for t in transforms)
        self.context_dim = next(
            (t.context_dim for t in transforms if getattr(t, "context_dim", None) is not None), None
        )

        # log_prob may bypass Pyro's TransformedDistribution (same math, no per-transform
        # bookkeeping) when every layer is a pyroflows Bijector on the flow's own event shape
        n_event = len(self.event_shape)
        self._direct = all(
            isinstance(t, Bijector) and t.domain.event_dim == n_event and t.codomain.event_dim == n_event
            for t in transforms
        )

        self._base_kind = "module" if isinstance(base, nn.Module) else "fixed"
        if base is None:
            first_domain = getattr(transforms[0], "domain", constraints.real_vector)
            unit = _is_unit_interval(first_domain)
            self._base_kind = "uniform" if unit else "normal"
            self.register_buffer("base_loc", torch.zeros(base_shape))
            self.register_buffer("base_scale", torch.ones(base_shape))
        elif isinstance(base, nn.Module):
            self.base = base
        elif isinstance(base, torch.distributions.Distribution):
            self._fixed_base = base
        else:
            raise TypeError(f"base must be None, an nn.Module or a Distribution, got {type(base).__name__}")

    # ------------------------------------------------------------------
    def base_distribution(self, batch_shape=()):
        """The base density :math:`p_0`, expanded to ``batch_shape``."""
        n = len(self.event_shape)
        if self._base_kind == "normal":
            d = dist.Normal(self.base_loc, self.base_scale).to_event(n)
        elif self._base_kind == "uniform":
            d = dist.Uniform(self.base_loc, self.base_loc + self.base_scale).to_event(n)
        elif self._base_kind == "module":
            d = self.base()
        else:
            d = self._fixed_base
        if batch_shape and d.batch_shape != batch_shape:
            d = d.expand(torch.Size(batch_shape))
        return d

    def forward(self, context: torch.Tensor | None = None):
        """The flow's distribution, conditioned on ``context`` if given."""
        if self.is_conditional:
            if context is None:
                raise ValueError(
                    f"this flow is conditional: call it with a context of shape (..., {self.context_dim})"
                )
            context = self._check_context(context)
            transforms = [t.condition(context) if isinstance(t, ConditionalTransform) else t
                          for t in self._all_transforms]
            base = self.base_distribution(context.shape[:-1])
        else:
            if context is not None:
                raise ValueError("this flow is not conditional: call it without a context")
            transforms = self._all_transforms
            base = self.base_distribution()
        return dist.TransformedDistribution(base, transforms)

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

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`\\log p(x)` (per row: the batch shape of ``x``)."""
        self.check_input(x)
        if self.memory_saving and context is None and torch.is_grad_enabled():
            d = self()
            return memory_saving_log_prob(d.transforms, d.base_dist, x)
        if context is not None or not self._direct:
            return self(context).log_prob(x)
        return self._direct_log_prob(x)

    def _direct_log_prob(self, x, use_cache: bool = True):
        """``TransformedDistribution.log_prob`` without its per-transform overhead: one
        ``inverse`` per layer (or the layer's cached pass, as Pyro's path would use it;
        ``use_cache=False`` always recomputes, e.g. under swapped-in parameters)."""
        base = self.base_distribution()
        if base.event_shape != self.event_shape:
            return self().log_prob(x)
        if torch.distributions.Distribution._validate_args:
            support = self._all_transforms[-1].codomain
            if not bool(support.check(x).all()):
                raise ValueError(f"Expected value argument ({type(x).__name__} of shape {tuple(x.shape)}) "
                                 f"to be within the support ({support!r}) of the flow, but found invalid values")
        ladj = 0.0
        y = x
        for t in reversed(self._all_transforms):
            # the flow's own sample reuses its pass (free log_prob for IAF)
            y, l_ = t.inverse_and_ladj(y) if use_cache else t._inverse_pass(y)
            ladj = ladj + l_
        return base.log_prob(y) - ladj

    def sample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Draw samples without gradients."""
        with torch.no_grad():
            if context is not None or not self._direct:
                return self(context).sample(torch.Size(sample_shape))
            # TransformedDistribution.sample without its overhead: same draws, same cached passes
            x = self.base_distribution().sample(torch.Size(sample_shape))
            for t in self._all_transforms:
                x, _ = t.call_and_ladj(x)
            return x

    def rsample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Draw reparametrised samples (differentiable in the parameters)."""
        return self(context).rsample(torch.Size(sample_shape))

    def extra_repr(self):
        return f"event_shape={tuple(self.event_shape)}, base={self._base_kind}"


def _is_unit_interval(c) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return isinstance(c, constraints._Interval) and c.lower_bound == 0.0 and c.upper_bound == 1.0
