r"""AutoFlow's affine stage: a lower-triangular linear map, an elementwise affine map and an
optional fixed whitening map, as one layer over one parameter tensor.

.. math::

    y = w + W \left(t + e^{\sigma} \odot (L x + b)\right), \qquad
    L = \mathrm{tril}(A, -1) + \mathrm{diag}(e^{a}), \qquad
    \sigma = B \tanh(\tilde\sigma / B),

    \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_d a_d + \sum_d \sigma_d
    + \sum_d \log W_{dd} .

It is the :class:`~pyroflows.transforms.linear.Triangular` layer (Prince, section 16.3)
followed by the elementwise :class:`~pyroflows.transforms.transformers.Affine` layer and, once
:meth:`GuideAffine.set_whitening` has been called, by the fixed map of the Laplace start
(:math:`w` its mode, :math:`W` the Cholesky factor of its covariance, as Pyro's
``LowerCholeskyAffine``): the same function with the same parameters.  In an SVI step of a small model the cost is per layer and
per parameter tensor, not per flop (Pyro steps each tensor with its own optimizer and registers
it on every call): as one layer over one tensor the pair costs about as much as either did
alone.  Elementwise optimizers (Adam, ``ClippedAdam``) take the same steps on the packed tensor
as on the separate ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..transforms.base import Bijector
from ..transforms.elementwise import check_input_dim
from ..transforms.linear import _rows, triangular_forward, triangular_inverse
from ..transforms.transformers import Affine

__all__ = ["GuideAffine"]


class GuideAffine(Bijector):
    r""":math:`y = w + W (t + e^{\sigma} \odot (L x + b))`, the whitening :math:`(w, W)` once
    :meth:`set_whitening` has set it (see the module docstring for the math).

    Args:
        input_dim: :math:`D`.
        linear: include the triangular map :math:`L x + b` (default); ``False`` leaves the
            elementwise affine map alone.
        scale_bound: :math:`B`, the bound of the elementwise log-scales :math:`\sigma`.

    One parameter, ``weight``, of shape ``(D, D + 1 + 2)`` (``(D, 2)`` without the linear map):
    the triangular layer's packed tensor (``linear_weight``, the layout of
    :class:`~pyroflows.transforms.linear.Triangular`'s ``weight``) beside the elementwise
    affine's parameters :math:`(t, \tilde\sigma)` per dimension (``params``, the layout of
    :class:`~pyroflows.transforms.elementwise.Elementwise`'s).  Starts at the identity.
    """

    sign = 1

    def __init__(self, input_dim: int, *, linear: bool = True, scale_bound: float = 12.0, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = check_input_dim(input_dim)
        self.event_shape = (dim,)
        self.transformer = Affine(scale_bound)
        self.has_linear = bool(linear)
        linear_part = torch.zeros(dim, dim + 1 if self.has_linear else 0)
        params = self.transformer.identity_params().expand(dim, -1)
        self.weight = nn.Parameter(torch.cat([linear_part, params], dim=-1))
        self.register_buffer("whiten_loc", None)
        self.register_buffer("whiten_tril", None)
        self.register_buffer("whiten_ladj", None)

    @torch.no_grad()
    def set_whitening(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        r"""Make the layer end with the fixed map :math:`y \mapsto w + W y` (``loc`` = :math:`w`,
        ``scale_tril`` = :math:`W`, lower-triangular with a positive diagonal)."""
        dim = self.event_shape[0]
        if loc.shape != (dim,) or scale_tril.shape != (dim, dim):
            raise ValueError(f"need loc ({dim},) and scale_tril ({dim}, {dim}), got {tuple(loc.shape)} "
                             f"and {tuple(scale_tril.shape)}")
        diag = scale_tril.diagonal()
        if not bool((diag > 0).all()):
            raise ValueError("scale_tril must have a positive diagonal")
        like = self.weight
        self.whiten_loc = loc.to(like).clone()
        self.whiten_tril = torch.tril(scale_tril).to(like)
        self.whiten_ladj = diag.log().sum().to(like)

    @property
    def params(self) -> torch.Tensor:
        r"""The elementwise affine's parameters :math:`(t, \tilde\sigma)`, shape ``(D, 2)`` (a view)."""
        return self.weight[:, -self.transformer.num_params:]

    @property
    def linear_weight(self) -> torch.Tensor | None:
        """The triangular map's packed parameters, shape ``(D, D + 1)`` (a view), or ``None``."""
        return self.weight[:, :-self.transformer.num_params] if self.has_linear else None

    def _call_and_ladj(self, x):
        ladj = 0.0
        if self.has_linear:
            x, ladj = triangular_forward(x, self.linear_weight)
        y, log_scale = self.transformer.forward(x, self.params)
        ladj = log_scale.sum(-1) + ladj
        if self.whiten_tril is not None:
            y = F.linear(y, self.whiten_tril, self.whiten_loc)
            ladj = ladj + self.whiten_ladj
        return y, ladj

    def _inverse_and_ladj(self, y):
        ladj = 0.0
        if self.whiten_tril is not None:
            rows = _rows(y - self.whiten_loc)
            y = torch.linalg.solve_triangular(self.whiten_tril.T, rows, upper=True, left=False).reshape(y.shape)
            ladj = self.whiten_ladj
        x, log_scale = self.transformer.inverse(y, self.params)
        ladj = log_scale.sum(-1) + ladj
        if self.has_linear:
            x, linear_ladj = triangular_inverse(x, self.linear_weight)
            ladj = ladj + linear_ladj
        return x, ladj

    def extra_repr(self):
        return f"{self.transformer!r}, input_dim={self.event_shape[0]}, linear={self.has_linear}"
