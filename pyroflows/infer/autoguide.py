r"""``AutoFlow``: a Pyro autoguide whose posterior is a pyroflows normalizing flow.

Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide, the latent
sites are mapped to the unconstrained reals and concatenated into one vector
:math:`\theta \in \mathbb{R}^D`.  The guide is

.. math::

    u = f_K \circ \dots \circ f_1(z),\quad z \sim p_0 = \mathcal N(0, I_D), \qquad
    \theta = \mu + \sigma \odot L u,

a flow on standardised coordinates, a learnable lower-triangular linear layer
:math:`L` (optional, identity at the start; it makes the guide contain every
full-covariance Gaussian) and a learnable affine layer whose location starts at
``init_loc_fn``'s point and whose scale starts at ``init_scale``.  Every
pyroflows architecture starts at the identity, so training starts from the
mean-field guide :math:`\mathcal N(\mu, \sigma^2)` (what
:class:`~pyro.infer.autoguide.AutoNormal` would be), and the flow only has to
learn the *shape* of the posterior.  The default flow is a 3-layer affine IAF
(:func:`default_flow`), trained with the path-derivative gradient (``stl``).

Sampling (SVI, ``Predictive``) runs the flow forward; the density of the
guide's own sample is cached by the layers (one pass), except with ``stl=True``,
where the ELBO recomputes it through the inverses with detached parameters.
Reference: Rezende & Mohamed, "Variational inference with normalizing flows",
ICML 2015; Roeder, Wu & Duvenaud, "Sticking the landing: simple,
lower-variance gradient estimators for variational inference", NeurIPS 2017;
Kucukelbir et al., "Automatic differentiation variational inference", JMLR 2017; Hoffman et al., "NeuTra-lizing bad geometry in HMC
using neural transport", 2019 (for :class:`~pyro.infer.reparam.NeuTraReparam`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

from ..flow import Flow
from ..transforms.base import Bijector
from ..transforms.elementwise import elementwise
from ..transforms.linear import Triangular
from .diagnostics import ImportanceDiagnostics, guide_log_weights, importance_diagnostics

__all__ = ["AutoFlow", "default_flow"]


def _build_flow(flow, latent_dim: int, flow_kw: dict) -> Flow:
    """Resolve ``flow`` (a name in the registry :data:`pyroflows.flows.REGISTRY` or a
    callable) into a :class:`Flow`."""
    if isinstance(flow, str):
        from ..flows import make_flow

        out = make_flow(flow, latent_dim, **flow_kw)
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


def default_flow(latent_dim: int, *, num_layers: int = 3, hidden_dims=(64, 64), log_scale_bound: float = 10.0) -> Flow:
    r"""AutoFlow's default flow: ``num_layers`` affine IAF layers (alternating natural and
    reversed MADE orderings), each log-scale softly bounded by ``log_scale_bound``,
    i.e. ``pyroflows.flows.iaf(latent_dim, num_layers=3, kind=Affine(10))``.  Sampling
    and the density of its own samples are one MADE pass per layer (what SVI needs).
    See :class:`AutoFlow` for the measurements behind it."""
    from ..flows import iaf
    from ..transforms.transformers import Affine

    return iaf(latent_dim, num_layers=num_layers, hidden_dims=hidden_dims, kind=Affine(log_scale_bound))


class _FlowDensity(torch.nn.Module):
    """``log q(theta)`` of the guide recomputed from scratch (layer inverses, no cache), so that
    :func:`torch.func.functional_call` can evaluate it with detached parameters."""

    def __init__(self, flow: Flow, linear, standardise):
        super().__init__()
        self.flow = flow
        self.linear = linear
        self.standardise = standardise

    def forward(self, theta):
        u, ladj = self.standardise.inverse_and_ladj(theta, cache=False)
        if self.linear is not None:
            u, l_linear = self.linear.inverse_and_ladj(u, cache=False)
            ladj = ladj + l_linear
        return self.flow.log_prob(u, cache=False) - ladj


class _StickingTheLanding(TorchDistribution):
    r"""The guide's posterior with the *path-derivative* log-density of Roeder, Wu &
    Duvenaud (2017): samples are the posterior's own (reparametrised, gradients flow to the
    flow's parameters along the path :math:`\theta = T_\phi(z)`), but ``log_prob`` is
    :math:`\log q_{\bar\phi}(\theta)` with the parameters held fixed (:math:`\bar\phi`
    = detached), which drops the score term :math:`\partial_\phi \log q_\phi(\theta)`
    (zero in expectation) from the ELBO gradient.  Same value, same expected gradient,
    and a gradient of zero variance when :math:`q` equals the posterior."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, posterior, log_density):
        self.posterior, self._log_density = posterior, log_density
        super().__init__(posterior.batch_shape, posterior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.posterior.support

    def expand(self, batch_shape, _instance=None):
        return _StickingTheLanding(self.posterior.expand(batch_shape), self._log_density)

    def rsample(self, sample_shape=()):
        return self.posterior.rsample(sample_shape)

    def sample(self, sample_shape=()):
        return self.posterior.sample(sample_shape)

    def log_prob(self, value):
        return self._log_density(value)



class AutoFlow(AutoContinuous):
    r"""An :class:`~pyro.infer.autoguide.AutoContinuous` guide whose posterior over the
    unconstrained latent vector is a pyroflows normalizing flow (see the module docstring
    for the math).

    Args:
        model: a Pyro model with continuous latent sites only (a discrete latent site
            raises ``ValueError`` naming it).
        flow: ``None`` (default) for :func:`default_flow`; the name of an architecture in
            :mod:`pyroflows.flows` (``"nsf"``, ``"maf"``, ``"iaf"``, ``"realnvp"`` ...),
            called as ``pyroflows.flows.<flow>(latent_dim, **flow_kw)``; or a callable
            ``latent_dim -> list of transforms`` (or ``-> Flow``).  The flow's own base
            (standard normal by default) is the guide's base.
        init_loc_fn: per-site initialisation of the location :math:`\mu` (as in
            Pyro's other autoguides; default ``init_to_median``).
        init_scale: initial :math:`\sigma` (default 1: the affine layer, not the flow,
            should carry the posterior's scale).
        linear: put a learnable lower-triangular linear layer :math:`L` (identity at
            the start) between the flow and the affine layer, :math:`\theta = \mu +
            \sigma \odot L\, f(z)`, so the guide contains every full-covariance Gaussian
            (``AutoMultivariateNormal``).  Default ``True``.
        stl: use the path-derivative ("sticking the landing") gradient of Roeder, Wu &
            Duvenaud (NeurIPS 2017): the guide's log-density in the ELBO is evaluated
            with the flow's parameters detached (:func:`torch.func.functional_call`), so
            the score term, zero in expectation, leaves the gradient.  Unbiased, and its
            variance vanishes as :math:`q` approaches the posterior, so the fit
            converges tighter, which is what k-hat measures.  It recomputes
            :math:`\log q` through the layers' inverses (sequential for IAF layers:
            ``latent_dim`` passes per layer), so every layer must be a pyroflows
            ``Bijector``.  Default ``True``.
        num_quantile_samples: draws used by :meth:`median` and :meth:`quantiles`,
            which are Monte Carlo estimates (a flow has no closed-form quantiles).
        **flow_kw: passed to the architecture.

    The defaults were chosen on the 10-D funnel, centred eight schools and the
    breast-cancer logistic regression: ``docs/bench_autoguides.md`` has the measured
    PSIS k-hat and ESS of the defaults against Pyro's autoguides and what each choice
    changed (``benchmarks/autoguides.py`` and ``benchmarks/autoflow_default.py``
    regenerate them), so the numbers live in one place and are rerun, not copied here.

    Besides the usual autoguide interface (``Predictive``, ``median``,
    ``quantiles``, ``NeuTraReparam`` through ``get_base_dist``/``get_transform``),
    :meth:`diagnostics` reports PSIS k-hat, importance ESS and the log evidence,
    and :meth:`to_inferencedata` returns posterior draws for ArviZ.
    """

    def __init__(self, model, flow: str | Callable | None = None, *, init_loc_fn=init_to_median,
                 init_scale: float = 1.0, linear: bool = True, stl: bool = True,
                 num_quantile_samples: int = 2000, **flow_kw):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if flow is None:
            flow = default_flow
        if not (isinstance(flow, str) or callable(flow)):
            raise TypeError(f"flow must be a name in pyroflows.flows or a callable, got {type(flow).__name__}")
        self._flow_spec = flow
        self._flow_kw = dict(flow_kw)
        self._init_scale = float(init_scale)
        self.num_quantile_samples = int(num_quantile_samples)
        self.stl = bool(stl)
        self._use_linear = bool(linear)
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
        affine = elementwise(self.latent_dim, kind="affine")
        with torch.no_grad():
            affine.params.copy_(affine.transformer.params_for(loc, torch.full_like(loc, math.log(self._init_scale))))
        self.flow = flow.to(dtype=loc.dtype, device=loc.device)
        self.linear = Triangular(self.latent_dim).to(dtype=loc.dtype, device=loc.device) if self._use_linear else None
        self.standardise = affine.to(dtype=loc.dtype, device=loc.device)
        if self.stl:
            bad = [type(t).__name__ for t in self.flow.transforms if not isinstance(t, Bijector)]
            if bad:
                raise ValueError(f"stl=True needs every layer to be a pyroflows Bijector (it recomputes "
                                 f"log q through the layers' inverses); not: {', '.join(bad)}")

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
        return ComposeTransform(self._transforms())

    def sample_latent(self, *args, **kwargs):
        """A draw of the unconstrained latent vector (the guide's auxiliary site); with
        ``stl=True`` its log-density is the path-derivative one (see :class:`AutoFlow`)."""
        posterior = self.get_posterior(*args, **kwargs)
        if self.stl and torch.is_grad_enabled():
            posterior = _StickingTheLanding(posterior, self._detached_log_prob)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    def _detached_log_prob(self, theta):
        density = _FlowDensity(self.flow, self.linear, self.standardise)
        params = {name: p.detach() for name, p in density.named_parameters()}
        return torch.func.functional_call(density, params, (theta,))

    def get_posterior(self, *args, **kwargs):
        """The flow posterior over the unconstrained latent vector, a ``TransformedDistribution``."""
        return dist.TransformedDistribution(self.get_base_dist(), self._transforms())

    def _transforms(self):
        outer = [] if self.linear is None else [self.linear]
        return [self.flow.transform()] + outer + [self.standardise]

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
