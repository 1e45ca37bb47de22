r"""Permutations of the event dimensions (volume preserving), stored so that both
``state_dict`` and Pyro's param store restore them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Bijector
from .elementwise import check_input_dim

__all__ = ["Permutation", "permute", "reverse"]


class StoredPermutation(nn.Module):
    r"""A permutation of ``0..D-1`` held as the ranks of a real vector.

    ``pyro.module`` registers (and ``pyro.get_param_store().save/load``
    restores) parameters only, never buffers, so the permutation is stored as a
    parameter ``key`` with ``indices = argsort(key)``.  The key never receives a
    gradient (``argsort`` is not differentiable), so optimizers leave it alone
    (those that rescale every parameter keep its order).  ``indices`` and
    ``inverse_indices`` are recomputed only when the key changes.
    """

    def __init__(self, indices: Sequence[int] | torch.Tensor):
        super().__init__()
        perm = torch.as_tensor(indices, dtype=torch.long).flatten()
        D = perm.numel()
        if D == 0 or not torch.equal(perm.sort().values, torch.arange(D)):
            raise ValueError(f"permutation must be a permutation of 0..D-1, got {perm.tolist()}")
        self.key = nn.Parameter(torch.argsort(perm).to(torch.get_default_dtype()))
        self._derived = None

    def _current(self):
        key = self.key
        state = (key, key._version, key.data_ptr(), key.device)
        derived = self._derived
        if derived is None or derived[0][0] is not key or derived[0][1:] != state[1:]:
            with torch.no_grad():
                indices = torch.argsort(key)
                derived = self._derived = (state, indices, torch.argsort(indices))
        return derived

    @property
    def indices(self) -> torch.Tensor:
        """``perm`` with ``y = x[..., perm]``."""
        return self._current()[1]

    @property
    def inverse_indices(self) -> torch.Tensor:
        return self._current()[2]

    def __getstate__(self):
        state = super().__getstate__()
        state["_derived"] = None
        return state


def random_permutation(dim: int) -> torch.Tensor:
    """A permutation of ``0..dim-1`` drawn from torch's global generator (``pyro.set_rng_seed``
    and ``torch.manual_seed`` make it reproducible)."""
    return torch.randperm(dim)


class Permutation(Bijector):
    r"""Reorder the dimensions: :math:`y_i = x_{\pi(i)}`, :math:`\log|\det J| = 0`.

    Used between coupling or autoregressive layers so that every dimension
    is eventually transformed and conditions the others.  Both directions
    are one gather.  The permutation is a :class:`StoredPermutation` (saved by
    ``state_dict`` and by Pyro's param store, moved by ``.to``, never trained).

    Args:
        permutation: a permutation of ``0..D-1``; ``y = x[..., permutation]``.
    """

    def __init__(self, permutation: Sequence[int] | torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.stored = StoredPermutation(permutation)
        self.event_shape = (self.stored.key.numel(),)

    @property
    def permutation(self) -> torch.Tensor:
        return self.stored.indices

    def _call_and_ladj(self, x):
        return x[..., self.stored.indices], x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        return y[..., self.stored.inverse_indices], y.new_zeros(y.shape[:-1])

    def extra_repr(self):
        return f"permutation={self.permutation.tolist()}"


def permute(input_dim: int, permutation: Sequence[int] | torch.Tensor | None = None, dim: int = -1) -> Permutation:
    """Pyro's ``permute``: a :class:`Permutation`, a fresh random one per call (drawn from
    torch's generator, as Pyro does) when ``permutation`` is None.  ``dim`` is the event
    dimension to permute (only ``-1``: vectors)."""
    check_input_dim(input_dim)
    if dim != -1:
        raise ValueError(f"only dim=-1 (the last, vector event dimension) is supported, got dim={dim!r}")
    if permutation is None:
        permutation = random_permutation(input_dim)
    perm = torch.as_tensor(permutation, dtype=torch.long)
    if perm.numel() != input_dim:
        raise ValueError(f"permutation has {perm.numel()} entries but input_dim is {input_dim}")
    return Permutation(perm)


def reverse(input_dim: int) -> Permutation:
    """The reversal :math:`y_i = x_{D-1-i}` as a :class:`Permutation`."""
    return Permutation(torch.arange(check_input_dim(input_dim) - 1, -1, -1))
