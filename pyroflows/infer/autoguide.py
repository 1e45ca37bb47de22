r"""``AutoFlow``: a Pyro autoguide whose posterior is a pyroflows normalizing flow.

Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide, the latent
sites are mapped to the unconstrained reals and concatenated into one vector
:math:`\theta \in \mathbb{R}^D`.  The guide is

.. math::

    u = f_K \circ \dots \circ f_1(z),\quad z \sim p_0 = \prod_d t_{\nu_d}(z_d), \qquad
    \theta = \mu + \sigma \odot L u,

a flow on standardised coordinates, a learnable lower-triangular linear layer
:math:`L` (optional, identity at the start; it makes the guide contain every
full-covariance Gaussian) and a learnable affine layer whose location starts at
``init_loc_fn``'s point and whose scale starts at ``init_scale``.  Every
pyroflows architecture starts at the identity, so training starts from the
mean-field guide :math:`\mathcal N(\mu, \sigma^2)` (what
:class:`~pyro.infer.autoguide.AutoNormal` would be), and the flow only has to
learn the *shape* of the posterior.  The default flow is a 3-layer affine IAF
(:func:`default_flow`); with ``laplace=True`` (default) it starts at the Laplace Gaussian
in whitened coordinates instead (see :class:`AutoFlow`).  The linear layer, the affine layer and the
Laplace whitening are one layer over one parameter tensor, ``guide.affine``
(:class:`~pyroflows.infer.guide_affine.GuideAffine`): in the many small steps of SVI the
cost is per layer and per tensor.  The base :math:`p_0` is a
Student-t per coordinate with learned degrees of freedom (starting at
``TAIL_DF_START`` = 5; ``tail_adaptive=False`` gives the standard normal), so the
guide's tails are polynomial, which keeps importance weights bounded far out.

In a hierarchical model, a normal site whose scale is another latent site's value
(eight schools' :math:`\theta_j \sim \mathcal N(\mu, \tau^2)`) is non-centred inside the
guide: the flow draws :math:`\eta` and a fixed last layer gives :math:`\theta = \mu + \tau\eta`
(:class:`~pyroflows.infer.noncentring.ModelNonCentring`), so the guide follows the funnel's
neck; its density is still one over the model's own latent sites.

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

import copy
import math
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro import poutine
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import ComposeTransform

from ..flow import Flow, StandardNormal, StudentTBase, TailMixtureBase
from ..transforms.base import Bijector
from ..transforms.transformers import Affine
from .guide_affine import GuideAffine
from .diagnostics import ImportanceDiagnostics, guide_log_weights, importance_diagnostics, trace_plate_nesting
from .noncentring import ModelNonCentring, noncentrable_sites

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


def default_flow(latent_dim: int, *, num_layers: int = 3, hidden_dims=(64, 64), log_scale_bound: float = 10.0,
                 input_bound: float | None = None) -> Flow:
    r"""AutoFlow's default flow: ``num_layers`` affine IAF layers (alternating natural and
    reversed MADE orderings), each log-scale softly bounded by ``log_scale_bound``,
    i.e. ``pyroflows.flows.iaf(latent_dim, num_layers=3, kind=Affine(10))``.  Sampling
    and the density of its own samples are one MADE pass per layer (what SVI needs).
    ``input_bound=b`` (default ``None``): conditioners that read ``b tanh(x / b)``, so the
    layers are asymptotically linear and a heavy-tailed base keeps its tails, instead of far
    draws being scaled by up to :math:`e^{10}` per layer (:class:`~pyroflows.nn.MADE`; not the
    default: it raised eight schools' k-hat, ``docs/bench_autoguides.md``, "Heavy tails in
    every direction").
    See :class:`AutoFlow` for the measurements behind it."""
    from ..flows import iaf

    return iaf(latent_dim, num_layers=num_layers, hidden_dims=hidden_dims, kind=Affine(log_scale_bound),
               input_bound=input_bound)


class _FlowDensity(torch.nn.Module):
    """``log q(theta)`` of the guide recomputed from scratch (layer inverses, no cache), so that
    :func:`torch.func.functional_call` can evaluate it with detached parameters."""

    def __init__(self, flow: Flow, affine, outer=()):
        super().__init__()
        self.flow = flow
        self.affine = affine
        self.outer = list(outer)  # fixed maps after the affine stage (non-centring), no parameters

    def forward(self, theta):
        outer_ladj = 0.0
        for t in reversed(self.outer):
            v = t.inv(theta)
            outer_ladj = outer_ladj + t.log_abs_det_jacobian(v, theta)
            theta = v
        u, ladj = self.affine.inverse_and_ladj(theta, cache=False)
        ladj = ladj + outer_ladj
        return self.flow.log_prob(u, cache=False) - ladj


#: how far (nats) the path-derivative log q may differ from the forward pass's before AutoFlow
#: falls back to the standard gradient for the step: ``atol + rtol * |log q|`` (float32 round-off
#: of the layer inverses is far below this)
STL_ATOL, STL_RTOL = 1e-2, 1e-3


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

    def __init__(self, posterior, log_density, on_fallback=None):
        self.posterior, self._log_density, self._on_fallback = posterior, log_density, on_fallback
        super().__init__(posterior.batch_shape, posterior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.posterior.support

    def expand(self, batch_shape, _instance=None):
        return _StickingTheLanding(self.posterior.expand(batch_shape), self._log_density, self._on_fallback)

    def rsample(self, sample_shape=()):
        return self.posterior.rsample(sample_shape)

    def sample(self, sample_shape=()):
        return self.posterior.sample(sample_shape)

    def log_prob(self, value):
        """The path-derivative log-density, checked against the forward pass's (cached) one on
        the same draws; where they disagree (the layer inverses lost precision, e.g. after an
        exploding step) or either is not finite, the forward one is returned: the standard
        gradient for this step, never a wrong or NaN one."""
        forward = self.posterior.log_prob(value)
        stl = self._log_density(value)
        with torch.no_grad():
            gap = (stl - forward).abs()
            ok = bool(torch.isfinite(stl).all() and (gap <= STL_ATOL + STL_RTOL * forward.abs()).all())
        if ok:
            return stl
        if self._on_fallback is not None:
            self._on_fallback(float(gap.nan_to_num(math.inf).max()))
        return forward



#: the tail-adaptive base's starting degrees of freedom: heavy enough that the reverse-KL fit keeps
#: the tails a posterior needs (from 30 it never found them; see AutoFlow's ``tail_adaptive``)
TAIL_DF_START = 5.0
#: the standardising affine layer's scales are bounded to (e^-12, e^12): posterior sds from
#: 1e-5 to 1e5 in the unconstrained space, and no step can blow them up
SCALE_BOUND = 12.0
#: the Laplace start: latent dimensions up to this (an exact D x D Hessian), L-BFGS iterations,
#: Newton steps after them, and draws of the ELBO that decides between it and the init_loc_fn start
LAPLACE_MAX_DIM, LAPLACE_MAX_ITER, LAPLACE_NEWTON_STEPS, LAPLACE_ELBO_DRAWS = 500, 200, 20, 32
#: the MAP search's loss at a trial point outside the density's support (finite, so that the
#: line search's cubic interpolation stays finite in float32 too)
LAPLACE_BARRIER = 1e10


def _newton_direction(hess: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    r""":math:`H^{-1} g`; where :math:`H` is not positive definite (a point on a ridge or near a
    saddle, away from the mode, where L-BFGS can stop on a badly scaled posterior) each
    eigenvalue is replaced by its magnitude (saddle-free Newton: Dauphin et al., "Identifying and
    attacking the saddle point problem in high-dimensional non-convex optimization", NeurIPS
    2014), which is a descent direction whose length follows the curvature."""
    if int(torch.linalg.cholesky_ex(hess).info) == 0:
        return torch.linalg.solve(hess, grad)
    values, vectors = torch.linalg.eigh(hess)
    magnitudes = values.abs().clamp_min(float(values.abs().max()) * 1e-12)
    return vectors @ ((vectors.T @ grad) / magnitudes)


def _unsamplable_at_origin(init_loc_fn):
    """``init_loc_fn``, except that a site whose distribution cannot be sampled (Pyro's init
    strategies all draw from it; ``ImproperUniform``, a flat prior, refuses) starts at the
    point 0 of the unconstrained space."""

    def init(site):
        try:
            return init_loc_fn(site)
        except NotImplementedError:
            fn = site["fn"]
            t = transform_to(fn.support)
            shape = t.inverse_shape(fn.batch_shape + fn.event_shape)
            return t(torch.zeros(shape, dtype=torch.get_default_dtype())).detach()

    return init


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
            (standard normal by default) is the guide's base, or with ``tail_adaptive``
            (default) a :class:`~pyroflows.StudentTBase` in place of a standard normal.
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
            ``Bijector``.  Default ``False`` since the posteriordb benchmark
            (docs/bench_posteriordb.md): with the Laplace start, STL gave higher k-hat
            (gp_regr, 500 steps: 0.71 with STL, 0.19 without; kilpisjarvi similar).
        laplace: start from the Laplace approximation (default ``True``): the MAP of the
            unconstrained latent vector (L-BFGS from ``init_loc_fn``'s point, polished by
            Newton steps) and the inverse Hessian there, :math:`\mathcal N(\hat\theta,
            CC^\top)`.  The guide becomes :math:`\theta = \hat\theta + C\,(\mu + \sigma
            \odot L f(z))` with every trained layer at the identity, so it starts at the
            Laplace Gaussian and learns in whitened coordinates, where an optimizer step of
            size ``lr`` moves q by about ``lr`` posterior sds whatever the scales and
            correlations of the model's parameters (an uncentred regression's intercept and
            slope, sds 4000x apart and correlated at 0.99999, fit like a standard normal).  Kept
            only when it exists (finite mode, positive-definite Hessian, ``latent_dim`` <= 500)
            and its ELBO beats the ``init_loc_fn`` start on common draws (a funnel's mode in
            the neck loses); ``guide.start`` says which was used.
        average: iterate averaging, e.g. ``0.99`` (default ``None``: off).  Every SVI step
            folds the parameters into an average (a running mean for the first
            ``1 / (1 - average)`` = 100 steps, then an exponential moving average with that
            time constant); draws taken under ``torch.no_grad`` (``Predictive``,
            :meth:`sample_posterior`, :meth:`quantiles`, :meth:`diagnostics`,
            :meth:`to_inferencedata`) come from the averaged guide, SVI itself trains the
            live parameters.  It removes the step-to-step jitter of the last iterate, so the
            moments the user reads no longer move with the optimizer's noise.  Off by
            default: averaging flow parameters raised k-hat in the posteriordb checks
            (kilpisjarvi 0.81 vs 0.46, gp_regr 0.71 vs 0.58), and the Laplace start plus a
            decaying learning rate already kept the moments still there.
        tail_adaptive: replace the flow's standard-normal base by a Student-t base with a
            learned degree of freedom per coordinate (:class:`~pyroflows.StudentTBase`,
            starting at ``TAIL_DF_START`` = 5), so the guide has polynomial, heavier-than-Gaussian tails, which
            layers on a Gaussian base cannot make (Jaini et al. 2020).  ``None`` (default): do so
            when the flow has the standard-normal base, keep a flow's own base otherwise;
            ``True``: require it (a flow with its own base is refused); ``False``: keep the
            standard normal.  On by default because
            importance weights :math:`p/q` stay bounded far out, which is what PSIS k-hat
            measures (posteriordb, 3 seeds: mean k-hat lower on 7 of the 8 posteriors, e.g.
            kilpisjarvi 0.57 -> 0.15, arma 0.52 -> 0.24, higher on hmm_drive, 0.61 -> 0.73;
            docs/bench_posteriordb.md).  ``"mixture"``: the base is
            :class:`~pyroflows.TailMixtureBase` instead (independent t coordinates mixed with an
            elliptical multivariate t, heavy in every direction).  On a 5-D multivariate t
            posterior it gave k-hat 0.17 / 0.08 / 0.33 against 0.71 / 0.40 / 0.50 (three seeds);
            it is not the default because on centred eight schools it raised k-hat (six seeds,
            with ``input_bound=5``: 0.40 / 0.29 / 0.64 / 0.38 / 0.39 / 0.36 against the product
            base's 0.36 / 0.24 / 0.24 / 0.15 / 0.47 / 0.43)
            (``docs/bench_autoguides.md``, "Heavy tails in every direction").  The start matters: the ELBO moves the degrees of
            freedom little, and from 30 they only drifted up (to 35-50), so that start never
            found a heavy tail.  From 5 the fit keeps the tails it needs: on the Cauchy-location
            posterior (tails :math:`|\mu|^{-6}`, a t with 5 degrees of freedom) they ended at
            5.3-5.5 in the first runs, and k-hat drops from 0.39-1.68 to -0.11-0.19 (3 seeds);
            on posteriordb the mean k-hat drops on every posterior, hmm_drive's from 0.73 to
            0.27 (docs/bench_autoguides.md, "Starting degrees of freedom").
        noncentre: non-centre inside the guide every latent normal site whose standard
            deviation depends on another latent site (found with autograd at the first call,
            listed in ``guide.noncentred_sites``): the flow's coordinates for such a site are
            :math:`\eta` and the guide's value is :math:`\theta = m + s\,\eta` with the
            model's own mean :math:`m` and sd :math:`s` at the draws of the sites before it
            (:class:`~pyroflows.infer.noncentring.ModelNonCentring`, one model run per pass,
            exact log-Jacobian :math:`\sum \log s`).  The model is not changed, and neither are
            the guide's sites, its importance weights or k-hat's meaning.  Default ``True``:
            on centred eight schools the guide then reaches the funnel's neck (mass below
            ``log tau = 0``: 0.5-4% -> 15-20%, the posterior's 20%) and k-hat drops from
            0.63 / 0.53 / 0.83 to 0.36 / 0.24 / 0.24 (three seeds; one fit of six in two
            benchmarks stays at 0.53); the 10-D funnel becomes a product of normals in the
            flow's coordinates, k-hat 0.61-0.71 -> 0.07-0.09 (``docs/bench_autoguides.md``,
            "Non-centring inside the guide").  It costs one model run per step.  A model with
            no such site is unaffected.
        tail_df: the tail-adaptive base's starting degrees of freedom (default
            ``TAIL_DF_START`` = 5; must be above 2, the base's lower bound).  The guide starts
            with the scales ``init_scale`` (or the Laplace ones) whatever the base: the
            standardising layer divides by the base's standard deviation.
        num_quantile_samples: draws used by :meth:`median` and :meth:`quantiles`,
            which are Monte Carlo estimates (a flow has no closed-form quantiles).
        **flow_kw: passed to the architecture.

    The defaults were first chosen on the 10-D funnel, centred eight schools and the
    breast-cancer logistic regression (``docs/bench_autoguides.md``, measured with
    ``stl=True`` and without the Laplace start, before issue 16 changed the defaults) and
    then on eight real posteriors from posteriordb (``docs/bench_posteriordb.md``):
    ``benchmarks/autoguides.py``, ``benchmarks/autoflow_default.py`` and
    ``benchmarks/posteriordb/`` regenerate them, so the numbers live in one place and are
    rerun, not copied here.

    Robustness (issue 16, real posteriors): a step whose loss or gradient is not finite
    leaves the parameters finite (non-finite gradient entries are replaced by 0; counted in
    ``guide.num_nonfinite_grads``, warned once); with ``stl=True`` the path-derivative
    :math:`\log q` is checked against the forward pass on the same draws, and where they
    disagree (the layer inverses lost precision) the step uses the standard gradient
    (``guide.num_stl_fallbacks``, warned once); the standardising scales are bounded to
    :math:`(e^{-12}, e^{12})`; sites that cannot be sampled (a flat ``ImproperUniform``
    prior) start at the origin of the unconstrained space.

    Checking convergence: (1) the running mean of the SVI losses over the last few hundred
    steps no longer decreases by more than its own noise (compare the means of two
    consecutive windows of, say, 200 steps against their standard errors); (2)
    ``guide.diagnostics(*args)`` gives PSIS k-hat (< 0.7 to trust the guide, < 0.5 good) and
    the importance-sampled log evidence, which should agree with ``-loss`` to within the
    gap the k-hat implies; (3) posterior means and sds from ``guide.quantiles`` or
    ``sample_posterior`` at two points of the run (say 75% and 100% of the steps) agree to a
    small fraction of a posterior sd.  ``benchmarks/posteriordb/`` runs (1)-(3) against
    reference draws.  A decaying learning rate, as in the benchmarks
    (``pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / num_steps)})``), keeps the
    last moments still; ``average=0.99`` smooths them further.

    Besides the usual autoguide interface (``Predictive``, ``median``,
    ``quantiles``, ``NeuTraReparam`` through ``get_base_dist``/``get_transform``),
    :meth:`diagnostics` reports PSIS k-hat, importance ESS and the log evidence,
    and :meth:`to_inferencedata` returns posterior draws for ArviZ.
    """

    def __init__(self, model, flow: str | Callable | None = None, *, init_loc_fn=init_to_median,
                 init_scale: float = 1.0, linear: bool = True, stl: bool = False, laplace: bool = True,
                 average: float | None = None, tail_adaptive: bool | str | None = None,
                 tail_df: float = TAIL_DF_START,
                 noncentre: bool = True, num_quantile_samples: int = 2000, **flow_kw):
        if average is not None and not 0.0 <= average <= 1.0:
            raise ValueError(f"average must be None or in [0, 1], got {average}")
        if not tail_df > 2:
            raise ValueError(f"tail_df must be > 2 (the base's lower bound on the degrees of freedom), got {tail_df}")
        self.tail_df = float(tail_df)
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
        self.laplace = bool(laplace)
        self.average = average
        if isinstance(tail_adaptive, str) and tail_adaptive != "mixture":
            raise ValueError(f"tail_adaptive must be None, True, False or 'mixture', got {tail_adaptive!r}")
        self.tail_adaptive = tail_adaptive if tail_adaptive in (None, "mixture") else bool(tail_adaptive)
        self.noncentre = bool(noncentre)
        self.noncentred_sites = []  # set at the first call
        self._averaged = None  # (flow, affine) copies holding the iterate average
        self.num_averaged = 0
        self.start = None  # "laplace" or "init_loc", set at the first call
        self.num_stl_fallbacks = 0
        self.num_nonfinite_grads = 0
        super().__init__(model, init_loc_fn=_unsamplable_at_origin(init_loc_fn))
        self._user_model = (model,)  # a tuple keeps nn.Module from registering it

    # -- setup ---------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        finally:
            # runs even when Pyro fails to biject a discrete support, so the user
            # sees which site is the problem rather than a support error
            self._refuse_discrete_sites()
        self._model_args = (args, kwargs)  # the latest call's, for the non-centring layer
        self._model_nesting = trace_plate_nesting(self.prototype_trace)
        self.noncentred_sites = self._find_noncentrable(args, kwargs) if self.noncentre else []
        loc = self._init_loc().detach()
        for t in self._noncentring(args, kwargs):  # the start, in the flow's (non-centred) coordinates
            loc = t.inv(loc).detach()
        flow = _build_flow(self._flow_spec, self.latent_dim, self._flow_kw)
        own_base = type(flow.base) is not StandardNormal  # a StandardUniform is a subclass: not replaced
        if self.tail_adaptive and own_base:
            raise ValueError("tail_adaptive=True replaces the flow's standard-normal base; this flow has "
                             f"its own base ({type(flow.base).__name__}); leave tail_adaptive at None")
        if self.tail_adaptive is not False and not own_base:
            base = TailMixtureBase if self.tail_adaptive == "mixture" else StudentTBase
            flow.base = base(self.latent_dim, df=self.tail_df)
        self.flow = flow.to(dtype=loc.dtype, device=loc.device)
        self.affine = GuideAffine(self.latent_dim, linear=self._use_linear, scale_bound=SCALE_BOUND).to(
            dtype=loc.dtype, device=loc.device)
        scale = torch.full_like(loc, self._init_scale)
        self.start = "init_loc"
        self.whiten_loc = self.whiten_tril = None
        start = self._laplace_start(loc, scale, args, kwargs) if self.laplace else None
        if start is None:
            self._set_affine(loc, scale)
        else:
            # theta = mode + C affine(flow(z)): every trained layer starts at the
            # identity in the Laplace-whitened coordinates, where the posterior has sds ~1 and no
            # correlation, so an optimizer step of size lr moves q by ~lr posterior sds whatever
            # the scales and correlations of the raw coordinates
            self.whiten_loc, self.whiten_tril = start
            self.affine.set_whitening(*start)
            self._set_affine(torch.zeros_like(loc), torch.ones_like(loc))
            self.start = "laplace"
        if self.average is not None:  # copied before the hooks: the average has no gradients
            self._averaged = tuple(copy.deepcopy(m) for m in (self.flow, self.affine))
            for m in self._averaged:
                for q in m.parameters():
                    q.requires_grad_(False)
        for param in self.parameters():
            param.register_hook(self._finite_grad)
        if self.stl:
            bad = [type(t).__name__ for t in self.flow.transforms if not isinstance(t, Bijector)]
            if bad:
                raise ValueError(f"stl=True needs every layer to be a pyroflows Bijector (it recomputes "
                                 f"log q through the layers' inverses); not: {', '.join(bad)}")

    def _find_noncentrable(self, args, kwargs) -> list[str]:
        try:
            return noncentrable_sites(self, args, kwargs)
        except Exception as err:  # a model that cannot run with gradient-tracking values: stay centred
            warnings.warn(f"AutoFlow: could not look for sites to non-centre ({type(err).__name__}: {err}); "
                          "the guide stays centred (noncentre=False silences this)", RuntimeWarning, stacklevel=3)
            return []

    @torch.no_grad()
    def _set_affine(self, loc, scale):
        r"""Set the standardising affine layer so that the guide starts with mean ``loc`` and
        standard deviations ``scale``: ``loc + scale / s0 * u`` for a base of standard deviations
        ``s0`` (:math:`\sqrt{\nu / (\nu - 2)}` for the Student-t base, 1 for the normal one;
        scales clamped to the layer's bound)."""
        base = self.flow.base
        if isinstance(base, StudentTBase):  # TailMixtureBase included
            scale = scale / base().stddev.detach().to(scale)
        params = self.affine.transformer.params_for(loc, scale.log())
        self.affine.params.copy_(params.to(self.affine.params.dtype))

    def _finite_grad(self, grad):
        """Gradient hook: a non-finite gradient entry (a NaN/inf loss, e.g. a draw far in a
        tail where the model overflows) is replaced by 0, so the step cannot poison the
        parameters; the user is warned once."""
        # one reduction on the hot path: a finite sum means no NaN/inf entry (NaN and inf
        # propagate through a sum); only an overflowing sum needs the elementwise check
        if math.isfinite(float(grad.sum())) or torch.isfinite(grad).all():
            return grad
        self.num_nonfinite_grads += 1
        if self.num_nonfinite_grads == 1:
            warnings.warn("AutoFlow: a non-finite gradient (NaN or inf loss) was replaced by 0 so that the "
                          "parameters stay finite; the fit continues (count in guide.num_nonfinite_grads). "
                          "If this repeats, lower the learning rate or check the model's density.",
                          RuntimeWarning, stacklevel=2)
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def _update_average(self):
        r"""Fold the current parameters (just updated by the optimizer) into the iterate average:
        :math:`\bar\phi \leftarrow \bar\phi + w (\phi - \bar\phi)`, :math:`w = \max(1/n,
        1 - \text{average})` (a running mean for the first ``1 / (1 - average)`` steps, then
        an exponential moving average with that time constant)."""
        self.num_averaged += 1
        w = max(1.0 / self.num_averaged, 1.0 - self.average)
        for avg, live in zip(self._averaged, (self.flow, self.affine)):
            for a, p in zip(avg.parameters(), live.parameters()):
                a.lerp_(p.detach(), w)

    def _modules_in_use(self):
        """``(flow, affine)``: the trained ones while gradients are on (SVI), the iterate
        average under ``torch.no_grad`` (Predictive, the summaries, diagnostics)."""
        if self._averaged is not None and self.num_averaged > 0 and not torch.is_grad_enabled():
            return self._averaged
        return self.flow, self.affine

    def _stl_fallback(self, gap: float):
        self.num_stl_fallbacks += 1
        if self.num_stl_fallbacks == 1:
            warnings.warn(f"AutoFlow: the path-derivative (STL) log q, recomputed through the layer "
                          f"inverses, differed from the forward pass by {gap:.3g} nats on this step; this "
                          f"step used the standard gradient instead (count in guide.num_stl_fallbacks).",
                          RuntimeWarning, stacklevel=2)

    # -- the Laplace start ------------------------------------------------------
    def _log_joint(self, theta, args, kwargs):
        r""":math:`\log p(x, \theta)` plus the log-Jacobian of the map to the constrained
        space, for one unconstrained latent vector ``theta`` (shape ``(D,)``)."""
        values, log_jac = {}, 0.0
        for t in self._noncentring(args, kwargs):
            centred = t(theta)
            log_jac = log_jac + t.log_abs_det_jacobian(theta, centred)
            theta = centred
        for site, u in self._unpack_latent(theta):
            t = biject_to(site["fn"].support)
            x = t(u)
            values[site["name"]] = x
            log_jac = log_jac + t.log_abs_det_jacobian(u, x).sum()
        conditioned = poutine.condition(self._user_model[0], data=values)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        return trace.log_prob_sum() + log_jac

    def _gaussian_elbo(self, loc, tril, eps, args, kwargs) -> float:
        """Monte Carlo ELBO of the Gaussian ``loc + tril @ eps`` (common draws ``eps``)."""
        total = 0.0
        for e in eps:
            total += float(self._log_joint(loc + tril @ e, args, kwargs))
        entropy = float(torch.diagonal(tril).log().sum()) + 0.5 * len(loc) * (1.0 + math.log(2 * math.pi))
        return total / len(eps) + entropy

    def _laplace_start(self, loc, scale, args, kwargs):
        r"""``(mode, chol)`` of the Laplace approximation :math:`\mathcal N(\hat\theta, C C^\top)`,
        :math:`C C^\top = H^{-1}`, at the MAP :math:`\hat\theta` of the unconstrained latent
        vector (L-BFGS in float64 from ``init_loc_fn``'s point, then the exact Hessian); or
        ``None`` when there is no usable mode (no finite MAP, a Hessian that is not positive
        definite) or when its ELBO is lower than that of the ``init_loc_fn`` start
        :math:`\mathcal N(\theta_0, \text{init\_scale}^2 I)` on common draws (a mode in a
        funnel's narrow neck loses that comparison)."""
        if self.latent_dim > LAPLACE_MAX_DIM:
            return None
        for dtype in (torch.float64, loc.dtype):
            try:
                return self._laplace_in(dtype, loc, scale, args, kwargs)
            except (RuntimeError, ValueError, FloatingPointError, torch.linalg.LinAlgError):
                continue
        return None

    def _laplace_in(self, dtype, loc, scale, args, kwargs):
        with torch.enable_grad():
            theta = loc.detach().to(dtype).clone().requires_grad_()
            opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=LAPLACE_MAX_ITER, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12)

            finite_evals = 0

            def closure():
                nonlocal finite_evals
                opt.zero_grad()
                try:
                    loss = -self._log_joint(theta, args, kwargs)
                except ValueError:  # a trial point where a distribution's parameter leaves its support
                    loss = None
                if loss is None or not torch.isfinite(loss):
                    # outside the density's support (an ARMA's |theta| > 1, an overflowed scale): a
                    # barrier value makes the strong-Wolfe line search shrink the step rather than
                    # end the search; the start point itself must be finite
                    if not finite_evals:
                        raise FloatingPointError("non-finite log density at the start of the MAP search")
                    theta.grad = torch.zeros_like(theta)
                    return torch.tensor(LAPLACE_BARRIER, dtype=dtype)
                finite_evals += 1
                loss.backward()
                return loss

            opt.step(closure)
            mode, hess = self._newton(theta.detach(), args, kwargs)
        chol = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess))).to(dtype)
        if not (torch.isfinite(mode).all() and torch.isfinite(chol).all()):
            return None
        gen = torch.Generator(device="cpu").manual_seed(0)
        eps = torch.randn(LAPLACE_ELBO_DRAWS, self.latent_dim, generator=gen, dtype=torch.float64).to(mode)
        with torch.no_grad():
            elbo_laplace = self._gaussian_elbo(mode, chol, eps, args, kwargs)
            elbo_init = self._gaussian_elbo(loc.to(dtype), torch.diag(scale.to(dtype)), eps, args, kwargs)
        if not math.isfinite(elbo_laplace) or (math.isfinite(elbo_init) and elbo_init >= elbo_laplace):
            return None
        return mode.to(loc.dtype), chol.to(loc.dtype)

    def _newton(self, theta, args, kwargs, steps: int = LAPLACE_NEWTON_STEPS):
        """Polish a mode with damped Newton steps (exact Hessian; L-BFGS alone stalls on
        ridges such as an uncentred regression's intercept/slope); returns ``(mode, Hessian)``
        of the negative log joint, the Hessian symmetrised in float64."""
        def neg(t):
            return -self._log_joint(t, args, kwargs)

        def grad_hess(t):
            t = t.detach().requires_grad_()
            g = torch.autograd.grad(neg(t), t)[0]
            h = torch.autograd.functional.hessian(neg, t.detach())
            return g.detach().double(), 0.5 * (h + h.T).double()

        g, h = grad_hess(theta)
        for _ in range(steps):
            step = _newton_direction(h, g)
            decrement = float(g @ step)
            if not decrement > 1e-12:  # converged, or not a descent direction (no usable mode)
                break
            f0, scale = float(neg(theta)), 1.0
            while scale > 1e-4:
                trial = theta - (scale * step).to(theta)
                if float(neg(trial)) < f0:
                    theta = trial
                    break
                scale *= 0.5
            else:
                break
            g, h = grad_hess(theta)
        return theta, h

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
        """The flow's base :math:`p_0` over the latent vector (Student-t with learned degrees of
        freedom by default, standard normal with ``tail_adaptive=False``)."""
        return self._modules_in_use()[0].base_distribution()

    def get_transform(self, *args, **kwargs):
        """The composed map base -> unconstrained latent (flow, then the affine layer; then the
        non-centring layer, which runs the model: without arguments, with those of the guide's
        latest call, as ``NeuTraReparam`` asks for it)."""
        return ComposeTransform(self._transforms(args=args, kwargs=kwargs))

    def sample_latent(self, *args, **kwargs):
        """A draw of the unconstrained latent vector (the guide's auxiliary site); with
        ``stl=True`` its log-density is the path-derivative one (see :class:`AutoFlow`)."""
        if self._averaged is not None and torch.is_grad_enabled():
            self._update_average()
        self._model_args = (args, kwargs)
        posterior = self.get_posterior(*args, **kwargs)
        if self.stl and torch.is_grad_enabled():
            posterior = _StickingTheLanding(posterior, lambda theta: self._detached_log_prob(theta, args, kwargs),
                                            self._stl_fallback)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    def _detached_log_prob(self, theta, args=(), kwargs=None):
        density = _FlowDensity(self.flow, self.affine, self._noncentring(args, kwargs or {}))
        params = {name: p.detach() for name, p in density.named_parameters()}
        return torch.func.functional_call(density, params, (theta,))

    def get_posterior(self, *args, **kwargs):
        """The flow posterior over the unconstrained latent vector, a ``TransformedDistribution``."""
        # one look-up of the modules per call: each PyroModule attribute access registers every
        # parameter of the submodule with Pyro again (a fifth of a step's cost when done twice)
        modules = self._modules_in_use()
        return dist.TransformedDistribution(modules[0].base_distribution(), self._transforms(modules, args, kwargs))

    def _transforms(self, modules=None, args=(), kwargs=None):
        flow, affine = self._modules_in_use() if modules is None else modules
        return [flow.transform(), affine] + self._noncentring(args, kwargs or {})

    def _noncentring(self, args, kwargs) -> list:
        """The fixed map from the flow's non-centred coordinates to the latent vector
        (:class:`~pyroflows.infer.noncentring.ModelNonCentring`, bound to the model's
        arguments), or nothing."""
        if not self.noncentred_sites:
            return []
        if not args and not kwargs:  # NeuTraReparam, or summaries called without the data
            args, kwargs = self._model_args
        return [ModelNonCentring(self, self.noncentred_sites, args, kwargs, self._model_plate_nesting())]

    def _model_plate_nesting(self) -> int:
        """Plate dimensions of the whole model (observed sites too), from the prototype trace."""
        return self._model_nesting

    # -- summaries ----------------------------------------------------------------
    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, max_plate_nesting: int | None = None,
                         **kwargs) -> dict[str, torch.Tensor]:
        """``num_samples`` posterior draws of each latent site in the constrained space,
        as a dict ``name -> tensor of shape (num_samples, *site_shape)``.  ``max_plate_nesting``
        (as in Pyro's ``Predictive``) defaults to the latent sites' own plates."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.get_posterior(*args, **kwargs).sample((int(num_samples),))
        nesting = self._prototype_plate_nesting() if max_plate_nesting is None else int(max_plate_nesting)
        if nesting < self._prototype_plate_nesting():
            raise ValueError(f"max_plate_nesting={nesting} is smaller than the model's latent plates "
                             f"({self._prototype_plate_nesting()})")
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

    def to_inferencedata(self, *args, num_samples: int = 1000, max_plate_nesting: int | None = None, **kwargs):
        """An ArviZ ``InferenceData`` with ``num_samples`` posterior draws (one chain) of each
        latent site in the constrained space (``max_plate_nesting`` as in ``Predictive``; the
        model is never run unconditioned)."""
        import arviz

        draws = self.sample_posterior(num_samples, *args, max_plate_nesting=max_plate_nesting, **kwargs)
        return arviz.from_dict(posterior={k: v.unsqueeze(0).cpu().numpy() for k, v in draws.items()})
