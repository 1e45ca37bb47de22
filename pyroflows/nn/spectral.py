r"""Spectral-normalised (Lipschitz-bounded) layers for contractive residual blocks.

:class:`SpectralLinear` rescales its weight so that its spectral norm is at
most a coefficient :math:`c`; :class:`LipSwish` is a smooth activation with
Lipschitz constant 1.  A :class:`LipschitzMLP` alternating the two is
therefore Lipschitz with constant at most :math:`c^{L}` (``L`` linear layers),
which i-ResNet / Residual Flows need (:math:`\mathrm{Lip}(g) < 1`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LipSwish", "LipschitzMLP", "SpectralLinear"]


class SpectralLinear(nn.Module):
    r"""Linear layer with spectral norm at most ``coeff``.

    .. math::

        \hat W = \frac{W}{\max(1, \hat\sigma(W) / c)}, \qquad y = \hat W x + b,

    where :math:`\hat\sigma(W) = u^\top W v` is the largest singular value
    estimated by power iteration (Miyato et al. 2018; Behrmann et al. 2019).
    The singular vectors ``u``, ``v`` are buffers and the iteration is warm
    started from them; it runs until the singular vectors change by less than
    ``tol`` (default :math:`\epsilon^{3/4}` of the dtype) or ``max_iter`` steps, and only when the weight has
    changed since the last run, so repeated calls with the same weight give
    bit-identical outputs (in both train and eval mode).  Gradients flow through
    :math:`\hat\sigma = u^\top W v` with ``u``, ``v`` held fixed, which is the
    exact gradient of :math:`\sigma(W)` at convergence.

    Power iteration converges to :math:`\sigma` from below, so the bound holds
    up to the iteration tolerance: :math:`\|\hat W\|_2 \le c\,(1 + O(\mathrm{tol}))`;
    a coefficient :math:`c < 1` leaves the margin.

    Args:
        in_features, out_features: widths.
        coeff: the bound :math:`c > 0` on the spectral norm.
        tol: tolerance on the singular vectors (``None``: dtype default).
        max_iter: iteration limit per weight change (default 500).
        bias: learn an additive bias.
    """

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.9, tol: float | None = None,
                 max_iter: int = 500, bias: bool = True):
        super().__init__()
        if not coeff > 0:
            raise ValueError(f"coeff must be > 0, got {coeff}")
        if (tol is not None and not tol > 0) or max_iter < 1:
            raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
        self.in_features, self.out_features = in_features, out_features
        self.coeff, self.tol, self.max_iter = float(coeff), tol, int(max_iter)
        lin = nn.Linear(in_features, out_features, bias=bias)
        self.weight = lin.weight
        self.bias = lin.bias
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))
        self._key = None

    def _weight_key(self):
        w = self.weight
        return (w._version, w.data_ptr(), w.dtype, w.device, self.u._version, self.u.data_ptr())

    @torch.no_grad()
    def _power_iteration(self):
        w = self.weight.detach()
        tol = self.tol if self.tol is not None else torch.finfo(w.dtype).eps ** 0.75
        u, v = self.u.to(w.dtype), self.v.to(w.dtype)
        for _ in range(self.max_iter):
            v_new = F.normalize(w.t() @ u, dim=0)
            u_new = F.normalize(w @ v_new, dim=0)
            done = max((u_new - u).abs().max(), (v_new - v).abs().max()) <= tol
            u, v = u_new, v_new
            if done:
                break
        self.u.copy_(u)
        self.v.copy_(v)

    def sigma(self) -> torch.Tensor:
        """The power-iteration estimate of the largest singular value (differentiable in W)."""
        if self._key != self._weight_key():
            self._power_iteration()
            self._key = self._weight_key()
        return torch.dot(self.u.clone(), self.weight @ self.v.clone())

    def normalized_weight(self) -> torch.Tensor:
        """:math:`\\hat W = W / \\max(1, \\hat\\sigma / c)`."""
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, coeff={self.coeff}"


class LipSwish(nn.Module):
    r"""LipSwish (Chen et al. 2019): :math:`\phi(x) = x\,\sigma(\beta x) / 1.1`.

    Swish has Lipschitz constant below 1.1 for every :math:`\beta \ge 0`, so
    :math:`\phi` is 1-Lipschitz; :math:`\beta = \mathrm{softplus}(\rho)` is
    learnable and valid for any real :math:`\rho`.  Unlike ReLU it has a
    non-zero second derivative, which the log-det gradient needs.
    """

    def __init__(self):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(0.5413248546129181))  # softplus(rho) = 1

    def forward(self, x):
        return x * torch.sigmoid(F.softplus(self.rho) * x) / 1.1


class LipschitzMLP(nn.Sequential):
    r"""MLP of :class:`SpectralLinear` layers and 1-Lipschitz activations.

    :math:`\mathrm{Lip} \le c^{L}` for ``L = len(hidden) + 1`` linear layers.

    Args:
        in_features, out_features: widths.
        hidden: hidden widths (default ``(64, 64)``).
        coeff: spectral-norm bound of each linear layer.
        activation: a 1-Lipschitz ``nn.Module`` class (default :class:`LipSwish`;
            ``nn.ELU`` and ``nn.Tanh`` also qualify).
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64),
                 coeff: float = 0.9, activation: type[nn.Module] = LipSwish, **spectral_kw):
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [SpectralLinear(a, b, coeff, **spectral_kw), activation()]
        layers.append(SpectralLinear(widths[-1], out_features, coeff, **spectral_kw))
        super().__init__(*layers)
        self.in_features, self.out_features, self.coeff = in_features, out_features, coeff
        self.num_linear = len(hidden) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
