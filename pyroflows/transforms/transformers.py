r"""Transformers: monotone elementwise maps :math:`y = g(x; \theta)`.

A transformer is written once, as pure tensor functions, and used in every
structure (elementwise with free :math:`\theta`, coupling, autoregressive).
Parameters arrive as a tensor of shape ``(..., D, num_params)`` that
broadcasts against ``x`` of shape ``(..., D)``.  Both directions return the
output and the *elementwise* log-derivative :math:`\log g'(x)` of the forward
map at the input point (shape of ``x``); the layers sum it.

No data-dependent boolean indexing is used anywhere (inputs outside a bound
are handled with ``torch.where`` on clamped arguments), so layers compile with
``torch.compile(fullgraph=True)`` and every real input gives finite values
and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "KINDS",
    "Additive",
    "Affine",
    "CubicSpline",
    "DeepSigmoid",
    "Inverted",
    "LinearRationalSpline",
    "LogisticMixtureCDF",
    "PiecewiseLinear",
    "PiecewiseQuadratic",
    "RationalQuadraticSpline",
    "SigmoidAffine",
    "SinhArcsinh",
    "SumOfSquaresPolynomial",
    "Transformer",
    "make_transformer",
    "spline_kind",
]


class Transformer:
    """Interface of a monotone elementwise map with ``num_params`` parameters per dimension."""

    num_params: int = 0

    def forward(self, x: torch.Tensor, params: torch.Tensor):
        """Return ``(y, log g'(x))`` elementwise."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, params: torch.Tensor):
        """Return ``(x, log g'(x))`` elementwise, with ``x = g^{-1}(y)``."""
        raise NotImplementedError

    def identity_params(self) -> torch.Tensor:
        """Unconstrained parameters (``num_params``,) at which ``g`` is the identity."""
        return torch.zeros(self.num_params)

    def __repr__(self):
        return f"{type(self).__name__}()"


def soft_clamp(s: torch.Tensor, bound: float) -> torch.Tensor:
    r""":math:`b \tanh(s / b)`: identity near 0, smoothly limited to :math:`(-b, b)`."""
    return bound * torch.tanh(s / bound)


class _ScaleShift(Transformer):
    """:math:`g(x) = e^{a} x + t`, for subclasses that define ``_shift_log_scale(params) -> (t, a)``."""

    num_params = 2

    def forward(self, x, params):
        shift, log_scale = self._shift_log_scale(params)
        y = x * torch.exp(log_scale) + shift
        return y, log_scale.expand_as(y)

    def inverse(self, y, params):
        shift, log_scale = self._shift_log_scale(params)
        x = (y - shift) / torch.exp(log_scale)  # one op fewer than * exp(-s), forward and backward
        return x, log_scale.expand_as(x)


class Affine(_ScaleShift):
    r"""Affine map :math:`g(x) = e^{s} x + t` with :math:`\theta = (t, \tilde s)`.

    The log-scale is softly clamped, :math:`s = b\tanh(\tilde s/b)` with
    :math:`b` = ``log_scale_bound`` (default 5, i.e. scales in
    :math:`(e^{-5}, e^{5})`), which keeps the scale positive and bounded so
    that training cannot blow it up (the RealNVP instability), while remaining
    smooth.  Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """

    def __init__(self, log_scale_bound: float = 5.0):
        self.log_scale_bound = float(log_scale_bound)

    def _shift_log_scale(self, params):
        shift, raw = params.unbind(-1)
        return shift, soft_clamp(raw, self.log_scale_bound)

    def params_for(self, shift: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """The parameters (shape ``(..., 2)``) of the map :math:`e^{s} x + t`: the inverse of
        the soft clamp, with :math:`|s|` capped at 0.99 of the bound (the clamp never reaches it)."""
        b = self.log_scale_bound
        s = torch.as_tensor(log_scale, dtype=shift.dtype, device=shift.device).clamp(-0.99 * b, 0.99 * b)
        return torch.stack(torch.broadcast_tensors(shift, b * torch.atanh(s / b)), -1)

    def __repr__(self):
        return f"Affine(log_scale_bound={self.log_scale_bound})"


class SigmoidAffine(_ScaleShift):
    r"""Glow's affine map with a sigmoid scale: :math:`g(x) = e^{a} x + t`,

    .. math::

        a = b \tanh\!\Big(\frac{\log\sigma(c) - \log\sigma(\tilde s + c)}{b}\Big),
        \qquad \log g'(x) = a,

    with :math:`\theta = (t, \tilde s)`, :math:`c` = ``shift`` (default 2, Glow's) and
    :math:`b` = ``log_scale_bound`` (default 5, as :class:`Affine`).  Without the soft
    clamp this is Glow's :math:`g^{-1}(y) = (y - t)\,\sigma(\tilde s + c)/\sigma(c)`.
    Since :math:`a > \log\sigma(c)`, the inverse (the normalizing direction in a
    :class:`~pyroflows.Flow`) multiplies by at most :math:`1/\sigma(c)` (1.135 for
    :math:`c = 2`), so a stack of :math:`n` such layers amplifies a difference in the
    data by at most :math:`\sigma(c)^{-n}`: an input unlike the training data cannot be
    sent to an overflowing latent, which an exponential scale (:class:`Affine`, up to
    :math:`e^{5}` per layer) allows.  The generative direction may expand, up to
    :math:`e^{b}`.  :math:`\tilde s = 0` is the identity.

    Reference: Kingma & Dhariwal, "Glow: generative flow with invertible 1x1
    convolutions", NeurIPS 2018 (the official code's ``sigmoid(h + 2)`` scale).
    """

    def __init__(self, shift: float = 2.0, log_scale_bound: float = 5.0):
        self.shift = float(shift)
        self.log_scale_bound = float(log_scale_bound)
        self._log_sigmoid_shift = float(F.logsigmoid(torch.tensor(self.shift, dtype=torch.float64)))

    def _shift_log_scale(self, params):
        """``(t, a)``: the shift and the forward map's log-scale, ``a > log sigma(c)``."""
        shift, raw = params.unbind(-1)
        return shift, soft_clamp(self._log_sigmoid_shift - F.logsigmoid(raw + self.shift), self.log_scale_bound)

    def __repr__(self):
        return f"SigmoidAffine(shift={self.shift}, log_scale_bound={self.log_scale_bound})"


class Additive(Transformer):
    r"""Additive (volume-preserving) map :math:`g(x) = x + t` (NICE, Dinh et al. 2015)."""

    num_params = 1

    def forward(self, x, params):
        y = x + params[..., 0]
        return y, torch.zeros_like(y)

    def inverse(self, y, params):
        x = y - params[..., 0]
        return x, torch.zeros_like(x)


class PiecewiseLinear(Transformer):
    r"""Piecewise-linear monotone map on [``lower``, ``upper``] with :math:`K` equal-width bins.

    The neural-importance-sampling form (Müller et al., "Neural Importance
    Sampling", 2019): unconstrained :math:`\theta \in \mathbb{R}^K` give bin
    masses :math:`q = m + (1 - Km)\,\mathrm{softmax}(\theta)` (at least
    :math:`m` = ``MIN_BIN_SIZE`` each, so no mass underflows to zero and
    :math:`\log g'` stays finite for any parameters), and on the unit square

    .. math::

        g(x) = \sum_{k<b} q_k + (Kx - b)\, q_b, \qquad b = \lfloor K x\rfloor,
        \qquad g'(x) = K q_b,

    Prince's eq. 16.12 with 0-based bins :math:`b \in \{0, \dots, K-1\}` (so
    :math:`Kx - b \in [0, 1)` and :math:`g` is continuous at the knots; the
    slope is problem 16.8's answer), rescaled to [``lower``, ``upper``].  Outside the interval the map is the identity
    (linear tails), so every real input is valid.  ``theta = 0`` is the
    identity.  The derivative jumps at the knots (the map is continuous).
    """

    def __init__(self, bins: int = 8, lower: float = 0.0, upper: float = 1.0):
        if bins < 1 or bins * MIN_BIN_SIZE >= 1:
            raise ValueError(f"bins must be in [1, {int(1 / MIN_BIN_SIZE) - 1}], got {bins}")
        if not upper > lower:
            raise ValueError(f"need lower < upper, got [{lower}, {upper}]")
        self.bins, self.lower, self.upper = int(bins), float(lower), float(upper)
        self.num_params = self.bins

    def _masses(self, params):
        q = _sizes(params)
        cum = F.pad(torch.cumsum(q, dim=-1), (1, 0))
        cum = torch.cat([cum[..., :-1], torch.ones_like(cum[..., -1:])], dim=-1)  # exact end point
        return q, cum

    def forward(self, x, params):
        K, width = self.bins, self.upper - self.lower
        inside = (x >= self.lower) & (x <= self.upper)
        u = ((x - self.lower) / width).clamp(0.0, 1.0)
        q, cum = self._masses(params)
        b = torch.clamp((u * K).floor().long(), max=K - 1)
        qb, cb = _take(q, b.unsqueeze(-1)).squeeze(-1), _take(cum, b.unsqueeze(-1)).squeeze(-1)
        v = cb + (u * K - b) * qb
        y = torch.where(inside, self.lower + width * v, x)
        ladj = torch.where(inside, torch.log(K * qb), torch.zeros_like(x))
        return y, ladj

    def inverse(self, y, params):
        K, width = self.bins, self.upper - self.lower
        inside = (y >= self.lower) & (y <= self.upper)
        v = ((y - self.lower) / width).clamp(0.0, 1.0)
        q, cum = self._masses(params)
        b = _bin_search(cum[..., 1:], v)
        qb, cb = _take(q, b.unsqueeze(-1)).squeeze(-1), _take(cum, b.unsqueeze(-1)).squeeze(-1)
        u = (b + (v - cb) / qb) / K
        x = torch.where(inside, self.lower + width * u, y)
        # the log-det is the forward's at the recovered point: at a knot (where the
        # slope jumps) take the bin the forward pass assigns to that x
        b_fwd = torch.clamp((u * K).floor().long(), 0, K - 1)
        q_fwd = _take(q, b_fwd.unsqueeze(-1)).squeeze(-1)
        ladj = torch.where(inside, torch.log(K * q_fwd), torch.zeros_like(y))
        return x, ladj

    def __repr__(self):
        return f"PiecewiseLinear(bins={self.bins}, lower={self.lower}, upper={self.upper})"


# --------------------------------------------------------------------------
# Helpers shared by the splines: knots from unconstrained sizes, bin search,
# gathers with broadcasting, and a safeguarded Newton root finder.
# --------------------------------------------------------------------------

#: Smallest bin width / height of a spline, as a fraction of the interval
#: (``bins * MIN_BIN_SIZE < 1`` is required).  Keeps every slope within
#: ``[MIN_BIN_SIZE, 1 / MIN_BIN_SIZE]`` so float32 stays well conditioned.
MIN_BIN_SIZE = 1e-3
#: Smallest knot derivative of the rational-quadratic spline, smallest density
#: of the piecewise-quadratic map, and the margin of the cubic spline's end
#: derivatives inside the monotone region (float32 safety).
MIN_DERIVATIVE = 1e-3


def _sizes(raw: torch.Tensor, min_size: float = MIN_BIN_SIZE) -> torch.Tensor:
    r"""Bin sizes :math:`m + (1 - Km)\,\mathrm{softmax}(\theta)` (each at least
    :math:`m`, summing to one; ``theta = 0`` gives equal bins) for any real logits."""
    K = raw.shape[-1]
    return min_size + (1.0 - K * min_size) * _softmax_over_bins(raw).movedim(0, -1)


def _right_edges(raw: torch.Tensor, min_size: float = MIN_BIN_SIZE) -> torch.Tensor:
    r"""Knots ``1..K`` on ``[0, 1]`` (the right edges of the bins) of bins of
    :func:`_sizes` ``(raw)``: :math:`k m + (1 - Km) \sum_{j<k}
    \mathrm{softmax}(\theta)_j` in three passes (softmax, cumsum, one fused
    affine).  ``[..., :-1]`` are the interior knots; the last one is 1 up to
    rounding and is replaced by exactly 1 in :func:`_fill_ends` (no slicing
    here, so the backward pass allocates nothing extra)."""
    K = raw.shape[-1]
    base = min_size * torch.arange(1, K + 1, dtype=raw.dtype, device=raw.device)
    return torch.add(base, torch.cumsum(_softmax_over_bins(raw), dim=0).movedim(0, -1), alpha=1.0 - K * min_size)


def _softmax_over_bins(raw: torch.Tensor) -> torch.Tensor:
    """The softmax over the last (bin) dimension of ``raw``, returned with that dimension
    moved to the front.  PyTorch's CPU softmax and cumsum over a short last dimension
    (8-16 bins) work one row at a time; along the leading dimension they vectorise across
    the rows (measured on 4096 x 8 x 2 rows of 8 bins: softmax + cumsum 11.3 -> 2.8 ms, with
    their backward 17.8 -> 5.4 ms).  Same values."""
    return torch.softmax(raw.movedim(-1, 0), dim=0)


def _bin_search(edges: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bin index ``k`` in ``0..K-1`` of ``v`` given the right edges ``edges`` (..., K) of the bins.

    Counts the interior knots at or below ``v``: a broadcasting comparison, no
    boolean indexing and no copies when ``edges`` has a smaller batch shape.
    """
    return (v.unsqueeze(-1) >= edges[..., :-1]).sum(-1)


def _neighbours(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Positions (..., 2) of knots ``idx`` and ``idx + 1`` in an array of ``n``
    values at knots ``1, 2, ...``, clamped into range (the end knots are set by
    :func:`_fill_ends`)."""
    return torch.stack(((idx - 1).clamp(min=0), idx.clamp(max=n - 1)), dim=-1)


def _fill_ends(lo, hi, ends, first, last):
    """Knot values ``lo`` (at ``idx``) and ``hi`` (at ``idx + 1``) with the end knots set
    to ``first`` / ``last``; ``ends = (idx == 0, idx == K - 1)``."""
    return torch.where(ends[0], first, lo), torch.where(ends[1], last, hi)


def _bin_ends(values: torch.Tensor, idx: torch.Tensor, bins: int, first, last):
    """Values at knots ``idx`` and ``idx + 1`` from ``values`` (..., n) at knots
    ``1..n`` (``n`` = ``K`` or ``K - 1``) and end values ``first`` / ``last``
    (numbers or tensors): one gather."""
    if values.shape[-1] == 0:
        zero = torch.zeros_like(idx, dtype=values.dtype)
        return zero + first, zero + last
    lo, hi = _take(values, _neighbours(idx, values.shape[-1])).unbind(-1)
    return _fill_ends(lo, hi, (idx == 0, idx == bins - 1), first, last)


def _take(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[..., index[..., j]]`` with ``src`` (..., n) broadcast against ``index`` (..., m)."""
    shape = torch.broadcast_shapes(src.shape[:-1], index.shape[:-1])
    return src.expand(*shape, src.shape[-1]).gather(-1, index.expand(*shape, index.shape[-1]))


def _solve_increasing(fn, target, lo, hi, start, iters: int):
    r"""Root of ``fn(x) = target`` for ``fn`` increasing on ``[lo, hi]`` with the
    root inside: a safeguarded Newton iteration, ``iters`` steps.

    ``fn(x)`` returns ``(value, derivative)``; the target is first clamped onto
    ``[fn(lo), fn(hi)]`` (rounding can put it just outside).  Each step shrinks the bracket
    at the current point, then takes the Newton step if it lands inside the
    bracket and is at most half the previous step (or below a rounding floor
    of ``16 eps`` times the bracket's scale), and bisects otherwise (the
    rule of Numerical Recipes' ``rtsafe``: the steps shrink geometrically, and
    Newton cycling across a flat or badly scaled ``fn`` falls back to
    bisection).  The loop runs without autograd; the
    result gets the implicit-function gradient :math:`\partial x/\partial\cdot
    = -\partial(\mathrm{fn}(x) - \mathrm{target})/\partial\cdot \,/\, \mathrm{fn}'(x)`
    by one differentiable evaluation whose value contribution is exactly zero.
    At most ``iters`` steps; eager mode stops early once every point has
    converged, while under ``torch.compile`` the fixed count keeps the graph
    free of data-dependent control flow.
    """
    with torch.no_grad():
        x, lo, hi = start.detach(), lo.detach(), hi.detach()
        # aim at the target clamped onto [fn(lo), fn(hi)], so that a root exists despite rounding
        t = torch.minimum(torch.maximum(target.detach(), fn(lo)[0]), fn(hi)[0])
        step = hi - lo
        # steps below ``tol`` (rounding noise at convergence) never trigger bisection
        tol = 16 * torch.finfo(x.dtype).eps * (lo.abs() + hi.abs() + 1)
        for _ in range(iters):
            f, df = fn(x)
            err = f - t
            lo = torch.where(err <= 0, x, lo)
            hi = torch.where(err >= 0, x, hi)
            newton = x - err / df
            ok = (newton >= lo) & (newton <= hi) & (2 * (newton - x).abs() <= torch.maximum(step, tol))
            x_new = torch.where(ok, newton, 0.5 * (lo + hi))
            step, x = (x_new - x).abs(), x_new
            # eager only: stop once every step is below the rounding floor (a compiled
            # graph runs all ``iters`` steps, keeping it free of data-dependent control flow)
            if not torch.compiler.is_compiling() and bool((step <= tol).all()):
                break
    f, df = fn(x)
    err = f - target
    tiny = torch.finfo(x.dtype).tiny
    return x - (err - err.detach()) / df.detach().clamp(min=tiny)


def _expand_bracket(fn, target, lo, hi, iters: int = 200):
    r"""Grow ``[lo, hi]`` until it brackets the root of ``fn(x) = target`` for an increasing ``fn``.

    While ``fn(lo) > target`` the bracket moves left (the old ``lo`` becomes
    ``hi``) and doubles its width, likewise to the right: a root at distance
    :math:`r` is bracketed within a factor 2 after :math:`O(\log r)`
    evaluations, which hands :func:`_solve_increasing` a tight bracket when
    no analytic one is known.  No autograd; eager mode stops once every
    point is bracketed (at most ``iters`` rounds).
    """
    with torch.no_grad():
        t, lo, hi = target.detach(), lo.detach(), hi.detach()
        for _ in range(iters):
            left, right = fn(lo)[0] > t, fn(hi)[0] < t
            if not torch.compiler.is_compiling() and not bool((left | right).any()):
                break
            width = 2 * (hi - lo)
            lo, hi = (torch.where(left, lo - width, torch.where(right, hi, lo)),
                      torch.where(left, lo, torch.where(right, hi + width, hi)))
    return lo, hi


class _Spline(Transformer):
    r"""A monotone spline on :math:`[-B, B]` with identity (linear) tails.

    Subclasses write the map on the unit square, ``_forward_unit(u, params)``
    and ``_inverse_unit(v, params)`` returning ``(value, log-derivative)``;
    here the input is rescaled, clamped into the interval (so the unused
    branch of ``torch.where`` is always finite and gets finite gradients), and
    the tails are the exact identity with log-derivative 0.  The derivative is
    invariant under the common rescaling of both axes.  The first ``K``
    parameters are the bin-width logits of every spline.
    """

    def __init__(self, bins: int = 8, bound: float = 5.0):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        if bins * MIN_BIN_SIZE >= 1:
            raise ValueError(f"bins must be below {int(1 / MIN_BIN_SIZE)} (minimum bin size {MIN_BIN_SIZE})")
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.bins, self.bound = bins, float(bound)

    def _apply(self, z, params, unit_map):
        B = self.bound
        inside = (z >= -B) & (z <= B)
        u = ((z + B) / (2 * B)).clamp(0.0, 1.0)
        out, logd = unit_map(u, params)
        return torch.where(inside, (2 * B) * out - B, z), torch.where(inside, logd, 0.0)

    def forward(self, x, params):
        return self._apply(x, params, self._forward_unit)

    def inverse(self, y, params):
        return self._apply(y, params, self._inverse_unit)

    def knot_positions(self, params: torch.Tensor) -> torch.Tensor:
        """The ``K + 1`` knots on the input axis, shape ``(..., D, K + 1)``, from ``-B`` to ``B``."""
        inner = _right_edges(params[..., : self.bins])[..., :-1]
        knots = torch.cat([torch.zeros_like(inner[..., :1]), inner, torch.ones_like(inner[..., :1])], dim=-1)
        return (2 * self.bound) * knots - self.bound

    def __repr__(self):
        return f"{type(self).__name__}(bins={self.bins}, bound={self.bound})"


class PiecewiseQuadratic(_Spline):
    r"""Piecewise-quadratic monotone map on :math:`[-B, B]` (identity outside).

    Müller et al., "Neural Importance Sampling", 2019.  On the unit square the
    derivative (a density) is piecewise linear, with ``K`` bin widths
    :math:`w_k` (softmax of logits, each at least ``MIN_BIN_SIZE``) and
    ``K + 1`` vertex heights

    .. math::

        v = (1-\epsilon)\,\frac{e^{\tilde v}}{\sum_k \tfrac12 (e^{\tilde v_k}
        + e^{\tilde v_{k+1}}) w_k} + \epsilon,\qquad
        g(x) = c_b + w_b\,\alpha\,v_b + \tfrac12 w_b\,\alpha^2 (v_{b+1} - v_b),

    with :math:`\alpha = (x - x_b)/w_b` in bin :math:`b`, :math:`c_b` the mass
    of the bins before, and :math:`g'(x) = v_b + \alpha (v_{b+1} - v_b)`,
    continuous across the knots (it jumps to the tail slope 1 at
    :math:`\pm B`).  :math:`\epsilon` = ``MIN_DERIVATIVE`` mixes in the uniform
    density, keeping :math:`g' \ge \epsilon`.  Params: ``K`` width logits,
    then ``K + 1`` vertex logits (``2K + 1``); zeros are the identity.  Both
    directions cost the same: the inverse is the closed-form root
    :math:`\alpha = 2c / (b + \sqrt{b^2 + 4ac})` of the quadratic (the form
    without cancellation, valid as :math:`a \to 0`).
    """

    def __init__(self, bins: int = 8, bound: float = 5.0):
        super().__init__(bins, bound)
        self.num_params = 2 * self.bins + 1

    def _local(self, z, params, inverse: bool):
        K, eps = self.bins, MIN_DERIVATIVE
        w = _sizes(params[..., :K])
        e = torch.exp(params[..., K:] - params[..., K:].amax(-1, keepdim=True))
        area = 0.5 * (e[..., :-1] + e[..., 1:]) * w
        scale = (1 - eps) / area.sum(-1, keepdim=True)
        x_edges, y_edges = torch.cumsum(w, dim=-1), torch.cumsum(scale * area + eps * w, dim=-1)
        idx = _bin_search(y_edges if inverse else x_edges, z)
        x0, x1 = _bin_ends(x_edges, idx, K, 0.0, 1.0)
        y0, _ = _bin_ends(y_edges, idx, K, 0.0, 1.0)
        v0, v1 = (scale * _take(e, torch.stack((idx, idx + 1), dim=-1)) + eps).unbind(-1)
        return x0, x1 - x0, y0, v0, v1

    def _forward_unit(self, u, params):
        x0, w, y0, v0, v1 = self._local(u, params, False)
        alpha = (u - x0) / w  # in [0, 1] by the bin search (no clamp: it would cut gradients at the knots)
        slope = v0 + alpha * (v1 - v0)
        return y0 + w * alpha * 0.5 * (v0 + slope), torch.log(slope)

    def _inverse_unit(self, y, params):
        x0, w, y0, v0, v1 = self._local(y, params, True)
        c = (y - y0).clamp(min=0.0)
        a, b = 0.5 * w * (v1 - v0), w * v0
        alpha = 2 * c / (b + torch.sqrt((b * b + 4 * a * c).clamp(min=0.0)))
        return x0 + w * alpha, torch.log(v0 + alpha * (v1 - v0))


class CubicSpline(_Spline):
    r"""Monotone cubic (Hermite) spline on :math:`[-B, B]` (identity outside).

    Durkan et al., "Cubic-Spline Flows", 2019.  ``K`` bins with widths
    :math:`w_k` and heights :math:`h_k` (softmax of logits, each at least
    ``MIN_BIN_SIZE`` of the interval), slopes :math:`s_k = h_k / w_k`, and
    knot derivatives from Steffen's method (1990) in the interior,
    :math:`d_k = \min(2s_{k-1}, 2s_k, p_k)` with
    :math:`p_k = (s_{k-1} w_k + s_k w_{k-1}) / (w_{k-1} + w_k)`, and learned
    at the two ends, :math:`d_0 = s_0 (\delta + (3 - 2\delta)\sigma(\tilde d_0 + c))`
    (likewise :math:`d_K`; the shift :math:`c` makes 0 give :math:`d_0 = s_0`),
    so every derivative ratio lies in :math:`(0, 3)`, the Fritsch--Carlson
    square where a cubic Hermite piece is monotone; :math:`\delta` =
    ``MIN_DERIVATIVE`` keeps it strictly increasing.  In bin :math:`k` with
    :math:`t = (x - x_k)/w_k`,

    .. math::

        g = y_k + w_k\bigl(A t^3 + C t^2 + d_k t\bigr),\quad
        g' = d_k + 2Ct + 3At^2,\quad A = d_k + d_{k+1} - 2 s_k,\;
        C = 3 s_k - 2 d_k - d_{k+1},

    so value and derivative are continuous at the interior knots.  Params:
    ``K`` width, ``K`` height logits and the 2 end-derivative logits
    (``2K + 2``); zeros are the identity.  The forward is cheap; the inverse
    solves the cubic in its bin by safeguarded Newton with bisection on ``t``
    in ``[0, 1]`` (``iters`` = 30 steps).  Measured round-trip error (8 bins,
    parameters perturbed from the identity by :math:`\sigma` N(0, 1)):
    float64 :math:`\le 4\cdot 10^{-14}` for :math:`\sigma \le 1` (Newton
    converges in 6--8 steps) and :math:`\sim 10^{-9}` for :math:`\sigma = 2`
    (some points need bisection); float32 :math:`\sim 10^{-6}` at
    :math:`\sigma = 0.3`, up to :math:`10^{-4}` where slopes are near the
    minimum (the conditioning of the inverse).
    """

    #: shift of the end-derivative logits so that 0 gives derivative ratio 1 (the identity)
    _END_SHIFT = math.log((1 - MIN_DERIVATIVE) / (2 - MIN_DERIVATIVE))

    def __init__(self, bins: int = 8, bound: float = 5.0, iters: int = 30):
        super().__init__(bins, bound)
        self.num_params = 2 * self.bins + 2
        self.iters = int(iters)

    def _local(self, z, params, inverse: bool):
        K, delta = self.bins, MIN_DERIVATIVE
        w, h = _sizes(params[..., :K]), _sizes(params[..., K : 2 * K])
        s = h / w
        s0, s1, w0, w1 = s[..., :-1], s[..., 1:], w[..., :-1], w[..., 1:]
        d_inner = torch.minimum(torch.minimum(2 * s0, 2 * s1), (s0 * w1 + s1 * w0) / (w0 + w1))
        d_ends = s[..., [0, -1]] * (delta + (3 - 2 * delta) * torch.sigmoid(params[..., 2 * K :] + self._END_SHIFT))
        x_edges, y_edges = torch.cumsum(w, dim=-1), torch.cumsum(h, dim=-1)
        idx = _bin_search(y_edges if inverse else x_edges, z)
        x0, x1 = _bin_ends(x_edges, idx, K, 0.0, 1.0)
        y0, y1 = _bin_ends(y_edges, idx, K, 0.0, 1.0)
        d0, d1 = _bin_ends(d_inner, idx, K, d_ends[..., 0], d_ends[..., 1])
        w = x1 - x0
        s = (y1 - y0) / w
        return x0, y0, w, d0, d0 + d1 - 2 * s, 3 * s - 2 * d0 - d1

    def _forward_unit(self, u, params):
        x0, y0, w, d0, A, C = self._local(u, params, False)
        t = (u - x0) / w
        return y0 + w * t * (d0 + t * (C + t * A)), torch.log(d0 + t * (2 * C + 3 * A * t))

    def _inverse_unit(self, v, params):
        x0, y0, w, d0, A, C = self._local(v, params, True)
        target = (v - y0) / w

        def cubic(t):
            return t * (d0 + t * (C + t * A)), d0 + t * (2 * C + 3 * A * t)

        zero = torch.zeros_like(target)
        start = (target / (d0 + (C + A))).clamp(0.0, 1.0)  # the chord: exact for a linear piece
        t = _solve_increasing(cubic, target, zero, zero + 1, start, self.iters).clamp(0.0, 1.0)
        return x0 + w * t, torch.log(cubic(t)[1])

    def __repr__(self):
        return f"CubicSpline(bins={self.bins}, bound={self.bound}, iters={self.iters})"


class RationalQuadraticSpline(_Spline):
    r"""Monotone rational-quadratic spline on :math:`[-B, B]` (identity outside).

    Durkan et al., "Neural Spline Flows", 2019 (Gregory & Delbourgo 1982).
    ``K`` bins with widths :math:`w_k`, heights :math:`h_k` (softmax of
    logits, each at least ``MIN_BIN_SIZE`` of the interval), slopes
    :math:`s_k = h_k/w_k` and ``K - 1`` interior knot derivatives
    :math:`d_k = \epsilon + (1-\epsilon)\,\tfrac12\bigl(\tilde d_k +
    \sqrt{\tilde d_k^2 + 4}\bigr)` (positive, 1 at :math:`\tilde d = 0`,
    linear growth like softplus but cheaper; :math:`\epsilon` =
    ``MIN_DERIVATIVE``); the end derivatives are 1, so value *and* derivative
    are continuous into the identity tails.  In bin :math:`k` with
    :math:`\xi = (x - x_k)/w_k`:

    .. math::

        g = y_k + \frac{h_k\,[s_k\xi^2 + d_k\xi(1-\xi)]}
                       {s_k + (d_{k+1} + d_k - 2s_k)\,\xi(1-\xi)},\qquad
        g' = \frac{s_k^2\,[d_{k+1}\xi^2 + 2s_k\xi(1-\xi) + d_k(1-\xi)^2]}
                  {[s_k + (d_{k+1} + d_k - 2s_k)\,\xi(1-\xi)]^2}.

    Params: ``K`` width, ``K`` height, ``K - 1`` derivative logits
    (``3K - 1``); zeros are the identity.  Both directions cost the same: the
    inverse is the root :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})` of a
    quadratic.  For speed, widths and heights share one softmax, one cumsum
    and one gather, and the derivative constraint is applied only to the two
    values gathered at the point's bin.
    """

    def __init__(self, bins: int = 8, bound: float = 5.0):
        super().__init__(bins, bound)
        self.num_params = 3 * self.bins - 1

    def _local(self, z, params, inverse: bool):
        K = self.bins
        if K == 1:  # a single bin with end derivatives 1 is the identity
            one = torch.ones_like(z)
            return 0 * one, 0 * one, one, one, one, one, one, torch.zeros_like(z, dtype=torch.long)
        # widths and heights together: one softmax, one cumsum, one gather
        logits, raw_d = params.split((2 * K, K - 1), dim=-1)  # split: one concatenation in backward
        edges = _right_edges(logits.unflatten(-1, (2, K)))  # (..., 2, K): widths and heights together
        idx = _bin_search(edges[..., int(inverse), :], z)
        pair = _neighbours(idx, K)
        ends = (idx == 0, idx == K - 1)
        knots = _take(edges, pair.unsqueeze(-2).expand(*pair.shape[:-1], 2, 2))
        x0, x1 = _fill_ends(knots[..., 0, 0], knots[..., 0, 1], ends, 0.0, 1.0)
        y0, y1 = _fill_ends(knots[..., 1, 0], knots[..., 1, 1], ends, 0.0, 1.0)
        raw = _take(raw_d, pair.clamp(max=K - 2))
        d0, d1 = (MIN_DERIVATIVE + (0.5 - 0.5 * MIN_DERIVATIVE) * (raw + torch.hypot(raw, raw.new_full((), 2.0)))).unbind(-1)
        d0, d1 = _fill_ends(d0, d1, ends, 1.0, 1.0)
        w, h = x1 - x0, y1 - y0
        return x0, y0, w, h, h / w, d0, d1, idx

    @staticmethod
    def _log_derivative(xi, s, d0, d1):
        om = 1 - xi
        xo = xi * om
        den = s + (d0 + d1 - 2 * s) * xo
        return 2 * torch.log(s / den) + torch.log(d1 * xi * xi + 2 * s * xo + d0 * om * om)

    def _forward_unit(self, u, params):
        x0, y0, w, h, s, d0, d1, _ = self._local(u, params, False)
        xi = (u - x0) / w
        xo = xi * (1 - xi)
        y = y0 + h * (s * xi * xi + d0 * xo) / (s + (d0 + d1 - 2 * s) * xo)
        return y, self._log_derivative(xi, s, d0, d1)

    def _inverse_unit(self, v, params):
        x0, y0, w, h, s, d0, d1, _ = self._local(v, params, True)
        dy = (v - y0).clamp(min=0.0)
        k = (d0 + d1 - 2 * s) * dy
        b = h * d0 - k
        disc = (b * b + 4 * (h * (s - d0) + k) * s * dy).clamp(min=0.0)
        xi = 2 * s * dy / (b + torch.sqrt(disc))
        return x0 + w * xi, self._log_derivative(xi, s, d0, d1)


def _clamp_min_keep_grad(v: torch.Tensor) -> torch.Tensor:
    """``max(v, 0)`` in value with the gradient of ``v``: for quantities that are
    non-negative in exact arithmetic and only dip below 0 by rounding (at a knot)."""
    return v + (v.clamp(min=0.0) - v).detach()


#: Smallest split point of a linear rational spline bin (Pyro's ``min_lambda``).
MIN_LAMBDA = 0.025


class LinearRationalSpline(RationalQuadraticSpline):
    r"""Monotone linear rational spline on :math:`[-B, B]` (identity outside): Pyro's
    ``order="linear"`` spline (Dolatabadi et al., "Invertible Generative Modeling using
    Linear Rational Splines", AISTATS 2020).

    Knots and knot derivatives :math:`d_k` as in :class:`RationalQuadraticSpline`
    (end derivatives 1), plus a split point :math:`\lambda_k \in (0.025, 0.975)`
    per bin.  With :math:`w_b = \sqrt{d_k/d_{k+1}}`,
    :math:`w_c = (\lambda d_k + (1-\lambda) w_b d_{k+1})/s_k` and the middle value
    :math:`y_c = ((1-\lambda) y_k + \lambda w_b y_{k+1}) / ((1-\lambda) + \lambda w_b)`,
    in bin :math:`k` with :math:`\xi = (x - x_k)/w_k`:

    .. math::

        g = \frac{y_k(\lambda-\xi) + w_c y_c \xi}{(\lambda-\xi) + w_c\xi}\ (\xi \le \lambda),
        \qquad
        g = \frac{w_c y_c (1-\xi) + w_b y_{k+1}(\xi-\lambda)}{w_c(1-\xi) + w_b(\xi-\lambda)}
        \ (\xi > \lambda),

    each piece a linear rational function, so both directions are closed-form
    and cost the same.  Params: ``K`` width, ``K`` height, ``K - 1`` derivative
    and ``K`` split logits (``4K - 1``); zeros are the identity.
    """

    def __init__(self, bins: int = 8, bound: float = 5.0):
        super().__init__(bins, bound)
        self.num_params = 4 * self.bins - 1

    def _pieces(self, z, params, inverse: bool):
        K = self.bins
        x0, y0, w, h, s, d0, d1, idx = self._local(z, params[..., : 3 * K - 1], inverse)
        raw = _take(params[..., 3 * K - 1:], idx.unsqueeze(-1)).squeeze(-1)
        lam = MIN_LAMBDA + (1 - 2 * MIN_LAMBDA) * torch.sigmoid(raw)
        wb = torch.sqrt(d0 / d1)
        wc = (lam * d0 + (1 - lam) * wb * d1) / s
        # the rises y_c - y_k and y_{k+1} - y_c in closed form (their difference of
        # nearby values would round to 0 in float32 for extreme parameters)
        den = (1 - lam) + lam * wb
        return x0, y0, w, lam, wb, wc, h * lam * wb / den, h * (1 - lam) / den

    @staticmethod
    def _log_derivative(xi, w, lam, wb, wc, rise_l, rise_r):
        xl, xr = torch.minimum(xi, lam), torch.maximum(xi, lam)  # each piece on its own side: finite
        ld_left = torch.log(wc * lam) + torch.log(rise_l) - 2 * torch.log((lam - xl) + wc * xl)
        ld_right = (torch.log(wb * wc * (1 - lam)) + torch.log(rise_r)
                    - 2 * torch.log(wc * (1 - xr) + wb * (xr - lam)))
        return torch.where(xi <= lam, ld_left, ld_right) - torch.log(w)

    def _forward_unit(self, u, params):
        x0, y0, w, lam, wb, wc, rise_l, rise_r = self._pieces(u, params, False)
        xi = ((u - x0) / w).clamp(0.0, 1.0)
        xl, xr = torch.minimum(xi, lam), torch.maximum(xi, lam)
        g_left = y0 + wc * xl * rise_l / ((lam - xl) + wc * xl)
        g_right = (y0 + rise_l + rise_r) - wc * (1 - xr) * rise_r / (wc * (1 - xr) + wb * (xr - lam))
        y = torch.where(xi <= lam, g_left, g_right)
        return y, self._log_derivative(xi, w, lam, wb, wc, rise_l, rise_r)

    def _inverse_unit(self, v, params):
        x0, y0, w, lam, wb, wc, rise_l, rise_r = self._pieces(v, params, True)
        a = _clamp_min_keep_grad(v - y0)  # height above y_k
        al, c = torch.minimum(a, rise_l), _clamp_min_keep_grad(a - rise_l)
        e = _clamp_min_keep_grad(rise_r - c)  # height below y_{k+1}
        xi_left = lam * al / (wc * (rise_l - al) + al)
        xi_right = (wc * c + lam * wb * e) / (wc * c + wb * e)
        xi = torch.where(a <= rise_l, xi_left, xi_right)
        return x0 + w * xi, self._log_derivative(xi, w, lam, wb, wc, rise_l, rise_r)


class LogisticMixtureCDF(Transformer):
    r"""Logit of a mixture of logistic CDFs (Flow++, Ho et al., 2019):

    .. math::

        g(x) = \sigma^{-1}\Bigl(\sum_k \pi_k\,\sigma\bigl((x - \mu_k)/s_k\bigr)\Bigr),

    a monotone map of the whole real line onto itself, evaluated entirely in
    log space, :math:`g = \mathrm{LSE}_k(\log\pi_k + \log\sigma(z_k)) -
    \mathrm{LSE}_k(\log\pi_k + \log\sigma(-z_k))` with
    :math:`z_k = (x-\mu_k)/s_k`, and
    :math:`\log g' = \mathrm{LSE}_k(\log\pi_k + \log\sigma(z_k) +
    \log\sigma(-z_k) - \log s_k) - \log F - \log(1-F)`, so it is finite for
    every real :math:`x` (far out :math:`g` is linear with slope
    :math:`1/\min s_k` or :math:`1/\max s_k`).  Params per dimension: ``K``
    mixture logits, ``K`` locations, ``K`` log-scales (softly clamped to
    :math:`\pm` ``log_scale_bound``), ``3K`` in all; zeros are the identity
    (:math:`\sigma^{-1}\circ\sigma`).

    The forward is cheap.  The inverse has no closed form: since
    :math:`\min_k z_k \le g(x) \le \max_k z_k`, the root of :math:`g(x) = y`
    lies in :math:`[\min_k(\mu_k + s_k y), \max_k(\mu_k + s_k y)]` for any
    real :math:`y`; it is found by safeguarded Newton/bisection from the
    :math:`\pi`-weighted point of that bracket, ``iters`` = 40 steps (each a
    full evaluation).  Measured round-trip error relative to :math:`1 + |x|`
    (8 components, parameters perturbed from the identity by :math:`\sigma`
    N(0, 1), :math:`|x| \le 50`): float64 :math:`\sim 10^{-15}` for
    :math:`\sigma \le 1` (Newton converges in under 10 steps),
    :math:`10^{-10}` for :math:`\sigma = 2` (where some points need
    bisection); float32 :math:`\sim 10^{-6}` for :math:`\sigma \le 1`.
    Where the mixture is nearly flat
    (far-apart, narrow components) the inverse is ill conditioned in ``x``.
    """

    def __init__(self, components: int = 8, log_scale_bound: float = 7.0, iters: int = 40):
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        self.components, self.log_scale_bound, self.iters = components, float(log_scale_bound), int(iters)
        self.num_params = 3 * components

    def _parts(self, params):
        K = self.components
        log_pi = torch.log_softmax(params[..., :K], dim=-1)
        log_s = soft_clamp(params[..., 2 * K:], self.log_scale_bound)
        return log_pi, params[..., K:2 * K], log_s

    @staticmethod
    def _eval(x, log_pi, mu, log_s):
        z = (x.unsqueeze(-1) - mu) * torch.exp(-log_s)
        lp, ln = F.logsigmoid(z), F.logsigmoid(-z)
        log_f = torch.logsumexp(log_pi + lp, dim=-1)
        log_1mf = torch.logsumexp(log_pi + ln, dim=-1)
        log_df = torch.logsumexp(log_pi + lp + ln - log_s, dim=-1)
        return log_f - log_1mf, log_df - log_f - log_1mf

    def forward(self, x, params):
        return self._eval(x, *self._parts(params))

    def inverse(self, y, params):
        log_pi, mu, log_s = self._parts(params)
        ends = mu + torch.exp(log_s) * y.unsqueeze(-1)
        start = (torch.exp(log_pi) * ends).sum(-1)

        def g(x):
            value, log_d = self._eval(x, log_pi, mu, log_s)
            return value, torch.exp(log_d)

        x = _solve_increasing(g, y, ends.amin(-1), ends.amax(-1), start, self.iters)
        return x, self._eval(x, log_pi, mu, log_s)[1]

    def __repr__(self):
        return f"LogisticMixtureCDF(components={self.components}, iters={self.iters})"


#: Activations of :class:`DeepSigmoid` (Pyro's names) and the negative slope of its leaky ReLU
#: (that of Pyro's ``LeakyReLUTransform``).
NAF_ACTIVATIONS = ("sigmoid", "tanh", "ELU", "LeakyReLU")
LEAKY_SLOPE = 0.01


class DeepSigmoid(Transformer):
    r"""The deep sigmoidal transformer of neural autoregressive flows (NAF).

    Huang, Krueger, Lacoste & Courville, "Neural Autoregressive Flows", ICML
    2018, eq. (8), with Pyro's choice of activation :math:`\sigma`:

    .. math::

        g(x) = \sigma^{-1}\Bigl(\sum_{k=1}^K w_k\,\sigma(a_k x + b_k)\Bigr),\qquad
        g'(x) = \frac{\sum_k w_k a_k\,\sigma'(a_k x + b_k)}{\sigma'(g(x))},

    with :math:`a_k = \mathrm{softplus}(\tilde a_k) > 0`, :math:`w =
    \mathrm{softmax}(\tilde w)` and :math:`K` = ``width``.  :math:`g` is a
    quasi-arithmetic mean of the :math:`z_k = a_k x + b_k` under the
    increasing :math:`\sigma`, so it is strictly increasing and
    :math:`\min_k z_k \le g(x) \le \max_k z_k`.  Params per dimension, in
    Pyro's order: ``K`` :math:`\tilde a`, ``K`` :math:`\tilde w`, ``K``
    :math:`b` (``3K``); :math:`\tilde a = \mathrm{softplus}^{-1}(1)`,
    :math:`\tilde w = b = 0` is the identity.

    ``activation``: ``"sigmoid"`` (the deep sigmoidal flow: a logistic
    mixture CDF followed by the logit, evaluated in log space by
    :class:`LogisticMixtureCDF`'s formulas with :math:`\mu_k = -b_k/a_k`,
    :math:`s_k = 1/a_k`), ``"tanh"`` (:math:`\tanh z = 2\sigma(2z) - 1`, so
    the same mixture at :math:`2z` and half its logit), ``"ELU"`` and
    ``"LeakyReLU"`` (slope ``LEAKY_SLOPE``; ELU's negative branch
    :math:`\log\sum_k w_k e^{z_k}` is a log-sum-exp).  Every real input gives
    finite values and log-derivatives (far out, :math:`g` is linear).

    The forward is one evaluation.  The inverse has no closed form: its root
    lies in :math:`[\min_k (y - b_k)/a_k,\ \max_k (y - b_k)/a_k]`, found by
    the safeguarded Newton/bisection solver shared with
    :class:`LogisticMixtureCDF` (at most ``iters`` steps).
    """

    def __init__(self, width: int = 16, activation: str = "sigmoid", iters: int = 60):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if activation not in NAF_ACTIVATIONS:
            raise ValueError(f"activation must be one of {NAF_ACTIVATIONS}, got {activation!r}")
        self.width, self.activation, self.iters = width, activation, int(iters)
        self.num_params = 3 * width

    def identity_params(self):
        a = torch.full((self.width,), math.log(math.expm1(1.0)))
        return torch.cat([a, torch.zeros(2 * self.width)])

    def _parts(self, params):
        """``(a, log a, log w, b, mu, log s)``; the last two (the logistic-mixture form of the
        sigmoid and tanh maps) are computed once here, not on every solver step."""
        K = self.width
        a = F.softplus(params[..., :K])
        log_a, b = torch.log(a), params[..., 2 * K:]
        log_w = torch.log_softmax(params[..., K:2 * K], dim=-1)
        if self.activation == "sigmoid":
            return a, log_a, log_w, b, -b / a, -log_a
        if self.activation == "tanh":  # tanh z = 2 sigma(2z) - 1: the mixture at 2z
            return a, log_a, log_w, b, -b / a, -log_a - math.log(2.0)
        return a, log_a, log_w, b, None, None

    def _eval(self, x, a, log_a, log_w, b, mu, log_s):
        """``(g(x), log g'(x))`` elementwise."""
        if self.activation == "sigmoid":
            # sigma(a x + b) = logistic CDF at x with mu = -b / a, s = 1 / a
            return LogisticMixtureCDF._eval(x, log_w, mu, log_s)
        if self.activation == "tanh":  # atanh(2F - 1) = logit(F) / 2
            value, log_d = LogisticMixtureCDF._eval(x, log_w, mu, log_s)
            return 0.5 * value, log_d - math.log(2.0)
        z = a * x.unsqueeze(-1) + b
        if self.activation == "ELU":
            mean = (log_w.exp() * torch.where(z > 0, z, torch.expm1(z.clamp(max=0.0)))).sum(-1)
            # ELU^{-1}(m) = log(1 + m) for m <= 0, with 1 + ELU(z) = e^z (z <= 0) or 1 + z
            log1p_elu = torch.where(z > 0, torch.log1p(z.clamp(min=0.0)), z)
            y = torch.where(mean > 0, mean, torch.logsumexp(log_w + log1p_elu, dim=-1))
            log_d = torch.logsumexp(log_w + log_a + z.clamp(max=0.0), dim=-1) - y.clamp(max=0.0)
            return y, log_d
        log_slope = math.log(LEAKY_SLOPE)
        mean = (log_w.exp() * torch.where(z > 0, z, LEAKY_SLOPE * z)).sum(-1)
        y = torch.where(mean > 0, mean, mean / LEAKY_SLOPE)
        log_d = torch.logsumexp(log_w + log_a + (z <= 0).to(z.dtype) * log_slope, dim=-1)
        return y, log_d - (y <= 0).to(y.dtype) * log_slope

    def forward(self, x, params):
        return self._eval(x, *self._parts(params))

    def inverse(self, y, params):
        parts = self._parts(params)
        a, _, log_w, b = parts[:4]
        ends = (y.unsqueeze(-1) - b) / a
        start = (log_w.exp() * ends).sum(-1)

        def g(x):
            value, log_d = self._eval(x, *parts)
            return value, torch.exp(log_d)

        x = _solve_increasing(g, y, ends.amin(-1), ends.amax(-1), start, self.iters)
        return x, self._eval(x, *parts)[1]

    def __repr__(self):
        return f"DeepSigmoid(width={self.width}, activation={self.activation!r})"


class SumOfSquaresPolynomial(Transformer):
    r"""Sum-of-squares polynomial transformer (SOS flow).

    Jaini, Selby & Yu, "Sum-of-Squares Polynomial Flow", ICML 2019:

    .. math::

        g(x) = c + \epsilon x + \int_0^x \sum_{k=1}^{K}\Bigl(\sum_{r=0}^{R} a_{kr} u^r\Bigr)^2 du
             = c + \epsilon x + \sum_k \sum_{r,s} \frac{a_{kr} a_{ks}}{r + s + 1}\, x^{r+s+1},
        \qquad g'(x) = \epsilon + \sum_k p_k(x)^2,

    with :math:`R` = ``count_degree``, :math:`K` = ``count_sum`` and
    :math:`\epsilon` = ``MIN_DERIVATIVE``: a polynomial of degree
    :math:`2R + 1` with a strictly positive derivative (Pyro's ``Polynomial``
    has :math:`\epsilon = 0`, a map that is only non-decreasing, and adds
    :math:`10^{-8}` inside its log-derivative).  The integral is analytic:
    the coefficients of :math:`\sum_k p_k^2` are anti-diagonal sums of
    :math:`\sum_k a_{kr}a_{ks}`, evaluated by Horner's rule.  Params per
    dimension: the :math:`K(R+1)` coefficients in Pyro's layout (``k``
    major), scaled as :math:`a_{kr} = \theta_{kr} / r!` (a preconditioning:
    parameters of unit scale give tails that grow gently instead of like
    :math:`x^{2R+1}`; Pyro's coefficients are :math:`a_{kr}` unscaled),
    then :math:`c` (Pyro's free per-dimension shift).  The
    identity :math:`a_{k0} = \sqrt{1-\epsilon}\,v_k` (:math:`v \propto
    (1, \dots, K)`, unit norm), all else 0, has distinct :math:`p_k`, so
    training from it is not stuck in a symmetric point.

    The forward is one evaluation; the inverse is found by the shared
    safeguarded Newton/bisection solver in the bracket :math:`[0, (y-c)/\epsilon]`
    (or :math:`[(y-c)/\epsilon, 0]`), which holds because :math:`g' \ge
    \epsilon`, narrowed to a factor 2 by a doubling search from
    :math:`[-1, 1]` (at most ``iters`` solver steps).
    """

    def __init__(self, count_degree: int = 4, count_sum: int = 3, iters: int = 100):
        for name, value in (("count_degree", count_degree), ("count_sum", count_sum)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "count_degree" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'count_degree' else 'positive'} "
                                 f"int, got {value!r}")
        self.count_degree, self.count_sum, self.iters = count_degree, count_sum, int(iters)
        self.num_params = count_sum * (count_degree + 1) + 1
        n = count_degree + 1
        # one-hot map of the (r, s) products onto the power r + s of sum_k p_k^2
        # a_kr = theta_kr / r!: unit-scale parameters give gently growing tails (and every
        # polynomial stays reachable); without it theta ~ 0.3 already sends x = 4 to 1e3
        self._taylor = torch.tensor([1.0 / math.factorial(r) for r in range(n)], dtype=torch.float64)
        self._antidiagonal = F.one_hot((torch.arange(n)[:, None] + torch.arange(n)).flatten(), 2 * n - 1)

    def identity_params(self):
        v = torch.arange(1, self.count_sum + 1, dtype=torch.get_default_dtype())
        a = torch.zeros(self.count_sum, self.count_degree + 1)
        a[:, 0] = math.sqrt(1 - MIN_DERIVATIVE) * v / v.norm()
        return torch.cat([a.flatten(), torch.zeros(1)])

    def _parts(self, params):
        K, n = self.count_sum, self.count_degree + 1
        a = params[..., :-1].unflatten(-1, (K, n)) * self._taylor.to(params)
        e = (a.unsqueeze(-1) * a.unsqueeze(-2)).sum(-3).flatten(-2) @ self._antidiagonal.to(params)
        # coefficients of g - c: e_m / (m + 1) at the power m + 1, plus epsilon at power 1
        integral = e / torch.arange(1, 2 * n, dtype=params.dtype, device=params.device)
        return a, integral, params[..., -1]

    @staticmethod
    def _horner(x, coefs):
        """``sum_m coefs[..., m] x^m``."""
        out = coefs[..., -1]
        for m in range(coefs.shape[-1] - 2, -1, -1):
            out = out * x + coefs[..., m]
        return out

    def _eval(self, x, a, integral, c):
        g = c + x * (MIN_DERIVATIVE + self._horner(x, integral))
        d = MIN_DERIVATIVE + (self._horner(x.unsqueeze(-1), a) ** 2).sum(-1)
        return g, d

    def forward(self, x, params):
        g, d = self._eval(x, *self._parts(params))
        return g, torch.log(d)

    def inverse(self, y, params):
        a, integral, c = self._parts(params)
        def g(u):
            return self._eval(u, a, integral, c)

        # g' >= epsilon bounds the root by (y - c) / epsilon; a doubling search from [-1, 1]
        # narrows that to within a factor 2
        far = (y - c) / MIN_DERIVATIVE
        zero = torch.zeros_like(far)
        lo, hi = _expand_bracket(g, y, zero - 1, zero + 1)
        lo, hi = torch.maximum(lo, torch.minimum(far, zero)), torch.minimum(hi, torch.maximum(far, zero))
        x = _solve_increasing(g, y, lo, hi, 0.5 * (lo + hi), self.iters)
        return x, torch.log(self._eval(x, a, integral, c)[1])

    def __repr__(self):
        return f"SumOfSquaresPolynomial(count_degree={self.count_degree}, count_sum={self.count_sum})"



def _log_cosh(w: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\cosh w = |w| + \log(1 + e^{-2|w|}) - \log 2`, finite for every real ``w``."""
    a = w.abs()
    return a + F.softplus(-2 * a) - math.log(2.0)


class SinhArcsinh(Transformer):
    r"""Two-sided sinh-arcsinh map: separate left/right tail weights and a skew.

    After Jones & Pewsey, "Sinh-arcsinh distributions", Biometrika 96(4), 2009,
    whose family :math:`\sinh(a\,\mathrm{asinh}(z) + \epsilon)` of a normal
    :math:`z` changes the tail weight (:math:`a > 1`: heavier, polynomial growth
    :math:`|z|^{a}`; e.g. :math:`a = 2` turns Gaussian tails :math:`e^{-z^2/2}`
    into exponential ones) and the skew.  Here the tail weight differs on each
    side, which an asymmetric tail needs (the exponential left tail of
    :math:`\log\tau` in eight schools).  Two steps, :math:`g = s_\epsilon
    \circ t_{a}`:

    .. math::

        t(x) = \frac{\sinh(a_\pm\,\mathrm{asinh}\,x)}{a_\pm},\quad
        a_\pm = \begin{cases} a_L & x < 0 \\ a_R & x \ge 0\end{cases},\qquad
        s_\epsilon(u) = \sinh(\mathrm{asinh}\,u + \epsilon),

    .. math::

        \log t'(x) = \log\cosh(a_\pm\mathrm{asinh}\,x) - \log\sqrt{1+x^2},\qquad
        \log s_\epsilon'(u) = \log\cosh(\mathrm{asinh}\,u + \epsilon) - \log\sqrt{1+u^2}.

    Dividing by :math:`a_\pm` gives :math:`t(0) = 0`, :math:`t'(0) = 1` and
    :math:`t''(0) = 0` on both sides, so the piecewise map is :math:`C^2` at 0
    whatever :math:`a_L \ne a_R`.  :math:`t` keeps the sign of :math:`x`, so
    its closed-form inverse picks the side from the sign of :math:`u`:
    :math:`t^{-1}(u) = \sinh(\mathrm{asinh}(a_\pm u)/a_\pm)`, and
    :math:`s_\epsilon^{-1}(y) = \sinh(\mathrm{asinh}\,y - \epsilon)`.  Both
    directions cost the same (a few elementwise ops).

    Params per dimension :math:`(\epsilon, \tilde a_L, \tilde a_R)`; zeros are
    the identity.  Tail weights :math:`a = \exp(b\tanh(\tilde a / b))` with
    :math:`b = \log` ``max_tail`` (positive, 1 at 0; default range
    :math:`(1/4, 4)`), skew :math:`\epsilon = 5\tanh(\tilde\epsilon/5)`.  The
    bounds keep float32 finite (values and gradients) for :math:`|x|` up to
    :math:`10^6` in both directions: the forward's exponent is at most
    :math:`4\,\mathrm{asinh}(10^6) + 5 \approx 63 < 88`.  ``log cosh`` and
    ``hypot`` are evaluated in overflow-free forms.  Unlike the splines the
    tails are *not* the identity: changing the tail shape is the point.
    """

    num_params = 3

    def __init__(self, max_tail: float = 4.0, max_skew: float = 5.0):
        if not max_tail > 1:
            raise ValueError(f"max_tail must be > 1, got {max_tail}")
        if not max_skew > 0:
            raise ValueError(f"max_skew must be > 0, got {max_skew}")
        self.max_tail, self.max_skew = float(max_tail), float(max_skew)

    def _parts(self, params, z):
        raw_eps, raw_left, raw_right = params.unbind(-1)
        bound = math.log(self.max_tail)
        # side of the input (t keeps the sign, so the same test works on either axis)
        a = torch.exp(soft_clamp(torch.where(z < 0, raw_left, raw_right), bound))
        return soft_clamp(raw_eps, self.max_skew), a

    @staticmethod
    def _log_abs_hypot1(z):
        return torch.log(torch.hypot(torch.ones_like(z), z))

    def forward(self, x, params):
        eps, a = self._parts(params, x)
        w = a * torch.asinh(x)
        u = torch.sinh(w) / a
        v = torch.asinh(u) + eps
        ld = _log_cosh(w) - self._log_abs_hypot1(x) + _log_cosh(v) - self._log_abs_hypot1(u)
        return torch.sinh(v), ld

    def inverse(self, y, params):
        eps, _ = self._parts(params, y)
        v = torch.asinh(y)
        u = torch.sinh(v - eps)
        _, a = self._parts(params, u)  # the side of u (= the side of x)
        w = torch.asinh(a * u)
        x = torch.sinh(w / a)
        ld = _log_cosh(w) - self._log_abs_hypot1(x) + _log_cosh(v) - self._log_abs_hypot1(u)
        return x, ld

    def __repr__(self):
        return f"SinhArcsinh(max_tail={self.max_tail}, max_skew={self.max_skew})"


#: Transformer kinds by name: ``kind -> factory(bins, bound)``.  Structures
#: (``elementwise``, ``spline_coupling``, ``masked_autoregressive``, ...) take a
#: ``kind=`` argument looked up here, and the test harness runs every kind.
KINDS = {
    "affine": lambda bins, bound: Affine(),
    "additive": lambda bins, bound: Additive(),
    "sigmoid_affine": lambda bins, bound: SigmoidAffine(),
    "piecewise_linear": lambda bins, bound: PiecewiseLinear(bins, -bound, bound),
    "piecewise_quadratic": lambda bins, bound: PiecewiseQuadratic(bins, bound),
    "cubic_spline": lambda bins, bound: CubicSpline(bins, bound),
    "rq_spline": lambda bins, bound: RationalQuadraticSpline(bins, bound),
    "lr_spline": lambda bins, bound: LinearRationalSpline(bins, bound),
    "logistic_mixture": lambda bins, bound: LogisticMixtureCDF(bins),
    "sinh_arcsinh": lambda bins, bound: SinhArcsinh(),
}


def make_transformer(kind: str | Transformer, bins: int = 8, bound: float = 5.0) -> Transformer:
    """Look up a transformer by name (see :data:`KINDS`); a ``Transformer`` passes through."""
    if isinstance(kind, Transformer):
        return kind
    try:
        factory = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown transformer kind {kind!r}; choose one of {sorted(KINDS)}") from None
    return factory(bins, bound)


#: Pyro's spline ``order`` names and the transformer kind each one means.
SPLINE_ORDERS = {"linear": "lr_spline", "quadratic": "rq_spline"}


def spline_kind(order: str) -> str:
    """The transformer kind of Pyro's spline ``order`` (``"linear"`` or ``"quadratic"``)."""
    try:
        return SPLINE_ORDERS[order]
    except (KeyError, TypeError):
        raise ValueError(f"order must be one of {sorted(SPLINE_ORDERS)}, got {order!r}") from None


class Inverted(Transformer):
    r"""A transformer used backwards: :math:`h = g^{-1}` for a transformer :math:`g`.

    pyroflows' layers apply their transformer in the generative direction
    (:math:`x = g(z)`), so scoring data evaluates :math:`g^{-1}`.  Wrapped in
    ``Inverted``, the transformer runs in the normalizing direction
    (:math:`z = g(x)`), the zuko/nflows convention for splines.  The model
    family changes (the inverse of a rational-quadratic spline is not one):
    with the spline on the scoring side the likelihood surface is smoother,
    and on the 2-D toy densities it fits better (``docs/bench_quality_2d.md``).
    Both directions stay closed-form for the RQ spline.

    .. math::

        h(x) = g^{-1}(x), \qquad \log h'(x) = -\log g'(h(x)).
    """

    def __init__(self, base: Transformer):
        if not isinstance(base, Transformer):
            raise TypeError(f"Inverted wraps a Transformer, got {type(base).__name__}")
        self.base = base
        self.num_params = base.num_params

    def forward(self, x, params):
        y, ladj = self.base.inverse(x, params)  # y = g^{-1}(x); log h'(x) = -log g'(y)
        return y, -ladj

    def inverse(self, y, params):
        x, ladj = self.base.forward(y, params)  # x = g(y); log h'(x) = -log g'(y)
        return x, -ladj

    def identity_params(self):
        return self.base.identity_params()

    def __repr__(self):
        return f"Inverted({self.base!r})"
