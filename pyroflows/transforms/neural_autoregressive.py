r"""Neural autoregressive flows (NAF): the IAF structure with the deep sigmoidal transformer.

Huang, Krueger, Lacoste & Courville, "Neural Autoregressive Flows", ICML 2018.
A NAF layer is no new structure: it is :class:`InverseAutoregressive` (a
:class:`~pyroflows.nn.MADE` conditioner, parameters read from the base side)
handed the :class:`~pyroflows.transforms.transformers.DeepSigmoid`
transformer,

.. math::

    x_d = \sigma^{-1}\Bigl(\sum_k w_{dk}\,\sigma(a_{dk} z_d + b_{dk})\Bigr),\qquad
    (a_d, w_d, b_d) = \mathrm{MADE}(z_{<d}),

as in Pyro, whose NAF is "of the IAF flavour": the forward (sampling)
direction is one MADE pass; ``log_prob`` of the layer's own samples reuses it
through the cache.  Pyro gives no inverse; here the inverse (scoring new
data) is :math:`D` sequential MADE passes, each solving the monotone scalar
equations by the transformer's safeguarded root-finder.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..nn import MADE
from .autoregressive import ConditionalInverseAutoregressive, InverseAutoregressive
from .elementwise import check_context_dim, check_input_dim
from .transformers import DeepSigmoid

__all__ = [
    "ConditionalNeuralAutoregressive",
    "NeuralAutoregressive",
    "conditional_neural_autoregressive",
    "neural_autoregressive",
]

_ARGS = r"""
    Args:
        autoregressive_nn: a :class:`~pyroflows.nn.MADE` with ``num_params = 3 *
            hidden_units`` (for Pyro's ``AutoRegressiveNN(..., param_dims=[16] * 3)``).
        hidden_units: :math:`K`, the width of the deep sigmoidal map (eq. 8 of the paper).
        activation: ``"sigmoid"`` (the deep sigmoidal flow), ``"tanh"``, ``"ELU"``
            or ``"LeakyReLU"`` (Pyro's choices; see
            :class:`~pyroflows.transforms.transformers.DeepSigmoid`).
"""


class NeuralAutoregressive(InverseAutoregressive):
    r"""Neural autoregressive flow layer (NAF, Huang et al., 2018), IAF direction.

    .. math::

        x_d = \sigma^{-1}\Bigl(\sum_{k=1}^K w_{dk}\,\sigma(a_{dk} z_d + b_{dk})\Bigr),\qquad
        \log|\det J| = \sum_d \log \frac{\partial x_d}{\partial z_d},

    with :math:`(a_d, w_d, b_d)` a MADE of :math:`z_{<d}`.  Forward
    (sampling) one MADE pass; inverse :math:`D` passes with a root-finder.
    """ + _ARGS

    def __init__(self, autoregressive_nn: MADE, hidden_units: int = 16, activation: str = "sigmoid",
                 cache_size: int = 1):
        super().__init__(DeepSigmoid(hidden_units, activation), autoregressive_nn, cache_size=cache_size)


class ConditionalNeuralAutoregressive(ConditionalInverseAutoregressive):
    r"""Conditional NAF layer: :math:`(a_d, w_d, b_d)` is a MADE of :math:`(z_{<d}, c)`.

    Forward (sampling) one pass, inverse :math:`D` passes with a root-finder.
    """ + _ARGS

    def __init__(self, autoregressive_nn: MADE, hidden_units: int = 16, activation: str = "sigmoid"):
        super().__init__(DeepSigmoid(hidden_units, activation), autoregressive_nn)


def _made(input_dim, hidden_dims, width, context_dim=None):
    hidden_dims = [3 * input_dim + 1] if hidden_dims is None else list(hidden_dims)
    # a random (not zero) output layer, as in Pyro: from the identity, whose K components are
    # equal, gradient steps keep them equal (the mixture would never use its width)
    return MADE(input_dim, 3 * width, hidden_dims, context_dim, zero_init=False)


def neural_autoregressive(input_dim: int, hidden_dims: Sequence[int] | None = None, activation: str = "sigmoid",
                          width: int = 16) -> NeuralAutoregressive:
    """A :class:`NeuralAutoregressive` layer (Pyro's signature); ``hidden_dims`` of the MADE
    default to ``[3 * input_dim + 1]`` as in Pyro, ``width`` is the deep sigmoidal map's."""
    check_input_dim(input_dim)
    return NeuralAutoregressive(_made(input_dim, hidden_dims, width), hidden_units=width, activation=activation)


def conditional_neural_autoregressive(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                                      activation: str = "sigmoid", width: int = 16) -> ConditionalNeuralAutoregressive:
    """A :class:`ConditionalNeuralAutoregressive` layer (Pyro's signature)."""
    check_input_dim(input_dim)
    check_context_dim(context_dim)
    return ConditionalNeuralAutoregressive(_made(input_dim, hidden_dims, width, context_dim),
                                           hidden_units=width, activation=activation)
