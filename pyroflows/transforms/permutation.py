r"""Fixed permutations of the event dimensions (volume preserving)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Bijector
from .elementwise import check_input_dim

__all__ = ["Permutation", "permute", "reverse"]


class Permutation(Bijector):
    r"""Reorder the dimensions: :math:`y_i = x_{\pi(i)}`, :math:`\log|\det J| = 0`.

    Used between coupling or autoregressive layers so that every dimension
    is eventually transformed and conditions the others.  Both directions
    are one gather; the permutation is a buffer (saved in ``state_dict``,
    moved by ``.to``), not a parameter.

    Args:
        permutation: a permutation of ``0..D-1``; ``y = x[..., permutation]``.
    """

    def __init__(self, permutation: Sequence[int] | torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        perm = torch.as_tensor(permutation, dtype=torch.long).flatten()
        D = perm.numel()
        if D == 0 or not torch.equal(perm.sort().values, torch.arange(D)):
            raise ValueError(f"permutation must be a permutation of 0..D-1, got {perm.tolist()}")
        self.event_shape = (D,)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def _call_and_ladj(self, x):
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])

    def extra_repr(self):
        return f"permutation={self.permutation.tolist()}"


def permute(input_dim: int, permutation: Sequence[int] | torch.Tensor | None = None,
            seed: int | None = None) -> Permutation:
    """A :class:`Permutation`; random (drawn with ``seed``, default 0) when ``permutation`` is None."""
    check_input_dim(input_dim)
    if permutation is None:
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        permutation = torch.randperm(input_dim, generator=g)
    perm = torch.as_tensor(permutation, dtype=torch.long)
    if perm.numel() != input_dim:
        raise ValueError(f"permutation has {perm.numel()} entries but input_dim is {input_dim}")
    return Permutation(perm)


def reverse(input_dim: int) -> Permutation:
    """The reversal :math:`y_i = x_{D-1-i}` as a :class:`Permutation`."""
    return Permutation(torch.arange(check_input_dim(input_dim) - 1, -1, -1))
