r"""Continuous normalizing flows: a neural ODE as one invertible layer (FFJORD).

The layer maps :math:`x = z(0)` to :math:`y = z(1)` by integrating

.. math::

    \frac{dz}{dt} = f_\theta(z, t),
    \qquad
    \frac{d}{dt}\log|\det \partial z(t)/\partial z(0)| = \operatorname{tr}\frac{\partial f_\theta}{\partial z}(z(t), t),

so :math:`\frac{d \log p(z(t))}{dt} = -\operatorname{tr}(\partial f/\partial z)`
(the instantaneous change of variables, Chen et al. 2018).  Any network can be
the dynamics; the state and the log-determinant are integrated jointly by
``torchdiffeq`` (an optional dependency: ``pip install 'pyroflows[ode]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.mlp import MLP
from .base import Bijector, ConditionalBijector
from .elementwise import check_context_dim, check_input_dim
from .residual import ConvergenceError

__all__ = [
    "ConditionalContinuousFlow",
    "ContinuousFlow",
    "conditional_continuous_flow",
    "continuous_flow",
]

TRACES = ("auto", "exact", "hutchinson")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# "auto" uses the exact trace up to this dimension (D vector-Jacobian products per
# function evaluation instead of one) and Hutchinson's estimator above it
AUTO_EXACT_MAX_DIM = 8


def _torchdiffeq():
    try:
        import torchdiffeq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "continuous flows (ContinuousFlow, flows.ffjord) solve their ODE with torchdiffeq, which is "
            "not installed: pip install 'pyroflows[ode]' (or pip install torchdiffeq)") from e
    return torchdiffeq


def default_tol(dtype) -> float:
    """Solver tolerance scaled to the dtype: :math:`\\epsilon^{0.7}` (float32 1.4e-5, float64 1.1e-11)."""
    return torch.finfo(dtype).eps ** 0.7


def regularization_loss(module: nn.Module):
    """Sum and clear the ``regularization`` recorded by every continuous layer inside ``module``.

    Training loops add this to their loss right after the pass that produced
    it (``loss = loss + regularization_loss(flow)``); each recorded value is
    handed out once, so a value whose graph was already consumed is never added
    twice.  Returns ``0.0`` when no layer recorded one (no penalty configured).
    """
    total = 0.0
    for m in module.modules():
        reg = getattr(m, "regularization", None)
        if isinstance(m, _ODESolve) and reg is not None:
            total = total + reg
            m.regularization = None
    return total


class _Augmented(nn.Module):
    """The augmented ODE ``(z, log-det, kinetic, frobenius)'`` for one solve.

    An ``nn.Module`` so ``odeint_adjoint`` finds the dynamics' parameters.  The
    inner vector-Jacobian products keep their graph only when gradients are
    enabled at call time (a training pass, or the adjoint's backward solve).
    """

    def __init__(self, dynamics, context, exact, noise, kinetic, frobenius, count):
        super().__init__()
        self.dynamics = dynamics
        self.context, self.exact, self.noise = context, exact, noise
        self.kinetic, self.frobenius, self.count = kinetic, frobenius, count

    def forward(self, t, state):
        self.count()
        z = state[0]
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            f = self.dynamics(z, t, self.context)
            if self.exact:
                rows = [torch.autograd.grad(f[..., i].sum(), z, create_graph=create, retain_graph=True)[0]
                        for i in range(z.shape[-1])]
                div = sum(r[..., i] for i, r in enumerate(rows))
                frob = sum(r.square().sum(-1) for r in rows) if self.frobenius else None
            else:
                eJ = torch.autograd.grad(f, z, self.noise, create_graph=create)[0]
                div = (eJ * self.noise).sum(-1)
                frob = eJ.square().sum(-1) if self.frobenius else None
        out = [f, div]
        if self.kinetic:
            out.append(f.square().sum(-1))
        if self.frobenius:
            out.append(frob)
        if not create:
            out = [o.detach() for o in out]
        return tuple(out)


class _Dynamics(nn.Module):
    r"""The vector field :math:`f(z, t; c)`: an :class:`~pyroflows.nn.MLP` of ``[z, t, c]``."""

    def __init__(self, input_dim, context_dim, hidden, activation):
        super().__init__()
        self.net = MLP(input_dim + 1 + context_dim, input_dim, hidden, activation, zero_init=True)

    def forward(self, z, t, context=None):
        parts = [z, t.to(z).expand(*z.shape[:-1], 1)]
        if context is not None:
            parts.append(context.expand(*z.shape[:-1], context.shape[-1]))
        return self.net(torch.cat(parts, -1))


class _ODESolve:
    """Solver settings and the one solve shared by the plain and the conditional layer."""

    def _setup(self, input_dim, context_dim, hidden_dims, activation, trace, method, rtol, atol,
               max_num_steps, adjoint, kinetic_energy, jacobian_norm):
        check_input_dim(input_dim)
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"{name} must be > 0 (or None for the dtype default), got {tol}")
        if max_num_steps < 1:
            raise ValueError(f"max_num_steps must be >= 1, got {max_num_steps}")
        if kinetic_energy < 0 or jacobian_norm < 0:
            raise ValueError("kinetic_energy and jacobian_norm are penalty weights and must be >= 0")
        self.event_shape = (input_dim,)
        self.dynamics = _Dynamics(input_dim, context_dim, tuple(hidden_dims), activation)
        if trace == "auto":
            trace = "exact" if input_dim <= AUTO_EXACT_MAX_DIM else "hutchinson"
        self.trace = trace
        self.method, self.rtol, self.atol, self.max_num_steps = method, rtol, atol, max_num_steps
        self.adjoint = adjoint
        self.kinetic_energy, self.jacobian_norm = float(kinetic_energy), float(jacobian_norm)
        self.regularization = None
        self.nfe = 0
        self.nfe_total = 0

    @property
    def trace(self) -> str:
        """``"exact"`` or ``"hutchinson"``; may be switched after training (e.g. exact for evaluation)."""
        return self._trace

    @trace.setter
    def trace(self, mode: str):
        if mode not in TRACES[1:]:
            raise ValueError(f"trace must be one of {TRACES[1:]}, got {mode!r}")
        self._trace = mode
        self.exact_log_det = mode == "exact"

    def _count(self):
        self.nfe_total += 1

    def __getstate__(self):
        # the recorded penalty may hold a live autograd graph: never copy or pickle it
        state = super().__getstate__()
        state["regularization"] = None
        return state

    def _solve(self, x, context, reverse: bool):
        odeint = _torchdiffeq()
        batch = x.shape[:-1] if context is None else torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        x = x.expand(*batch, x.shape[-1])
        exact = self.trace == "exact"
        noise = None if exact else torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        kinetic, frobenius = self.kinetic_energy > 0, self.jacobian_norm > 0
        func = _Augmented(self.dynamics, context, exact, noise, kinetic, frobenius, self._count)
        zeros = x.new_zeros(batch)
        state = (x, zeros) + (zeros,) * (kinetic + frobenius)
        t = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        tol = default_tol(x.dtype)
        kw = dict(rtol=self.rtol if self.rtol is not None else tol,
                  atol=self.atol if self.atol is not None else tol, method=self.method)
        if self.method in ADAPTIVE:
            kw["options"] = {"max_num_steps": self.max_num_steps}
        start = self.nfe_total
        try:
            if self.adjoint:
                params = tuple(p for p in self.dynamics.parameters() if p.requires_grad)
                if context is not None and context.requires_grad:
                    params += (context,)
                out = odeint.odeint_adjoint(func, state, t, adjoint_params=params, **kw)
            else:
                out = odeint.odeint(func, state, t, **kw)
        except (AssertionError, RuntimeError) as e:
            raise ConvergenceError(
                f"{type(self).__name__}: the ODE solver ({self.method}, rtol={kw['rtol']:.2g}, "
                f"atol={kw['atol']:.2g}, max_num_steps={self.max_num_steps}) failed after "
                f"{self.nfe_total - start} function evaluations: {e}. Loosen rtol/atol, raise "
                f"max_num_steps, or regularise the dynamics (kinetic_energy=, jacobian_norm=)") from e
        self.nfe = self.nfe_total - start
        end = [s[-1] for s in out]
        y, logdet = end[0], end[1]
        if not (torch.isfinite(y).all() and torch.isfinite(logdet).all()):
            raise ConvergenceError(f"{type(self).__name__}: the ODE solution became non-finite")
        sign = -1.0 if reverse else 1.0  # integrating 1 -> 0 accumulates minus the integrals
        reg = 0.0
        if kinetic:
            reg = reg + self.kinetic_energy * (sign * end[2]).mean()
        if frobenius:
            reg = reg + self.jacobian_norm * (sign * end[-1]).mean()
        self.regularization = reg if (kinetic or frobenius) else None
        return y, sign * logdet

    def _extra(self):
        return (f"input_dim={self.event_shape[0]}, trace={self.trace!r}, method={self.method!r}, "
                f"adjoint={self.adjoint}")


_DOC_ARGS = r"""
    Args:
        input_dim: :math:`D`.
        hidden_dims: hidden widths of the dynamics MLP :math:`f([z, t{ctx}])`
            (default ``(16, 16)``: small, so that a layer is cheap to test;
            ``flows.ffjord`` uses ``(64, 64)``).
        activation: its activation class (default ``nn.Tanh``: smooth, so the
            adaptive solver takes few steps).
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact for
            :math:`D \le 8`).
        method: a torchdiffeq method (default adaptive ``"dopri5"``).
        rtol, atol: solver tolerances; ``None`` scales them to the dtype,
            :math:`\epsilon^{0.7}` (float32 1.4e-5, float64 1.1e-11).
        max_num_steps: step budget of an adaptive solve; exceeding it raises
            :class:`~pyroflows.transforms.ConvergenceError`, as does a step-size
            underflow or a non-finite solution.
        adjoint: gradients by the adjoint method (``odeint_adjoint``, memory
            independent of the number of steps, one extra backward solve)
            instead of backprop through the solver's operations.
        kinetic_energy, jacobian_norm: weights :math:`\lambda_K, \lambda_J` of
            Finlay et al.'s penalties (0 disables them).
"""


class ContinuousFlow(_ODESolve, Bijector):
    r"""Continuous normalizing flow (FFJORD): :math:`y = z(1)` with :math:`z(0) = x` and
    :math:`\dot z = f_\theta(z, t)`.

    The state and the log-determinant are integrated together,

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \int_0^1
        \operatorname{tr} \frac{\partial f_\theta}{\partial z}(z(t), t)\, dt,
        \qquad \text{i.e.}\quad \frac{d\log p(z(t))}{dt} = -\operatorname{tr}\frac{\partial f}{\partial z},

    by an ODE solver from ``torchdiffeq`` (adaptive ``dopri5`` by default).
    Any network is allowed as :math:`f`: invertibility comes from the ODE, not
    from the architecture.  The trace is

    * ``trace="exact"``: :math:`D` vector-Jacobian products per function
      evaluation (for small :math:`D`; passes the exactness harness up to the
      solver tolerance);
    * ``trace="hutchinson"``: :math:`\epsilon^\top (\partial f/\partial z)\,\epsilon`
      with one Rademacher :math:`\epsilon` held fixed for the whole solve
      (Grathwohl et al. 2019): one product per evaluation, an unbiased
      estimate of the log-det, so the layer sets ``exact_log_det = False``.

    Directions: the forward (sampling) pass integrates :math:`t: 0 \to 1`, the
    inverse (scoring) pass :math:`t: 1 \to 0`; both cost one solve of the same
    ODE (their number of steps differs with the local stiffness), and both
    report the forward log-det.  Numbers of function evaluations: ``nfe`` (the
    last solve) and ``nfe_total`` (all evaluations so far, including the
    adjoint's backward solves).

    Regularisation (Finlay et al. 2020): with ``kinetic_energy`` :math:`\lambda_K > 0`
    and/or ``jacobian_norm`` :math:`\lambda_J > 0` each pass also integrates
    :math:`\int_0^1 \|f\|^2 dt` and :math:`\int_0^1 \|\partial f/\partial z\|_F^2 dt`
    (exact in exact mode, :math:`\|\epsilon^\top \partial f/\partial z\|^2` with
    Hutchinson) and stores :math:`\lambda_K \bar E_K + \lambda_J \bar E_J` (means
    over the batch) in the attribute ``regularization``, which the training
    loops (``pyroflows.train.fit``, ``pyroflows.infer.distill``) add to their
    loss via :func:`regularization_loss`.  Straighter, smoother trajectories
    need fewer solver steps.

    References: Chen et al. 2018, *Neural Ordinary Differential Equations*;
    Grathwohl et al. 2019, *FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models*; Finlay et al. 2020, *How to train your
    neural ODE: the world of Jacobian and kinetic regularization*.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (16, 16), *,
                 activation: type[nn.Module] = nn.Tanh, trace: str = "auto", method: str = "dopri5",
                 rtol: float | None = None, atol: float | None = None, max_num_steps: int = 1000,
                 adjoint: bool = False, kinetic_energy: float = 0.0, jacobian_norm: float = 0.0,
                 cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._setup(input_dim, 0, hidden_dims, activation, trace, method, rtol, atol, max_num_steps,
                    adjoint, kinetic_energy, jacobian_norm)

    def _call_and_ladj(self, x):
        return self._solve(x, None, reverse=False)

    def _inverse_and_ladj(self, y):
        return self._solve(y, None, reverse=True)

    def extra_repr(self):
        return self._extra()


class ConditionalContinuousFlow(_ODESolve, ConditionalBijector):
    r"""A :class:`ContinuousFlow` whose dynamics :math:`f_\theta(z, t, c)` also read a
    context :math:`c` (the amortized VAE posterior, conditional density
    estimation).  Same ODE, directions, trace modes and penalties.
    """

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] = (16, 16), *,
                 activation: type[nn.Module] = nn.Tanh, trace: str = "auto", method: str = "dopri5",
                 rtol: float | None = None, atol: float | None = None, max_num_steps: int = 1000,
                 adjoint: bool = False, kinetic_energy: float = 0.0, jacobian_norm: float = 0.0):
        super().__init__()
        check_context_dim(context_dim)
        self.context_dim = context_dim
        self._setup(input_dim, context_dim, hidden_dims, activation, trace, method, rtol, atol,
                    max_num_steps, adjoint, kinetic_energy, jacobian_norm)

    def _call_and_ladj(self, x, context):
        return self._solve(x, context, reverse=False)

    def _inverse_and_ladj(self, y, context):
        return self._solve(y, context, reverse=True)

    def extra_repr(self):
        return f"{self._extra()}, context_dim={self.context_dim}"


ContinuousFlow.__doc__ += _DOC_ARGS.replace("{ctx}", "")
ConditionalContinuousFlow.__doc__ += _DOC_ARGS.replace("{ctx}", ", c") + "        context_dim: width of the context.\n"


def continuous_flow(input_dim: int, hidden_dims: Sequence[int] = (16, 16), **kwargs) -> ContinuousFlow:
    """A :class:`ContinuousFlow` (FFJORD layer); keyword options as in the class."""
    return ContinuousFlow(input_dim, hidden_dims, **kwargs)


def conditional_continuous_flow(input_dim: int, context_dim: int, hidden_dims: Sequence[int] = (16, 16),
                                **kwargs) -> ConditionalContinuousFlow:
    """A :class:`ConditionalContinuousFlow`; keyword options as in the class."""
    return ConditionalContinuousFlow(input_dim, context_dim, hidden_dims, **kwargs)
