r"""``AutoFlow``: a Pyro autoguide whose posterior is a pyroflows normalizing flow.

Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide, the latent
sites are mapped to the unconstrained reals and concatenated into one vector
:math:`\theta \in \mathbb{R}^D`.  The guide is

.. math::

    u = f_K \circ \dots \circ f_1(z),\quad z \sim p_0 = \mathcal N(0, I_D), \qquad
    \theta = \mu + \sigma \odot u,

a flow on standardised coordinates followed by a learnable affine layer whose
location starts at ``init_loc_fn``'s point and whose scale starts at
``init_scale``.  Every pyroflows architecture starts at the identity, so
training starts from the mean-field guide :math:`\mathcal N(\mu, \sigma^2)`
(what :class:`~pyro.infer.autoguide.AutoNormal` would be), and the flow only
has to learn the *shape* of the posterior, on a scale where its bounded
transformers (splines) act.

Sampling (SVI, ``Predictive``) runs the flow forward; the density of the
guide's own sample is cached by the layers, so an ELBO step costs one pass.
Reference: Rezende & Mohamed, "Variational inference with normalizing flows",
ICML 2015; Kucukelbir et al., "Automatic differentiation variational
inference", JMLR 2017; Hoffman et al., "NeuTra-lizing bad geometry in HMC
using neural transport", 2019 (for :class:`~pyro.infer.reparam.NeuTraReparam`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

from ..flow import Flow
from ..transforms.elementwise import elementwise
from .diagnostics import ImportanceDiagnostics, guide_log_weights, importance_diagnostics

__all__ = ["AutoFlow"]


def _build_flow(flow, latent_dim: int, flow_kw: dict) -> Flow:
    """Resolve ``flow`` (a name in :mod:`pyroflows.flows` or a callable) into a :class:`Flow`."""
    if isinstance(flow, str):
        from .. import flows

        builder = getattr(flows, flow, None)
        if builder is None or not callable(builder):
            available = ", ".join(sorted(getattr(flows, "__all__", []))) or "none yet"
            raise ValueError(f"unknown flow {flow!r}: pyroflows.flows has no such architecture "
                             f"(available: {available}); or pass a callable latent_dim -> transforms")
        out = builder(latent_dim, **flow_kw)
    elif callable(flow):
        out = flow(latent_dim, **flow_kw)
    else:
        raise TypeError(f"flow must be a name in pyroflows.flows or a callable, got {type(flow).__name__}")
    if isinstance(out, Flow):
        if out.is_conditional:
            raise ValueError("AutoFlow needs an unconditional flow (got one with a context)")
        if tuple(out.event_shape) != (latent_dim,):
            raise ValueError(f"the flow has event shape {tuple(out.event_shape)}, "
                             f"expected ({latent_dim},) (the latent dimension)")
        return out
    return Flow(out, event_shape=(latent_dim,))



class AutoFlow(AutoContinuous):
    r"""An :class:`~pyro.infer.autoguide.AutoContinuous` guide whose posterior over the
    unconstrained latent vector is a pyroflows normalizing flow (see the module docstring
    for the math).

    Args:
        model: a Pyro model with continuous latent sites only (a discrete latent site
            raises ``ValueError`` naming it).
        flow: the name of an architecture in :mod:`pyroflows.flows` (``"nsf"``,
            ``"maf"``, ``"iaf"``, ``"realnvp"`` ...), called as
            ``pyroflows.flows.<flow>(latent_dim, **flow_kw)``; or a callable
            ``latent_dim -> list of transforms`` (or ``-> Flow``).  The flow's own base
            (standard normal by default) is the guide's base.
        init_loc_fn: per-site initialisation of the location :math:`\mu` (as in
            Pyro's other autoguides; default ``init_to_median``).
        init_scale: initial :math:`\sigma` (default 0.1, as ``AutoNormal``).
        num_quantile_samples: draws used by :meth:`median` and :meth:`quantiles`,
            which are Monte Carlo estimates (a flow has no closed-form quantiles).
        **flow_kw: passed to the architecture.

    The default, ``"nsf"`` with its own defaults (4 spline couplings, 8 bins, splines on
    ``[-5, 5]`` and the identity outside), was chosen by short runs on the 10-D funnel and
    centred eight schools (``benchmarks/autoflow_default.py``, 1000 SVI steps, lr 1e-2, one
    seed; docs/bench_autoguides.md): k-hat 0.49 / 0.91 for ``nsf``, 0.61 / 0.73 with
    ``bound=10``, 0.59 / 0.82 for ``"maf"``; ``"realnvp"`` diverged on both and ``"iaf"`` on
    the funnel (affine scales of up to e^5 per layer compound over layers at this learning rate), so the
    bounded spline flow on the standardised coordinates is the robust default.

    Besides the usual autoguide interface (``Predictive``, ``median``,
    ``quantiles``, ``NeuTraReparam`` through ``get_base_dist``/``get_transform``),
    :meth:`diagnostics` reports PSIS k-hat, importance ESS and the log evidence,
    and :meth:`to_inferencedata` returns posterior draws for ArviZ.
    """

    def __init__(self, model, flow: str | Callable = "nsf", *, init_loc_fn=init_to_median,
                 init_scale: float = 0.1, num_quantile_samples: int = 2000, **flow_kw):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if not (isinstance(flow, str) or callable(flow)):
            raise TypeError(f"flow must be a name in pyroflows.flows or a callable, got {type(flow).__name__}")
        self._flow_spec = flow
        self._flow_kw = dict(flow_kw)
        self._init_scale = float(init_scale)
        self.num_quantile_samples = int(num_quantile_samples)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._user_model = (model,)  # a tuple keeps nn.Module from registering it

    # -- setup ---------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        finally:
            # runs even when Pyro fails to biject a discrete support, so the user
            # sees which site is the problem rather than a support error
            self._refuse_discrete_sites()
        loc = self._init_loc().detach()
        flow = _build_flow(self._flow_spec, self.latent_dim, self._flow_kw)
        affine = elementwise(self.latent_dim, "affine")
        bound = affine.transformer.log_scale_bound
        log_scale = min(max(math.log(self._init_scale), -0.99 * bound), 0.99 * bound)
        with torch.no_grad():
            params = torch.stack([loc, torch.full_like(loc, bound * math.atanh(log_scale / bound))], -1)
            affine.params.copy_(params.to(affine.params.dtype))
        self.flow = flow.to(dtype=loc.dtype, device=loc.device)
        self.standardise = affine.to(dtype=loc.dtype, device=loc.device)

    def _refuse_discrete_sites(self):
        trace = getattr(self, "prototype_trace", None)
        if trace is None:
            return
        for name, site in trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete or getattr(fn, "has_enumerate_support", False):
                raise ValueError(
                    f"AutoFlow handles continuous latent variables only, but site {name!r} is "
                    f"discrete ({type(fn).__name__}); marginalise it out (enumeration with "
                    f"TraceEnum_ELBO and a guide that hides it) or use AutoDiscreteParallel for it")

    def _prototype_plate_nesting(self) -> int:
        frames = getattr(self, "_prototype_frames", {})
        return max((-f.dim for f in frames.values()), default=0)

    # -- the posterior ----------------------------------------------------------
    def get_base_dist(self):
        """The flow's base :math:`p_0` (standard normal over the latent vector)."""
        return self.flow.base_distribution()

    def get_transform(self, *args, **kwargs):
        """The composed map base -> unconstrained latent (flow, then the affine layer)."""
        return ComposeTransform(list(self.flow().transforms) + [self.standardise])

    def get_posterior(self, *args, **kwargs):
        """The flow posterior over the unconstrained latent vector, a ``TransformedDistribution``."""
        return dist.TransformedDistribution(self.get_base_dist(),
                                            list(self.flow().transforms) + [self.standardise])

    # -- summaries ----------------------------------------------------------------
    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``num_samples`` posterior draws of each latent site in the constrained space,
        as a dict ``name -> tensor of shape (num_samples, *site_shape)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.get_posterior(*args, **kwargs).sample((int(num_samples),))
        nesting = self._prototype_plate_nesting()
        latent = latent.reshape((latent.shape[0],) + (1,) * nesting + latent.shape[-1:])
        out = {}
        for site, unconstrained in self._unpack_latent(latent):
            value = biject_to(site["fn"].support)(unconstrained)
            out[site["name"]] = value.reshape((latent.shape[0],) + site["value"].shape)
        return out

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        """Posterior quantiles of each latent site (elementwise, in the constrained space),
        estimated from ``num_quantile_samples`` draws: ``name -> (len(quantiles), *site_shape)``."""
        draws = self.sample_posterior(self.num_quantile_samples, *args, **kwargs)
        result = {}
        for name, x in draws.items():
            q = torch.as_tensor(quantiles, dtype=x.dtype, device=x.device)
            result[name] = torch.quantile(x, q, dim=0)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Posterior median of each latent site (Monte Carlo, see :meth:`quantiles`)."""
        return {name: q[0] for name, q in self.quantiles([0.5], *args, **kwargs).items()}

    # -- diagnostics ---------------------------------------------------------------
    def log_importance_weights(self, *args, num_samples: int = 4000, max_plate_nesting: int | None = None,
                               chunk_size: int = 1000, **kwargs) -> torch.Tensor:
        r""":math:`\log p(x, \theta_s) - \log q(\theta_s)` for ``num_samples`` guide draws
        (see :func:`~pyroflows.infer.diagnostics.guide_log_weights`)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return guide_log_weights(self._user_model[0], self, *args, num_samples=num_samples,
                                 max_plate_nesting=max_plate_nesting, chunk_size=chunk_size, **kwargs)

    def diagnostics(self, *args, num_samples: int = 4000, max_plate_nesting: int | None = None,
                    **kwargs) -> ImportanceDiagnostics:
        """PSIS k-hat, importance ESS (fraction) and the importance-sampled log evidence
        :math:`\\log p(x)` with its standard error, from ``num_samples`` guide draws
        (see :mod:`pyroflows.infer.diagnostics`)."""
        lw = self.log_importance_weights(*args, num_samples=num_samples,
                                         max_plate_nesting=max_plate_nesting, **kwargs)
        return importance_diagnostics(lw)

    def to_inferencedata(self, *args, num_samples: int = 1000, **kwargs):
        """An ArviZ ``InferenceData`` with ``num_samples`` posterior draws (one chain) of each
        latent site in the constrained space."""
        import arviz

        draws = self.sample_posterior(num_samples, *args, **kwargs)
        return arviz.from_dict(posterior={k: v.unsqueeze(0).cpu().numpy() for k, v in draws.items()})
