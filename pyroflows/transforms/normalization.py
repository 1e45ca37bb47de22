r"""Normalization flows: per-dimension affine maps whose scale and shift come from data.

Both layers are elementwise affine maps :math:`y = e^{s} \odot x + t`
(log-det :math:`\sum_d s_d`, :math:`O(D)` both ways) whose parameters are set
from the data in the normalizing direction ``inverse`` (data -> base):

* :class:`ActNorm` once, on the first batch it sees (then ordinary parameters);
* :class:`BatchNorm` on every training batch (then running averages in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Bijector
from .elementwise import check_input_dim

__all__ = ["ActNorm", "BatchNorm", "actnorm", "batchnorm"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class ActNorm(Bijector):
    r"""Activation normalization (Kingma & Dhariwal, "Glow", 2018).

    .. math::

        y = e^{s} \odot x + t, \qquad x = e^{-s} \odot (y - t), \qquad
        \log|\det J| = \sum_d s_d.

    **Data-dependent initialisation.**  The first batch seen in the
    normalizing direction (``inverse``, i.e. the first ``log_prob`` of data)
    sets :math:`t` to its mean and :math:`e^{s}` to its standard deviation per
    dimension, so that batch comes out with zero mean and unit variance; with a
    single row only the mean is used (:math:`s = 0`).  Afterwards :math:`s, t`
    are ordinary parameters.  The buffer ``initialized`` records this (it is
    in ``state_dict``, so a loaded layer is not re-initialised).  A
    ``forward`` call (sampling) before any ``inverse`` only marks the layer
    initialised, keeping its current parameters (the identity by default), so
    the distribution never changes under a user who samples first.
    Initialisation happens in train and eval mode alike.

    Both directions cost :math:`O(D)`.  The data-dependent branch is Python
    control flow, so ``torch.compile(fullgraph=True)`` sees a graph break once.
    """

    sign = 1

    def __init__(self, input_dim: int, eps: float = 1e-6, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._setup((check_input_dim(input_dim),), eps)

    def _setup(self, event_shape, eps):
        """Parameters per *channel*, the first event dimension: shape ``(D,)`` for vectors,
        ``(C, 1, 1)`` for images (shared over the pixels, as in Glow)."""
        self.event_shape = tuple(event_shape)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        channels = self.event_shape[0]
        param_shape = (channels,) + (1,) * (len(self.event_shape) - 1)
        self._positions = 1  # how many positions share each channel's parameters
        for n in self.event_shape[1:]:
            self._positions *= n
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.shift = nn.Parameter(torch.zeros(param_shape))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Set :math:`t`, :math:`s` so that ``y`` maps to zero mean, unit variance per channel
        (over the batch, and over the pixels of an image)."""
        rows = _rows(y.detach().movedim(-len(self.event_shape), -1))
        shape = self.shift.shape
        self.shift.copy_(rows.mean(0).view(shape))
        if rows.shape[0] > 1:
            self.log_scale.copy_(rows.std(0, correction=0).clamp_min(self.eps).log().view(shape))
        else:
            self.log_scale.zero_()
        self.initialized.fill_(True)

    def _ladj(self, x):
        batch_shape = x.shape[:x.dim() - len(self.event_shape)]
        return (self.log_scale.sum() * self._positions).expand(batch_shape)

    def _call_and_ladj(self, x):
        if not self.initialized:
            with torch.no_grad():
                self.initialized.fill_(True)
        y = x * self.log_scale.exp() + self.shift
        return y, self._ladj(x)

    def _inverse_and_ladj(self, y):
        if not self.initialized:
            self.initialize(y)
        x = (y - self.shift) * (-self.log_scale).exp()
        return x, self._ladj(y)

    def extra_repr(self):
        return f"input_dim={self.event_shape[0]}, initialized={bool(self.initialized)}"


class BatchNorm(Bijector):
    r"""Batch normalization as a flow (Dinh et al., "Density estimation using
    Real NVP", 2017; as Pyro's ``BatchNorm``).

    In the normalizing direction (``inverse``, data -> base)

    .. math::

        x = \gamma \odot \frac{y - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,
        \qquad \gamma = e^{\log\gamma},

    and the forward (generative) map is its inverse,
    :math:`y = (x - \beta) \sqrt{\sigma^2+\epsilon} / \gamma + \mu`, with
    :math:`\log|\det J| = \sum_d \tfrac12\log(\sigma_d^2+\epsilon) - \log\gamma_d`.

    * **train mode**: ``inverse`` uses the batch mean and (biased) variance
      of the rows of ``y`` (gradients flow through them, as in batch norm;
      the log-det treats them as constants, as RealNVP does) and updates the
      running averages ``running_mean``/``running_var`` (unbiased variance)
      with ``momentum``, as ``torch.nn.BatchNorm1d`` does; it needs at least
      two rows.  ``forward`` (sampling) uses the running statistics.  A
      training-mode inverse is therefore a function of the whole batch, not a
      bijection of one row; its log-det is returned with the pass and reused
      by ``log_prob`` through the cache.
    * **eval mode**: both directions use the running statistics, so the layer
      is an exact, invertible affine map.

    Both directions cost :math:`O(D)` per row.  Starts at the identity
    (running mean 0, variance 1, :math:`\gamma = 1`, :math:`\beta = 0`, up to :math:`\epsilon`).
    """

    sign = 1

    def __init__(self, input_dim: int, momentum: float = 0.1, epsilon: float = 1e-5, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.event_shape = (check_input_dim(input_dim),)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.log_gamma = nn.Parameter(torch.zeros(input_dim))
        self.beta = nn.Parameter(torch.zeros(input_dim))
        self.register_buffer("running_mean", torch.zeros(input_dim))
        self.register_buffer("running_var", torch.ones(input_dim))

    @property
    def exact_inverse(self):
        """In train mode the normalizing pass uses the batch statistics, so an input
        recomputed from an output (memory_saving) would not be exact."""
        return not self.training

    def _log_scale(self, var):
        """Forward log-scale :math:`\\tfrac12\\log(\\sigma^2+\\epsilon) - \\log\\gamma` per dimension."""
        return 0.5 * torch.log(var + self.epsilon) - self.log_gamma

    def _call_and_ladj(self, x):
        log_scale = self._log_scale(self.running_var)
        y = (x - self.beta) * log_scale.exp() + self.running_mean
        return y, log_scale.sum().expand(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        if self.training:
            rows = _rows(y)
            if rows.shape[0] < 2:
                raise ValueError("BatchNorm in train mode needs a batch of at least 2 rows "
                                 "(call .eval() to use the running statistics)")
            mean, var = rows.mean(0), rows.var(0, correction=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(rows.detach().var(0, correction=1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self._log_scale(var)
        x = (y - mean) * (-log_scale).exp() + self.beta
        return x, log_scale.sum().expand(y.shape[:-1])

    def extra_repr(self):
        return f"input_dim={self.event_shape[0]}, momentum={self.momentum}, epsilon={self.epsilon}"


def actnorm(input_dim: int) -> ActNorm:
    """An :class:`ActNorm` layer (data-dependent initialisation on the first ``log_prob``)."""
    return ActNorm(input_dim)


def batchnorm(input_dim: int, *, momentum: float = 0.1, epsilon: float = 1e-5) -> BatchNorm:
    """A :class:`BatchNorm` flow layer (batch statistics in train mode, running ones in eval)."""
    return BatchNorm(input_dim, momentum, epsilon)
