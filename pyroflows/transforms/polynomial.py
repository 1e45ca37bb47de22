r"""Sum-of-squares polynomial flows (SOS): the IAF structure with a polynomial transformer.

Jaini, Selby & Yu, "Sum-of-Squares Polynomial Flow", ICML 2019.  As in Pyro,
an autoregressive layer of the IAF flavour: a :class:`~pyroflows.nn.MADE`
reads the coefficients of dimension :math:`d` from :math:`z_{<d}` and

.. math::

    x_d = c_d + \epsilon z_d + \int_0^{z_d} \sum_{k=1}^K \Bigl(\sum_{r=0}^R a_{dkr} u^r\Bigr)^2 du

(:class:`~pyroflows.transforms.transformers.SumOfSquaresPolynomial`, whose
integral is analytic).  The forward (sampling) direction is one MADE pass;
Pyro gives no inverse, here it is :math:`D` sequential MADE passes, each
solving the monotone polynomial equations by the safeguarded root-finder.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..nn import MADE
from .autoregressive import InverseAutoregressive
from .elementwise import check_input_dim
from .transformers import SumOfSquaresPolynomial

__all__ = ["Polynomial", "polynomial"]


class Polynomial(InverseAutoregressive):
    r"""Sum-of-squares polynomial flow layer (Jaini et al., 2019), IAF direction.

    .. math::

        x_d = c_d + \epsilon z_d + \sum_k \sum_{r,s} \frac{a_{dkr} a_{dks}}{r+s+1} z_d^{r+s+1},\qquad
        \log|\det J| = \sum_d \log\Bigl(\epsilon + \sum_k p_{dk}(z_d)^2\Bigr),

    with :math:`p_{dk}(u) = \sum_r a_{dkr} u^r` and :math:`(a_d, c_d)` a MADE
    of :math:`z_{<d}`.  Forward (sampling) one MADE pass; inverse :math:`D`
    passes with a root-finder.  The MADE starts at zero, so the layer starts
    at the transformer's identity.

    Args:
        autoregressive_nn: a :class:`~pyroflows.nn.MADE` with ``num_params =
            count_sum * (count_degree + 1) + 1`` (the last one is :math:`c_d`,
            a free parameter per dimension in Pyro).
        input_dim: :math:`D` (must match the MADE's).
        count_degree: :math:`R`, the degree of each squared polynomial (the
            map has degree :math:`2R + 1`).
        count_sum: :math:`K`, the number of squares summed.
    """

    def __init__(self, autoregressive_nn: MADE, input_dim: int, count_degree: int, count_sum: int,
                 cache_size: int = 1):
        if autoregressive_nn.input_dim != input_dim:
            raise ValueError(f"input_dim={input_dim} but the MADE has input_dim={autoregressive_nn.input_dim}")
        super().__init__(SumOfSquaresPolynomial(count_degree, count_sum), autoregressive_nn, cache_size=cache_size)
        self.input_dim, self.count_degree, self.count_sum = input_dim, count_degree, count_sum


def polynomial(input_dim: int, hidden_dims: Sequence[int] | None = None, *, count_degree: int = 4,
               count_sum: int = 3) -> Polynomial:
    """A :class:`Polynomial` layer (Pyro's signature; Pyro's fixed ``count_degree=4``,
    ``count_sum=3`` are keyword-only options here).  ``hidden_dims`` of the MADE default to
    ``[10 * input_dim]`` as in Pyro."""
    check_input_dim(input_dim)
    hidden_dims = [10 * input_dim] if hidden_dims is None else list(hidden_dims)
    transformer = SumOfSquaresPolynomial(count_degree, count_sum)
    made = MADE(input_dim, transformer.num_params, hidden_dims)
    return Polynomial(made, input_dim, count_degree, count_sum)
