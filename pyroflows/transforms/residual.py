r"""Residual flows: reversible (iRevNet) and invertible (i-ResNet / Residual Flow) blocks.

* :class:`ReversibleResidual` splits the input in two halves and updates each
  by a residual of the other (eqs. 16.18-16.19); any networks work, the
  inverse is exact and the log-det is 0.  Its ``memory_saving`` mode backprops
  through a whole stack of blocks without storing activations.
* :class:`InvertibleResidual` is :math:`y = x + g(x)` with a contractive
  :math:`g` (eqs. 16.20-16.24); the inverse is a Banach fixed-point iteration
  and the log-det is exact or estimated (power series, Russian roulette).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.mlp import MLP
from ..nn.spectral import LipschitzMLP, LipSwish
from .base import Bijector
from .elementwise import check_input_dim

__all__ = [
    "ConvergenceError",
    "InvertibleResidual",
    "ReversibleResidual",
    "invertible_residual",
    "reversible_residual",
]


# ----------------------------------------------------------------------------
# Reversible residual (iRevNet / RevNet)
# ----------------------------------------------------------------------------
class _RevBlock(nn.Module):
    """One reversible block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""

    def __init__(self, d1: int, d2: int, hidden: Sequence[int], activation):
        super().__init__()
        self.d1 = d1
        self.F = MLP(d2, d1, hidden, activation)
        self.G = MLP(d1, d2, hidden, activation)

    def fwd(self, x):
        x1, x2 = x[..., : self.d1], x[..., self.d1:]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], -1)

    def inv(self, y):
        y1, y2 = y[..., : self.d1], y[..., self.d1:]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], -1)


def _steps(blocks, reverse: bool):
    """(do, undo) pairs of a pass through ``blocks`` (forward, or inverse when ``reverse``)."""
    if reverse:
        return [(b.inv, b.fwd, b) for b in reversed(blocks)]
    return [(b.fwd, b.inv, b) for b in blocks]


class _ReversibleStack(torch.autograd.Function):
    """Run a stack of reversible blocks storing only the stack's output.

    The backward pass walks the blocks in reverse, reconstructs each block's
    input from its output with the exact inverse, recomputes that one block
    with autograd and backprops through it, accumulating the parameter
    gradients straight into ``.grad`` (as ``loss.backward()`` does).  Memory:
    the output plus one block's activations and parameter gradients,
    independent of depth (Gomez et al. 2017).  The parameters are therefore
    not inputs of this function: a ``dummy`` tensor that requires grad makes
    autograd call the backward even when ``x`` does not.
    """

    @staticmethod
    def forward(ctx, x, dummy, blocks, reverse):
        ctx.blocks, ctx.reverse = blocks, reverse
        y = x
        for do, _, _ in _steps(blocks, reverse):
            y = do(y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        for do, undo, block in reversed(_steps(ctx.blocks, ctx.reverse)):
            with torch.no_grad():
                x = undo(y)
            with torch.enable_grad():
                x_ = x.detach().requires_grad_()
                out = do(x_)
                ps = [p for p in block.parameters() if p.requires_grad]
                torch.autograd.backward(out, grad_y, inputs=[x_, *ps])
            grad_y, y = x_.grad, x
        return grad_y, None, None, None


class ReversibleResidual(Bijector):
    r"""A stack of reversible residual blocks (RevNet / iRevNet, eqs. 16.18-16.19).

    The input is split into halves :math:`x = (x_1, x_2)` and each block does

    .. math::

        y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1),

    with arbitrary (non-invertible) MLPs :math:`F, G`.  The inverse is exact:
    :math:`x_2 = y_2 - G(y_1)`, :math:`x_1 = y_1 - F(x_2)`.  Each half-update
    has a unit-triangular Jacobian, so :math:`\log|\det J| = 0` exactly (a
    volume-preserving flow).  Both directions cost one pass.

    With ``memory_saving=True`` a training pass (gradients enabled) stores no
    activations inside the stack: a custom autograd function recomputes each
    block's input from its output during the backward pass, so training
    memory does not grow with ``num_blocks`` (it costs about one extra forward
    pass).  Gradients equal ordinary backprop up to rounding; the parameter
    gradients are accumulated into ``.grad`` during ``backward()`` (so use
    ``loss.backward()``, not ``torch.autograd.grad`` w.r.t. the parameters, in
    this mode).  ``benchmarks/reversible_memory.py`` measures the saving.

    References: Gomez et al. 2017, *The Reversible Residual Network*;
    Jacobsen et al. 2018, *i-RevNet*.

    Args:
        input_dim: :math:`D \ge 2` (a half cannot be empty).
        num_blocks: depth of the stack.
        hidden_dims: hidden widths of each :math:`F` and :math:`G`.
        activation: activation class of the MLPs.
        memory_saving: recompute activations in the backward pass.
    """

    def __init__(self, input_dim: int, num_blocks: int = 1, hidden_dims: Sequence[int] = (64,),
                 activation: type[nn.Module] = nn.ReLU, memory_saving: bool = False,
                 cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        check_input_dim(input_dim)
        if input_dim < 2:
            raise ValueError(f"ReversibleResidual needs input_dim >= 2 to split into two halves, got {input_dim}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.event_shape = (input_dim,)
        d1 = input_dim // 2
        self.blocks = nn.ModuleList(_RevBlock(d1, input_dim - d1, hidden_dims, activation) for _ in range(num_blocks))
        self.memory_saving = memory_saving

    def _run(self, x, reverse: bool):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.memory_saving and torch.is_grad_enabled() and (x.requires_grad or params):
            dummy = torch.empty(0, dtype=x.dtype, device=x.device, requires_grad=True)
            return _ReversibleStack.apply(x, dummy, self.blocks, reverse)
        for do, _, _ in _steps(self.blocks, reverse):
            x = do(x)
        return x

    def _call_and_ladj(self, x):
        return self._run(x, reverse=False), x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        return self._run(y, reverse=True), y.new_zeros(y.shape[:-1])

    def extra_repr(self):
        return f"input_dim={self.event_shape[0]}, num_blocks={len(self.blocks)}, memory_saving={self.memory_saving}"


# ----------------------------------------------------------------------------
# Invertible residual (i-ResNet / Residual Flow)
# ----------------------------------------------------------------------------
class ConvergenceError(RuntimeError):
    """A numerical inverse (fixed-point iteration, root finding) did not reach its tolerance."""


def _default_tol(dtype) -> float:
    return torch.finfo(dtype).eps ** 0.75  # float64: 1.8e-12, float32: 6.6e-6


LOG_DET_METHODS = ("auto", "exact", "series", "roulette")


class InvertibleResidual(Bijector):
    r"""Invertible residual block :math:`f(u) = u + g(u)` with :math:`\mathrm{Lip}(g) < 1`
    (i-ResNet, eqs. 16.20-16.24; Residual Flows).

    :math:`g` is a :class:`~pyroflows.nn.LipschitzMLP`: spectral-normalised
    linear layers (power iteration, coefficient :math:`c < 1`) and 1-Lipschitz
    activations, so :math:`\mathrm{Lip}(g) \le c^L < 1` for *any* parameter
    values.  Then :math:`f` is invertible and the inverse of
    :math:`v = u + g(u)` is the Banach fixed point of :math:`u \mapsto v - g(u)`,
    iterated from :math:`u_0 = v` until successive iterates differ by at most
    ``tol`` (absolute and relative; default :math:`\epsilon^{3/4}` of the dtype,
    1.8e-12 in float64) or ``max_iter`` steps, when :class:`ConvergenceError`
    reports the residual :math:`\max|u + g(u) - v|` reached.  Gradients
    through the fixed point are implicit: the adjoint
    :math:`a = (I + J_g^\top)^{-1}\bar u` is itself a fixed point (Bai et al. 2019).

    The log-determinant :math:`\log\det(I + J_g(u))` (positive: every
    eigenvalue of :math:`I + J_g` has positive real part) is, by ``log_det``:

    * ``"exact"``: the Jacobian from :math:`D` vector-Jacobian products and
      ``slogdet``, :math:`O(D^3)`: for small :math:`D`.
    * ``"series"``: i-ResNet's truncated power series
      :math:`\sum_{k=1}^{n} \frac{(-1)^{k+1}}{k} v^\top J^k v` with
      Rademacher Hutchinson vectors :math:`v` (``n_terms``, ``n_samples``).
      **Biased** by the truncation (at most :math:`D\,\sum_{k>n} \mathrm{Lip}^k/k`):
      the estimate is unbiased for the truncated series, not for the log-det.
      Measured in ``tests/test_residual.py`` (D = 4, linear :math:`g` with
      :math:`\|J\| = 0.9`, log-det -1.330): bias +0.128 with 1 term, -0.057
      with 2, +0.002 with 5, -2.5e-5 with 10; the gradient is biased too.
    * ``"roulette"``: Residual Flows' unbiased Russian-roulette estimator: the
      first ``n_exact_terms`` terms always, then :math:`N \sim \mathrm{Geom}(p)`
      more (per row), term :math:`k` reweighted by :math:`1/P(N \ge k - n_0)`.
      Its gradient is the unbiased Neumann-series estimate
      :math:`\nabla \log\det(I+J) = \sum_{k\ge 0} (-1)^k\,\mathrm{tr}(J^k \nabla J)`
      (Chen et al. 2019), computed with one extra double-backward product.
      Its variance is finite when :math:`\mathrm{Lip}(g)^2 < 1 - p`; the bound
      :math:`c^L` does not always guarantee that (e.g. ``residual_flow``'s
      :math:`c = 0.98`), though the actual contraction is usually far smaller;
      raise ``n_exact_terms`` or lower ``geom_p`` to tame it.
    * ``"auto"`` (default): ``"exact"`` when :math:`D \le 3` (no more
      vector-Jacobian products than one roulette estimate, and no variance),
      otherwise ``"roulette"``.

    With a stochastic estimator the instance sets ``exact_log_det = False``.

    Direction: ``cheap="inverse"`` (default) puts the explicit map in the
    normalizing direction, :math:`x = y + g(y)` (i-ResNet's density-estimation
    setting: scoring is one pass, sampling needs the fixed point);
    ``cheap="forward"`` makes :math:`y = x + g(x)` the forward (sampling) pass
    and the fixed point the inverse (scoring), the setting for a variational
    posterior or a distilled sampler.

    References: Behrmann et al. 2019, *Invertible Residual Networks*; Chen et
    al. 2019, *Residual Flows for Invertible Generative Modeling*.

    Args:
        input_dim: :math:`D`.
        hidden_dims: hidden widths of :math:`g`.
        coeff: spectral-norm bound :math:`c \in (0, 1)` of each linear layer.
        log_det: ``"auto"``, ``"exact"``, ``"series"`` or ``"roulette"``.
        cheap: ``"inverse"`` (default) or ``"forward"``: which direction is explicit.
        n_terms: terms of the truncated series (``"series"``).
        n_exact_terms, geom_p: the roulette's always-computed terms and the
            geometric parameter :math:`p` of the extra terms.
        n_samples: Hutchinson vectors per estimate.
        tol, max_iter: fixed-point tolerance (``None``: dtype default) and limit.
        activation: 1-Lipschitz activation class (default LipSwish).
    """

    exact_inverse = False  # numerical inverse: refused by memory_saving

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (32, 32), coeff: float = 0.9,
                 log_det: str = "auto", cheap: str = "inverse", n_terms: int = 5, n_exact_terms: int = 2,
                 geom_p: float = 0.5, n_samples: int = 1, tol: float | None = None, max_iter: int = 500,
                 activation: type[nn.Module] = LipSwish, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        check_input_dim(input_dim)
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must be in (0, 1) for a contractive residual, got {coeff}")
        if log_det not in LOG_DET_METHODS:
            raise ValueError(f"log_det must be one of {LOG_DET_METHODS}, got {log_det!r}")
        if cheap not in ("forward", "inverse"):
            raise ValueError(f"cheap must be 'forward' or 'inverse', got {cheap!r}")
        if not 0 < geom_p < 1:
            raise ValueError(f"geom_p must be in (0, 1), got {geom_p}")
        if n_terms < 1 or n_exact_terms < 0 or n_samples < 1 or max_iter < 1:
            raise ValueError("n_terms, n_samples and max_iter must be >= 1 and n_exact_terms >= 0")
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.event_shape = (input_dim,)
        self.g = LipschitzMLP(input_dim, input_dim, hidden_dims, coeff, activation)
        if log_det == "auto":
            log_det = "exact" if input_dim <= 3 else "roulette"
        self.log_det, self.cheap = log_det, cheap
        self.n_terms, self.n_exact_terms, self.geom_p, self.n_samples = n_terms, n_exact_terms, geom_p, n_samples
        self.tol, self.max_iter = tol, max_iter

    @property
    def log_det(self) -> str:
        """The log-det method; may be switched after training (e.g. to ``"exact"`` for evaluation)."""
        return self._log_det

    @log_det.setter
    def log_det(self, method: str):
        if method not in LOG_DET_METHODS[1:]:
            raise ValueError(f"log_det must be one of {LOG_DET_METHODS[1:]}, got {method!r}")
        self._log_det = method
        self.exact_log_det = method == "exact"

    # --- log det(I + J_g(u)) -------------------------------------------------
    def _logdet(self, u, gu, need_graph: bool):
        if self.log_det == "exact":
            rows = [torch.autograd.grad(gu[..., i].sum(), u, retain_graph=True, create_graph=need_graph)[0]
                    for i in range(u.shape[-1])]
            eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
            return torch.linalg.slogdet(eye + torch.stack(rows, -2))[1]
        if self.log_det == "series":
            return self._series(u, gu, need_graph)
        return self._roulette(u, gu, need_graph)

    @staticmethod
    def _rademacher(u):
        return torch.randint(0, 2, u.shape, device=u.device).to(u.dtype) * 2 - 1

    def _series(self, u, gu, need_graph):
        est = 0.0
        for _ in range(self.n_samples):
            v = w = self._rademacher(u)
            for k in range(1, self.n_terms + 1):
                w = torch.autograd.grad(gu, u, w, retain_graph=True, create_graph=need_graph)[0]
                est = est + (-1) ** (k + 1) / k * (w * v).sum(-1)
        return est / self.n_samples

    def _roulette(self, u, gu, need_graph):
        q = 1.0 - self.geom_p
        n0 = self.n_exact_terms
        extra = torch.distributions.Geometric(probs=torch.tensor(self.geom_p)).sample(u.shape[:-1])
        extra = extra.to(device=u.device, dtype=u.dtype)
        K = n0 + int(extra.max().item()) if extra.numel() else n0
        K = max(K, 1)
        value, surrogate = 0.0, 0.0
        for _ in range(self.n_samples):
            v = r = self._rademacher(u)
            neumann = torch.zeros_like(u)
            for k in range(1, K + 1):  # r = v^T J^{k-1} on entry
                j = max(0, k - n0)
                coef = (extra >= j).to(u.dtype) / q ** j
                if need_graph:
                    neumann = neumann + (-1) ** (k - 1) * coef[..., None] * r
                r = torch.autograd.grad(gu, u, r, retain_graph=True)[0]
                value = value + (-1) ** (k + 1) / k * coef * (r * v).sum(-1)
            if need_graph:
                wJ = torch.autograd.grad(gu, u, neumann.detach(), retain_graph=True, create_graph=True)[0]
                surrogate = surrogate + (wJ * v).sum(-1)
        value = value / self.n_samples
        if not need_graph:
            return value
        surrogate = surrogate / self.n_samples
        return value.detach() + surrogate - surrogate.detach()

    # --- the explicit map and its fixed-point inverse ---------------------------
    def _needs_graph(self, t):
        return torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _explicit(self, u):
        """``(u + g(u), log det(I + J_g(u)))``."""
        need_graph = self._needs_graph(u)
        with torch.enable_grad():
            u_ = u if (need_graph and u.requires_grad) else u.detach().requires_grad_()
            gu = self.g(u_)
            ld = self._logdet(u_, gu, need_graph)
            v = u_ + gu
        if not need_graph:
            return v.detach(), ld.detach()
        return v, ld

    def _iterate(self, step, start, what: str, target):
        """Banach iteration ``x <- step(x)`` from ``start`` until converged; raises ConvergenceError."""
        tol = self.tol if self.tol is not None else _default_tol(start.dtype)
        x = start
        for _ in range(self.max_iter):
            x_new = step(x)
            if not torch.isfinite(x_new).all():
                raise ConvergenceError(f"InvertibleResidual {what}: the fixed-point iteration produced NaN/inf")
            done = ((x_new - x).abs() <= tol * (1 + x_new.abs())).all()
            x = x_new
            if done:
                return x
        residual = target(x).abs().max().item()
        raise ConvergenceError(
            f"InvertibleResidual {what}: fixed-point iteration did not converge in max_iter={self.max_iter} "
            f"steps (tol={tol:.1e}); residual reached {residual:.3e}. Raise max_iter or tol, or lower coeff."
        )

    def _fixed_point(self, v):
        """``u`` with ``u + g(u) = v`` (no gradients)."""
        with torch.no_grad():
            v = v.detach()
            return self._iterate(lambda u: v - self.g(u), v.clone(), "inverse", lambda u: u + self.g(u) - v)

    def _solve(self, v):
        """``u`` with ``u + g(u) = v``, differentiable by implicit differentiation."""
        if not self._needs_graph(v):
            return self._fixed_point(v)
        params = [p for p in self.g.parameters() if p.requires_grad]
        return _ImplicitInverse.apply(v, self, *params)

    def _call_and_ladj(self, x):
        if self.cheap == "forward":
            return self._explicit(x)
        y = self._solve(x)
        return y, -self._explicit(y)[1]

    def _inverse_and_ladj(self, y):
        if self.cheap == "inverse":
            x, ld = self._explicit(y)
            return x, -ld
        x = self._solve(y)
        return x, self._explicit(x)[1]

    def extra_repr(self):
        return f"input_dim={self.event_shape[0]}, log_det={self.log_det!r}, cheap={self.cheap!r}"


class _ImplicitInverse(torch.autograd.Function):
    r"""``u = f^{-1}(v)`` for ``f(u) = u + g(u)`` with implicit gradients.

    Backward: the adjoint :math:`a = (I + J_g^\top)^{-1}\bar u` is the fixed
    point of :math:`a = \bar u - J_g^\top a` (a contraction), then
    :math:`\bar v = a` and :math:`\bar\theta = -a^\top \partial g/\partial\theta`
    (Bai et al. 2019, *Deep Equilibrium Models*).  First-order only.
    """

    @staticmethod
    def forward(ctx, v, layer, *params):
        u = layer._fixed_point(v)
        ctx.layer, ctx.params = layer, params
        ctx.save_for_backward(u)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        (u,) = ctx.saved_tensors
        layer = ctx.layer
        with torch.enable_grad():
            u_ = u.detach().requires_grad_()
            gu = layer.g(u_)

            def vjp(a):
                return torch.autograd.grad(gu, u_, a, retain_graph=True)[0]

            a = layer._iterate(lambda a: grad_u - vjp(a), grad_u, "adjoint of the inverse",
                               lambda a: a + vjp(a) - grad_u)
            grads = torch.autograd.grad(gu, ctx.params, -a, allow_unused=True) if ctx.params else ()
        return (a, None, *grads)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def reversible_residual(input_dim: int, hidden_dims: Sequence[int] = (64,), *, num_blocks: int = 1,
                        memory_saving: bool = False) -> ReversibleResidual:
    """A :class:`ReversibleResidual` stack (``ValueError`` for ``input_dim < 2``)."""
    return ReversibleResidual(input_dim, num_blocks, hidden_dims, memory_saving=memory_saving)


def invertible_residual(input_dim: int, hidden_dims: Sequence[int] = (32, 32), *, coeff: float = 0.9,
                        log_det: str = "auto", **kw) -> InvertibleResidual:
    """An :class:`InvertibleResidual` block (exact log-det for D <= 3, Russian roulette above)."""
    return InvertibleResidual(input_dim, hidden_dims, coeff, log_det, **kw)
