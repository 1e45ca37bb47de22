r"""Block neural autoregressive flows (BNAF): the autoregressive network *is* the transform.

De Cao, Titov & Aziz, "Block Neural Autoregressive Flow", UAI 2019.  A stack
of masked linear layers whose weight matrices are block lower-triangular,
:math:`D \times D` blocks of size :math:`a_\ell \times a_{\ell-1}`
(:math:`a_0 = a_L = 1`, the hidden ``hidden_factors`` in between), with
strictly monotone activations between them.  The diagonal blocks are
positive, so output :math:`d` depends on :math:`x_{\le d}` only and is
strictly increasing in :math:`x_d`:

.. math::

    W_\ell = \begin{pmatrix} e^{V_{11}} & & \\ V_{21} & e^{V_{22}} & \\ \vdots & & \ddots\end{pmatrix},
    \qquad \text{each row rescaled to norm } e^{s_r} \text{ (weight normalization)}.

The Jacobian is triangular; its diagonal :math:`\partial y_d/\partial x_d` is
the product, through the layers, of the *diagonal blocks* and the activation
derivatives, a chain of small matrices evaluated in log space:

.. math::

    \log \frac{\partial h^{(\ell)}_d}{\partial x_d}
    = \log\sigma'(\cdot) + \mathrm{LSE}_k\Bigl(\log W^{(\ell)}_{dd}[:, k]
      + \log \frac{\partial h^{(\ell-1)}_{d,k}}{\partial x_d}\Bigr).

The forward is one pass (the direction Pyro implements; Pyro gives no
inverse).  The inverse solves the triangular system one dimension at a time:
for dimension :math:`d` the off-diagonal inputs from :math:`x_{<d}` are
fixed, so :math:`y_d` is a strictly increasing scalar function of
:math:`x_d` that costs only the diagonal blocks to evaluate, and the shared
safeguarded Newton/bisection solver finds its root (``D`` sequential batched
scalar solves), in a bracket found by doubling from :math:`[-1, 1]`.

Without a residual connection the output layer is a linear map of bounded
activations (``tanh``, ``sigmoid``), so the image of the layer is a bounded
set, as in Pyro: the layer is a bijection onto its image, and a point outside
it has no preimage: the inverse detects it (two evaluations at
:math:`x_d = \pm 10^{30}`, where the activations have saturated) and returns
:math:`x_d = \pm 10^{30}`, where the base density, hence the layer's, is zero
to working precision.  ``residual="normal"`` or ``"gated"`` make it a
bijection of :math:`\mathbb{R}^D`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Bijector
from .elementwise import check_input_dim
from .transformers import _expand_bracket, _solve_increasing

__all__ = ["BlockAutoregressive", "block_autoregressive"]

_LEAKY_SLOPE = 0.01
#: where the inverse puts a point outside the layer's image: far enough out that the
#: base density there is zero to working precision (and still finite in float32)
_FAR = 1e30


def _activate(name: str, c: torch.Tensor):
    """``(h, log h'(c))`` of the activation ``name`` (Pyro's choices), finite for every real ``c``."""
    if name == "tanh":
        return torch.tanh(c), 2 * (math.log(2.0) - c - F.softplus(-2 * c))
    if name == "sigmoid":
        return torch.sigmoid(c), F.logsigmoid(c) + F.logsigmoid(-c)
    if name == "ELU":
        return F.elu(c), c.clamp(max=0.0)
    return F.leaky_relu(c, _LEAKY_SLOPE), (c < 0).to(c.dtype) * math.log(_LEAKY_SLOPE)


def _log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) @ exp(b))`` for matrices of logs."""
    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


class BlockLinear(nn.Module):
    r"""A linear map :math:`\mathbb{R}^{D a_{in}} \to \mathbb{R}^{D a_{out}}` with a block
    lower-triangular, weight-normalised matrix whose diagonal blocks are positive.

    ``weight()`` returns the matrix and the logs of its diagonal blocks, shape
    ``(D, a_out, a_in)``.  Initialisation as in Pyro: Xavier-uniform raw
    weights on and below the diagonal, :math:`\log U(0, 1)` row scales,
    uniform :math:`\pm 1/\sqrt{D a_{out}}` biases.
    """

    def __init__(self, dim: int, in_factor: int, out_factor: int):
        super().__init__()
        self.dim, self.in_factor, self.out_factor = dim, in_factor, out_factor
        n_out, n_in = dim * out_factor, dim * in_factor
        blocks = torch.eye(dim)
        self.register_buffer("diag_mask", torch.kron(blocks, torch.ones(out_factor, in_factor)))
        lower = torch.tril(torch.ones(dim, dim), diagonal=-1)
        self.register_buffer("lower_mask", torch.kron(lower, torch.ones(out_factor, in_factor)))
        raw = torch.zeros(n_out, n_in)
        for i in range(dim):
            rows, cols = slice(i * out_factor, (i + 1) * out_factor), slice(0, (i + 1) * in_factor)
            raw[rows, cols] = nn.init.xavier_uniform_(torch.empty(out_factor, (i + 1) * in_factor))
        self.raw_weight = nn.Parameter(raw)
        self.log_scale = nn.Parameter(torch.rand(n_out, 1).log())
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-n_out ** -0.5, n_out ** -0.5))

    def weight(self):
        """``(W, log W_dd)``: the matrix ``(D a_out, D a_in)`` and its log diagonal blocks."""
        v = self.raw_weight
        w = torch.exp(v) * self.diag_mask + v * self.lower_mask
        log_norm = 0.5 * torch.log((w * w).sum(-1, keepdim=True))
        weight = torch.exp(self.log_scale - log_norm) * w
        log_diag = (self.log_scale + v - log_norm).unflatten(0, (self.dim, self.out_factor))
        index = torch.arange(self.dim, device=v.device)
        log_diag = log_diag.unflatten(-1, (self.dim, self.in_factor))[index, :, index]  # (D, a_out, a_in)
        return weight, log_diag

    def extra_repr(self):
        return f"dim={self.dim}, in_factor={self.in_factor}, out_factor={self.out_factor}"


class BlockAutoregressive(Bijector):
    r"""Block neural autoregressive flow layer (BNAF, De Cao et al., 2019).

    .. math::

        y = W_L\,\sigma(\cdots \sigma(W_1 x + b_1) \cdots) + b_L,\qquad
        \log|\det J| = \sum_d \log\frac{\partial y_d}{\partial x_d},

    with block lower-triangular :math:`W_\ell` (see the module docstring) and,
    with ``residual="normal"``, :math:`y \leftarrow x + y` (log-derivative
    :math:`\mathrm{softplus}(\log \partial_d y_d)`) or, with ``"gated"``,
    :math:`y \leftarrow \alpha x + (1 - \alpha) y`, :math:`\alpha =
    \sigma(\text{gate})`.  The forward is one pass (sampling, as in Pyro);
    the inverse is :math:`D` sequential scalar root-finds, each costing only
    the diagonal blocks.

    Args:
        input_dim: :math:`D`.
        hidden_factors: hidden layer :math:`\ell` has ``hidden_factors[l]``
            units per input dimension (:math:`a` and :math:`b` in the paper).
        activation: ``"tanh"``, ``"sigmoid"``, ``"ELU"`` or ``"LeakyReLU"``.
        residual: ``None``, ``"normal"`` or ``"gated"``.
    """

    def __init__(self, input_dim: int, hidden_factors: Sequence[int] = (8, 8), activation: str = "tanh",
                 residual: str | None = None, *, iters: int = 100, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = check_input_dim(input_dim)
        factors = list(hidden_factors)
        if not factors or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in factors):
            raise ValueError(f"hidden_factors must be a non-empty list of positive ints, got {hidden_factors!r}")
        if activation not in ("tanh", "sigmoid", "ELU", "LeakyReLU"):
            raise ValueError(f"activation must be 'tanh', 'sigmoid', 'ELU' or 'LeakyReLU', got {activation!r}")
        if residual not in (None, "normal", "gated"):
            raise ValueError(f"residual must be None, 'normal' or 'gated', got {residual!r}")
        self.event_shape = (dim,)
        self.input_dim, self.activation, self.residual, self.iters = dim, activation, residual, int(iters)
        widths = [1, *factors, 1]
        self.layers = nn.ModuleList(BlockLinear(dim, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.gate = nn.Parameter(torch.randn(1)) if residual == "gated" else None

    def _stack(self, h, linears, log_diags):
        """Run the layers: ``linears[l](h)`` is layer ``l``'s pre-activation and
        ``log_diags[l]`` its log diagonal blocks ``(n, a_out, a_in)`` for the ``n``
        dimensions in ``h``.  Returns the output and ``log dy_d/dx_d`` (..., n)."""
        log_j = None
        last = len(self.layers) - 1
        for i, (linear, log_diag) in enumerate(zip(linears, log_diags)):
            pre = linear(h)
            log_j = log_diag if log_j is None else _log_matmul(log_diag, log_j)
            if i < last:
                h, log_act = _activate(self.activation, pre)
                log_j = log_j + log_act.unflatten(-1, (log_diag.shape[0], -1)).unsqueeze(-1)
            else:
                h = pre
        return h, log_j[..., 0, 0].expand(h.shape)

    def _residual(self, x, f, log_j):
        if self.residual == "normal":
            return x + f, F.softplus(log_j)
        if self.residual == "gated":
            log_a, log_1ma = F.logsigmoid(self.gate), F.logsigmoid(-self.gate)
            alpha = torch.exp(log_a)
            return alpha * x + (1 - alpha) * f, torch.logaddexp(log_a.expand_as(log_j), log_1ma + log_j)
        return f, log_j

    def _call_and_ladj(self, x):
        weights = [layer.weight() for layer in self.layers]
        linears = [lambda h, w=w, b=layer.bias: F.linear(h, w, b) for (w, _), layer in zip(weights, self.layers)]
        f, log_j = self._stack(x, linears, [ld for _, ld in weights])
        y, log_j = self._residual(x, f, log_j)
        return y, log_j.sum(-1)

    def _inverse_and_ladj(self, y):
        weights = [layer.weight() for layer in self.layers]
        x = torch.zeros_like(y)
        dead = torch.zeros(y.shape[:-1], dtype=torch.bool, device=y.device)
        for d in range(self.input_dim):
            # inputs of dimension d's blocks from the solved x_{<d}: fixed during its solve
            consts, h = [], x
            for i, ((w, _), layer) in enumerate(zip(weights, self.layers)):
                a_in, a_out = layer.in_factor, layer.out_factor
                rows = slice(d * a_out, (d + 1) * a_out)
                consts.append(F.linear(h[..., : d * a_in], w[rows, : d * a_in], layer.bias[rows]))
                if i < len(self.layers) - 1:
                    h = _activate(self.activation, F.linear(h, w, layer.bias))[0]
            diag = [w[d * layer.out_factor:(d + 1) * layer.out_factor, d * layer.in_factor:(d + 1) * layer.in_factor]
                    for (w, _), layer in zip(weights, self.layers)]

            def g(u, diag=diag, consts=consts):
                # y_d and dy_d/dx_d by forward-mode through the diagonal blocks (cheaper than
                # the log-space chain; the solver only needs the derivative for its Newton steps)
                h, dh = u.unsqueeze(-1), torch.ones_like(u).unsqueeze(-1)
                for i, (w, c) in enumerate(zip(diag, consts)):
                    h, dh = F.linear(h, w) + c, F.linear(dh, w)
                    if i < len(diag) - 1:
                        h, log_act = _activate(self.activation, h)
                        dh = dh * torch.exp(log_act)
                value, log_j = self._residual(u, h[..., 0], torch.log(dh[..., 0]))
                return value, torch.exp(log_j)

            # the image of x_d -> y_d is the open interval between its limits at -inf and +inf
            # (bounded with tanh/sigmoid and no residual): a target outside it has no preimage
            with torch.no_grad():
                big = torch.full_like(y[..., d], _FAR)
                # a point already outside in an earlier dimension has density zero: x_d = 0 for it
                below = (y[..., d] <= g(-big)[0]) & ~dead
                above = (y[..., d] >= g(big)[0]) & ~dead
                outside = below | above | dead
                dead = outside
                target = torch.where(outside, g(torch.zeros_like(big))[0], y[..., d])
            target = torch.where(outside, target, y[..., d])  # keeps the gradient path of y
            lo, hi = _expand_bracket(g, target, big * 0 - 1, big * 0 + 1, iters=60)
            x_d = _solve_increasing(g, target, lo, hi, 0.5 * (lo + hi), self.iters)
            x_d = torch.where(below, -big, torch.where(above, big, x_d))
            x = torch.cat([x[..., :d], x_d.unsqueeze(-1), x[..., d + 1:]], dim=-1)
        return x, self._call_and_ladj(x)[1]

    def extra_repr(self):
        return f"input_dim={self.input_dim}, activation={self.activation!r}, residual={self.residual!r}"


def block_autoregressive(input_dim: int, *, hidden_factors: Sequence[int] = (8, 8), activation: str = "tanh",
                         residual: str | None = None) -> BlockAutoregressive:
    """A :class:`BlockAutoregressive` (BNAF) layer.  Pyro's helper is ``block_autoregressive(input_dim,
    **kwargs)`` forwarding to the class; the keywords here are the class's, with its defaults."""
    return BlockAutoregressive(input_dim, hidden_factors, activation, residual)
