r"""Planar, radial and Sylvester flows: the classic amortized VAE posteriors.

Each family is one piece of math written as functions of a flat parameter
vector ``theta`` (shape ``(..., P)``), fed two ways: free ``nn.Parameter``s
(:class:`Planar`, :class:`Radial`, :class:`Sylvester`) or an offset plus an
MLP of a context vector (the ``Conditional*`` twins, so a VAE encoder can
emit the posterior's flow).  The invertibility constraints are built into
the parametrisation, so every real ``theta`` gives a bijection.

They are not among the layer families of Prince's chapter 16 (they predate
coupling and autoregressive flows); the tour's last section, on flows as
variational posteriors, is where they belong.  The forward (sampling)
direction is the cheap one.  Planar and Sylvester
inverses solve scalar monotone equations numerically (safeguarded Newton,
tolerance :math:`\epsilon^{3/4}` of the dtype, :class:`ConvergenceError`
when not reached); the radial inverse is analytic.  Gradients through a
numerical inverse are exact implicit gradients (one Newton step taken with
autograd from the detached root).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mlp import MLP
from .base import Bijector, ConditionalBijector
from .elementwise import check_input_dim
from .residual import ConvergenceError, _default_tol

__all__ = [
    "ConditionalPlanar",
    "ConditionalRadial",
    "ConditionalSylvester",
    "Planar",
    "Radial",
    "Sylvester",
    "conditional_planar",
    "conditional_radial",
    "conditional_sylvester",
    "planar",
    "radial",
    "sylvester",
]


def solve_tanh_equation(t, a, rho, c, tol=None, max_iter: int = 100, what: str = "inverse"):
    r"""Solve :math:`s + a \tanh(\rho s + c) = t` for :math:`s`, elementwise (broadcasting).

    Requires :math:`1 + a\rho\,(1 - \tanh^2) > 0` (guaranteed by the callers'
    parametrisations), so the left side is strictly increasing and the root
    lies in :math:`[t - |a|, t + |a|]`.  Newton steps safeguarded by bisection
    of that bracket, until a step is below ``tol * (1 + |s|)``; raises
    :class:`ConvergenceError` with the residual otherwise.  The returned root
    carries implicit gradients with respect to ``t, a, rho, c``.
    """
    t, a, rho, c = torch.broadcast_tensors(t, a, rho, c)
    tol = _default_tol(t.dtype) if tol is None else tol
    with torch.no_grad():
        td, ad, rd, cd = t.detach(), a.detach(), rho.detach(), c.detach()
        lo, hi = td - ad.abs(), td + ad.abs()
        s = td - ad * torch.tanh(rd * td + cd)
        step_old = hi - lo
        for _ in range(max_iter):
            th = torch.tanh(rd * s + cd)
            f = s + ad * th - td
            fp = 1 + ad * rd * (1 - th * th)
            lo = torch.where(f < 0, s, lo)
            hi = torch.where(f > 0, s, hi)
            newton = s - f / fp
            # bisect when Newton leaves the bracket or does not halve the previous step (rtsafe)
            bisect = (newton < lo) | (newton > hi) | (2 * f.abs() > (step_old * fp).abs())
            s_new = torch.where(bisect, (lo + hi) / 2, newton)
            step_old = s_new - s
            done = (step_old.abs() <= tol * (1 + s_new.abs())).all()
            s = s_new
            if done:
                break
        else:
            residual = (s + ad * torch.tanh(rd * s + cd) - td).abs().max().item()
            raise ConvergenceError(
                f"{what}: root finding did not converge in max_iter={max_iter} steps (tol={tol:.1e}); "
                f"residual reached {residual:.3e}"
            )
    if not torch.is_grad_enabled() or not any(v.requires_grad for v in (t, a, rho, c)):
        return s
    # one Newton step with autograd from the root: value unchanged, gradient = implicit gradient
    th = torch.tanh(rho * s + c)
    return s - (s + a * th - t) / (1 + a * rho * (1 - th * th)).detach()


class _Flat:
    """Shared plumbing: a flat parameter vector ``theta`` (+ an MLP of the context)."""

    def _init_theta(self, theta0: torch.Tensor, context_dim: int | None, hidden: Sequence[int]):
        self.theta = nn.Parameter(theta0)
        if context_dim is not None:
            check_input_dim(context_dim)
            self.context_dim = context_dim
            self.net = MLP(context_dim, theta0.numel(), hidden)  # zero-initialised: starts at theta0

    def _theta(self, context=None):
        return self.theta if context is None else self.theta + self.net(context)


def _split(theta, sizes):
    return torch.split(theta, sizes, dim=-1)


# ----------------------------------------------------------------------------
# planar
# ----------------------------------------------------------------------------
def _planar_params(theta, D):
    u, w, b = _split(theta, [D, D, 1])
    wu = (w * u).sum(-1, keepdim=True)
    m = F.softplus(wu).clamp_min(torch.finfo(wu.dtype).eps) - 1  # w . u_hat = m > -1: invertible
    u_hat = u + (m - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u_hat, w, b[..., 0], m[..., 0]


class _PlanarMath:
    def _call_and_ladj(self, z, context=None):
        u_hat, w, b, m = _planar_params(self._theta(context), self.event_shape[0])
        th = torch.tanh((w * z).sum(-1) + b)
        return z + u_hat * th[..., None], torch.log1p(m * (1 - th * th))

    def _inverse_and_ladj(self, y, context=None):
        u_hat, w, b, m = _planar_params(self._theta(context), self.event_shape[0])
        s = solve_tanh_equation((w * y).sum(-1) + b, m, torch.ones_like(m), torch.zeros_like(m),
                                self.tol, self.max_iter, f"{type(self).__name__} inverse")
        th = torch.tanh(s)
        return y - u_hat * th[..., None], torch.log1p(m * (1 - th * th))


_PLANAR_DOC = r"""
    .. math::

        y = z + \hat u\,\tanh(w^\top z + b), \qquad
        \log|\det J| = \log\left(1 + \hat u^\top w\,(1 - \tanh^2(w^\top z + b))\right),

    with the invertibility reparametrisation (Rezende & Mohamed 2015, app. A)
    :math:`\hat u = u + (m(w^\top u) - w^\top u)\,w/\|w\|^2`,
    :math:`m(a) = -1 + \mathrm{softplus}(a)`, so :math:`w^\top\hat u > -1` for
    every real :math:`u, w`.  Forward is cheap; the inverse solves the scalar
    equation :math:`s + w^\top\hat u\,\tanh(s) = w^\top y + b` for
    :math:`s = w^\top z + b` (safeguarded Newton, ``tol``), then
    :math:`z = y - \hat u \tanh(s)`.

    Reference: Rezende & Mohamed 2015, *Variational Inference with Normalizing Flows*.
"""


class Planar(_Flat, _PlanarMath, Bijector):
    __doc__ = "Planar flow with free parameters." + _PLANAR_DOC

    exact_inverse = False  # numerical inverse: refused by memory_saving

    def __init__(self, input_dim: int, tol: float | None = None, max_iter: int = 100, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = (check_input_dim(input_dim),)
        self.tol, self.max_iter = tol, max_iter
        bound = input_dim ** -0.5
        self._init_theta(torch.empty(2 * input_dim + 1).uniform_(-bound, bound), None, ())


class ConditionalPlanar(_Flat, _PlanarMath, ConditionalBijector):
    __doc__ = ("Amortized planar flow: :math:`(u, w, b) = \\theta_0 + \\mathrm{MLP}(\\text{context})`."
               + _PLANAR_DOC)

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] = (64,),
                 tol: float | None = None, max_iter: int = 100):
        super().__init__()
        self.event_shape = (check_input_dim(input_dim),)
        self.tol, self.max_iter = tol, max_iter
        bound = input_dim ** -0.5
        self._init_theta(torch.empty(2 * input_dim + 1).uniform_(-bound, bound), context_dim, hidden_dims)


# ----------------------------------------------------------------------------
# radial
# ----------------------------------------------------------------------------
def _radial_params(theta, D):
    z0, a, b = _split(theta, [D, 1, 1])
    eps = torch.finfo(theta.dtype).eps
    alpha = F.softplus(a[..., 0]).clamp_min(torch.finfo(theta.dtype).tiny)
    beta = -alpha + torch.maximum(F.softplus(b[..., 0]), eps * alpha)  # beta > -alpha: invertible
    return z0, alpha, beta


class _RadialMath:
    def _ladj(self, r, alpha, beta):
        D = self.event_shape[0]
        h = 1 / (alpha + r)
        return (D - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h)

    def _call_and_ladj(self, z, context=None):
        z0, alpha, beta = _radial_params(self._theta(context), self.event_shape[0])
        diff = z - z0
        r = torch.linalg.vector_norm(diff, dim=-1)
        y = z + (beta / (alpha + r))[..., None] * diff
        return y, self._ladj(r, alpha, beta)

    def _inverse_and_ladj(self, y, context=None):
        z0, alpha, beta = _radial_params(self._theta(context), self.event_shape[0])
        diff = y - z0
        R = torch.linalg.vector_norm(diff, dim=-1)
        # ||y - z0|| = r (alpha + beta + r) / (alpha + r): the positive root of a quadratic
        B = alpha + beta - R
        sq = torch.sqrt(B * B + 4 * alpha * R)
        r = torch.where(B > 0, 2 * alpha * R / (B + sq).clamp_min(torch.finfo(y.dtype).tiny), (sq - B) / 2)
        z = z0 + ((alpha + r) / (alpha + beta + r))[..., None] * diff
        return z, self._ladj(r, alpha, beta)


_RADIAL_DOC = r"""
    .. math::

        y = z + \beta\,h(r)\,(z - z_0), \quad h(r) = \frac{1}{\alpha + r}, \quad r = \|z - z_0\|,

        \log|\det J| = (D-1)\log(1 + \beta h) + \log\left(1 + \frac{\alpha\beta}{(\alpha + r)^2}\right),

    with :math:`\alpha = \mathrm{softplus}(a) > 0` and
    :math:`\beta = -\alpha + \max(\mathrm{softplus}(b), \epsilon\alpha) > -\alpha`
    (the invertibility condition, kept in floating point by the machine
    :math:`\epsilon`) for every real :math:`a, b`.  Both directions are cheap: the
    inverse is analytic (:math:`r` is the positive root of
    :math:`r^2 + (\alpha + \beta - R)r - \alpha R = 0`, :math:`R = \|y - z_0\|`).

    Reference: Rezende & Mohamed 2015, *Variational Inference with Normalizing Flows*.
"""


class Radial(_Flat, _RadialMath, Bijector):
    __doc__ = "Radial flow with free parameters." + _RADIAL_DOC

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = (check_input_dim(input_dim),)
        bound = input_dim ** -0.5
        self._init_theta(torch.empty(input_dim + 2).uniform_(-bound, bound), None, ())


class ConditionalRadial(_Flat, _RadialMath, ConditionalBijector):
    __doc__ = ("Amortized radial flow: :math:`(z_0, a, b) = \\theta_0 + \\mathrm{MLP}(\\text{context})`."
               + _RADIAL_DOC)

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] = (64,)):
        super().__init__()
        self.event_shape = (check_input_dim(input_dim),)
        bound = input_dim ** -0.5
        self._init_theta(torch.empty(input_dim + 2).uniform_(-bound, bound), context_dim, hidden_dims)


# ----------------------------------------------------------------------------
# Sylvester
# ----------------------------------------------------------------------------
VARIANTS = ("orthogonal", "householder", "triangular")


def _householder_product(vs, D):
    """:math:`H_1 \\cdots H_K` with :math:`H_k = I - 2 v_k v_k^\\top / \\|v_k\\|^2`, ``vs``: ``(..., K, D)``."""
    vs = vs / torch.linalg.vector_norm(vs, dim=-1, keepdim=True).clamp_min(torch.finfo(vs.dtype).tiny)
    Q = torch.eye(D, dtype=vs.dtype, device=vs.device).expand(*vs.shape[:-2], D, D)
    for k in range(vs.shape[-2]):
        v = vs[..., k, :]
        Q = Q - 2 * (Q @ v[..., :, None]) * v[..., None, :]
    return Q


class _SylvesterMath:
    def _setup(self, input_dim, num_vectors, variant, num_reflections, flip):
        D = check_input_dim(input_dim)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "orthogonal":
            M = D if num_vectors is None else num_vectors
            if not 1 <= M <= D:
                raise ValueError(f"num_vectors must be in [1, input_dim={D}], got {M}")
            q_size = D * M
        else:
            if num_vectors not in (None, D):
                raise ValueError(f"the {variant} variant has num_vectors = input_dim = {D}, got {num_vectors}")
            M = D
            K = D if num_reflections is None else num_reflections
            if variant == "householder" and K < 1:
                raise ValueError(f"num_reflections must be >= 1, got {K}")
            q_size = K * D if variant == "householder" else 0
        self.event_shape = (D,)
        self.variant, self.num_vectors, self.flip = variant, M, flip
        self._sizes = [M * M, M * M, M, q_size]
        theta0 = 0.1 * torch.randn(sum(self._sizes))
        if variant == "orthogonal":  # start Q near the first M coordinate axes
            theta0[-q_size:] += torch.eye(D, M).reshape(-1)
        return theta0

    def _params(self, context=None):
        D, M = self.event_shape[0], self.num_vectors
        r, rt, b, q = _split(self._theta(context), self._sizes)
        r = r.unflatten(-1, (M, M))
        rt = rt.unflatten(-1, (M, M))
        # upper triangular, diagonals in (-1, 1): R_ii * Rt_ii > -1 = -1/sup|tanh'|, invertible
        shrink = 1 - torch.finfo(r.dtype).eps  # tanh rounds to +-1 for large arguments
        R = r.triu(1) + torch.diag_embed(shrink * torch.tanh(r.diagonal(dim1=-2, dim2=-1)))
        Rt = rt.triu(1) + torch.diag_embed(shrink * torch.tanh(rt.diagonal(dim1=-2, dim2=-1)))
        if self.variant == "orthogonal":
            Q = torch.linalg.qr(q.unflatten(-1, (D, M)))[0]
        elif self.variant == "householder":
            Q = _householder_product(q.unflatten(-1, (-1, D)), D)
        else:
            Q = torch.eye(D, dtype=b.dtype, device=b.device)
            if self.flip:
                Q = Q.flip(-1)
        return Q, R, Rt, b

    @staticmethod
    def _ladj(R, Rt, h):
        d = R.diagonal(dim1=-2, dim2=-1) * Rt.diagonal(dim1=-2, dim2=-1)
        return torch.log1p(d * (1 - h * h)).sum(-1)

    def _call_and_ladj(self, z, context=None):
        Q, R, Rt, b = self._params(context)
        q = (z[..., None, :] @ Q)[..., 0, :]  # Q^T z
        h = torch.tanh((q[..., None, :] @ Rt.transpose(-1, -2))[..., 0, :] + b)
        y = z + (Q @ (R @ h[..., :, None]))[..., 0]
        return y, self._ladj(R, Rt, h)

    def _inverse_and_ladj(self, y, context=None):
        Q, R, Rt, b = self._params(context)
        M = self.num_vectors
        qy = (y[..., None, :] @ Q)[..., 0, :]
        # upper-triangular structure: solve q_M, then q_{M-1}, ... by scalar root finding
        qs: list = [None] * M
        hs: list = [None] * M
        for i in reversed(range(M)):
            later = range(i + 1, M)
            c = b[..., i] + sum((Rt[..., i, k] * qs[k] for k in later), torch.zeros_like(qy[..., i]))
            t = qy[..., i] - sum((R[..., i, j] * hs[j] for j in later), torch.zeros_like(qy[..., i]))
            qs[i] = solve_tanh_equation(t, R[..., i, i], Rt[..., i, i], c, self.tol, self.max_iter,
                                        f"{type(self).__name__} inverse")
            hs[i] = torch.tanh(Rt[..., i, i] * qs[i] + c)
        q = torch.stack(torch.broadcast_tensors(*qs), -1)
        h = torch.stack(torch.broadcast_tensors(*hs), -1)
        z = y + (Q @ (q - qy)[..., :, None])[..., 0]
        return z, self._ladj(R, Rt, h)


_SYLVESTER_DOC = r"""
    .. math::

        y = z + Q R\,\tanh(\tilde R Q^\top z + b), \qquad
        \log|\det J| = \sum_{i=1}^{M} \log\left(1 + R_{ii}\tilde R_{ii}\,(1 - h_i^2)\right),

    :math:`Q \in \mathbb{R}^{D\times M}` with orthonormal columns and
    :math:`R, \tilde R` upper triangular (Sylvester's determinant identity
    makes the log-det :math:`O(M)`).  Diagonals :math:`R_{ii} = \tanh(\cdot)`,
    :math:`\tilde R_{ii} = \tanh(\cdot)` keep :math:`R_{ii}\tilde R_{ii} > -1`,
    which makes each coordinate of :math:`Q^\top z` a strictly increasing
    function, so the map is invertible for every real parameter.
    ``variant``: ``"orthogonal"`` (:math:`Q` from a QR decomposition of a free
    :math:`D\times M` matrix, ``num_vectors`` = M <= D, D when ``None``),
    ``"householder"`` (:math:`Q` a product of ``num_reflections`` reflections,
    D when ``None``; M = D) or ``"triangular"`` (:math:`Q` the identity, or the
    reversal with ``flip=True``).

    Forward is cheap.  The inverse works in :math:`q = Q^\top z`: the
    triangular structure gives :math:`M` scalar monotone equations, solved from
    the last coordinate up (safeguarded Newton, ``tol``); the part of
    :math:`z` orthogonal to :math:`Q` passes unchanged.

    Reference: van den Berg et al. 2018, *Sylvester Normalizing Flows for Variational Inference*.
"""


class Sylvester(_Flat, _SylvesterMath, Bijector):
    __doc__ = "Sylvester flow with free parameters." + _SYLVESTER_DOC

    exact_inverse = False  # numerical inverse: refused by memory_saving

    def __init__(self, input_dim: int, num_vectors: int | None = None, variant: str = "orthogonal",
                 num_reflections: int | None = None, flip: bool = False, tol: float | None = None,
                 max_iter: int = 100, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.tol, self.max_iter = tol, max_iter
        theta0 = self._setup(input_dim, num_vectors, variant, num_reflections, flip)
        self._init_theta(theta0, None, ())


class ConditionalSylvester(_Flat, _SylvesterMath, ConditionalBijector):
    __doc__ = ("Amortized Sylvester flow: all of :math:`Q, R, \\tilde R, b` come from "
               ":math:`\\theta_0 + \\mathrm{MLP}(\\text{context})`." + _SYLVESTER_DOC)

    def __init__(self, input_dim: int, context_dim: int, num_vectors: int | None = None,
                 variant: str = "orthogonal", num_reflections: int | None = None, flip: bool = False,
                 hidden_dims: Sequence[int] = (64,), tol: float | None = None, max_iter: int = 100):
        super().__init__()
        self.tol, self.max_iter = tol, max_iter
        theta0 = self._setup(input_dim, num_vectors, variant, num_reflections, flip)
        self._init_theta(theta0, context_dim, hidden_dims)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def planar(input_dim: int) -> Planar:
    """A :class:`Planar` layer."""
    return Planar(input_dim)


def conditional_planar(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
                       ) -> ConditionalPlanar:
    """A :class:`ConditionalPlanar` layer whose ``(u, w, b)`` come from the context."""
    return ConditionalPlanar(input_dim, context_dim, (64,) if hidden_dims is None else hidden_dims)


def radial(input_dim: int) -> Radial:
    """A :class:`Radial` layer."""
    return Radial(input_dim)


def conditional_radial(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
                       ) -> ConditionalRadial:
    """A :class:`ConditionalRadial` layer whose ``(z0, alpha, beta)`` come from the context."""
    return ConditionalRadial(input_dim, context_dim, (64,) if hidden_dims is None else hidden_dims)


def _pyro_count(input_dim, count_transforms, variant):
    if variant != "householder":
        if count_transforms is not None:
            raise ValueError(f"count_transforms (Householder reflections) applies to variant='householder' "
                             f"only, got variant={variant!r}")
        return None
    if count_transforms is None and isinstance(input_dim, int):
        return input_dim // 2 + 1
    return count_transforms


def sylvester(input_dim: int, count_transforms: int | None = None, *, variant: str = "householder",
              num_vectors: int | None = None, **kw) -> Sylvester:
    """Pyro's ``sylvester``: a :class:`Sylvester` layer whose :math:`Q` is a product of
    ``count_transforms`` Householder reflections (default ``input_dim // 2 + 1``, Pyro's).
    ``variant="orthogonal"`` (with ``num_vectors``) or ``"triangular"`` pick the other
    constructions of van den Berg et al. (2018)."""
    count = _pyro_count(input_dim, count_transforms, variant)
    return Sylvester(input_dim, num_vectors, variant, num_reflections=count, **kw)


def conditional_sylvester(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                          count_transforms: int | None = None, *, variant: str = "householder",
                          num_vectors: int | None = None, **kw) -> ConditionalSylvester:
    """A :class:`ConditionalSylvester` layer whose parameters all come from the context
    (arguments as in :func:`sylvester`)."""
    count = _pyro_count(input_dim, count_transforms, variant)
    return ConditionalSylvester(input_dim, context_dim, num_vectors, variant, num_reflections=count,
                                hidden_dims=(64,) if hidden_dims is None else hidden_dims, **kw)
