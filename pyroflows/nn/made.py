r"""MADE: a masked MLP whose outputs depend autoregressively on its inputs.

The degree logic lives here once (:func:`input_degrees`, :func:`hidden_degrees`,
:func:`connectivity`); :class:`MADE` only multiplies its weights by the masks
it builds from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MADE", "MaskedLinear", "connectivity", "hidden_degrees", "input_degrees"]


def input_degrees(input_dim: int, permutation: str | Sequence[int] | torch.Tensor | None = None,
                  seed: int | None = None) -> torch.Tensor:
    """Degrees ``1..D`` of the inputs: the position of each dimension in the ordering.

    ``permutation`` is ``None``/``"natural"`` (dimension ``d`` has degree ``d + 1``),
    ``"reverse"``, ``"random"`` (a permutation drawn with ``seed``, or from
    torch's global generator when ``seed`` is None), or an explicit sequence
    giving the degree (1-based position) of each dimension, i.e. a permutation
    of ``1..D``.
    """
    order = permutation
    if order is None or (isinstance(order, str) and order == "natural"):
        return torch.arange(1, input_dim + 1)
    if isinstance(order, str):
        if order == "reverse":
            return torch.arange(input_dim, 0, -1)
        if order == "random":
            g = None if seed is None else torch.Generator().manual_seed(int(seed))
            return torch.randperm(input_dim, generator=g) + 1
        raise ValueError(f"permutation must be 'natural', 'reverse', 'random' or a permutation of 1..D, got {order!r}")
    degrees = torch.as_tensor(order, dtype=torch.long).flatten()
    if degrees.numel() != input_dim or not torch.equal(degrees.sort().values, torch.arange(1, input_dim + 1)):
        raise ValueError(f"permutation must be a permutation of 1..{input_dim}, got {degrees.tolist()}")
    return degrees


def hidden_degrees(width: int, input_dim: int, lowest: int = 1) -> torch.Tensor:
    """Degrees of ``width`` hidden units, cycling evenly through ``lowest..D-1``.

    A unit of degree ``k`` sees the inputs of degree ``<= k``; units of degree 0
    see no input (only the bias and the context), which lets the first output
    depend on the context.  Degree ``D`` would be useless (no output may see
    it), so the cycle stops at ``D - 1``.
    """
    top = max(input_dim - 1, lowest)
    return torch.arange(width) % (top - lowest + 1) + lowest


def connectivity(in_degrees: torch.Tensor, out_degrees: torch.Tensor, strict: bool) -> torch.Tensor:
    """Mask ``(out, in)``: ``out_degree > in_degree`` if ``strict`` else ``>=``."""
    if strict:
        return (out_degrees[:, None] > in_degrees[None, :]).to(torch.get_default_dtype())
    return (out_degrees[:, None] >= in_degrees[None, :]).to(torch.get_default_dtype())


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask on every call.

    Without gradients (sampling a MAF runs ``D`` passes per layer) the masked
    weight is computed once and reused while the weight and the mask are the
    same tensors at the same version and storage (an optimizer step,
    ``load_state_dict``, ``.to()`` or assigning ``.data`` renews it); with gradients, and under ``torch.compile``, the
    product is taken on every call.
    """

    def __init__(self, mask: torch.Tensor, bias: bool = True):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.clone())
        self._masked = None

    def masked_weight(self) -> torch.Tensor:
        w, m = self.weight, self.mask
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and w.requires_grad):
            return w * m
        c = self.__dict__.get("_masked")
        key = (w._version, m._version, w.data_ptr())
        if c is not None and c[0] is w and c[1] is m and c[2] == key:
            return c[3]
        with torch.no_grad():
            masked = w * m
        if not torch.is_inference_mode_enabled():  # an inference tensor cannot be reused outside it
            self.__dict__["_masked"] = (w, m, key, masked)
        return masked

    def forward(self, x):
        return F.linear(x, self.masked_weight(), self.bias)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_masked"] = None
        return state


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    An MLP :math:`\mathbb{R}^D \to \mathbb{R}^{D \times P}` whose output row
    :math:`d` depends only on the inputs that precede :math:`d` in the
    ordering, so its Jacobian is strictly triangular (after permuting by the
    ordering).  With input degrees :math:`m(d) \in \{1..D\}`, hidden degrees
    :math:`m(k)`, a hidden unit sees input :math:`i` iff :math:`m(k) \ge m(i)`
    and output :math:`d` sees hidden unit :math:`k` iff :math:`m(d) > m(k)`.

    Args:
        input_dim: :math:`D`.
        num_params: :math:`P`, outputs per dimension (the transformer's
            ``num_params``); the output has shape ``(..., D, P)``.
        hidden: hidden widths (default ``(64, 64)``).
        context_dim: width of an optional context input; it is not masked
            and feeds every hidden unit of the first layer (so even the first
            dimension's outputs depend on it); ``forward(x, context)``
            broadcasts the batch shapes of ``x`` and ``context``.
        permutation: ordering of the inputs, see :func:`input_degrees`.
        seed: seed of a ``"random"`` permutation.
        activation: ``nn.Module`` class (default ``nn.ReLU``).
        zero_init: start the output layer at zero.
    """

    def __init__(self, input_dim: int, num_params: int, hidden: Sequence[int] = (64, 64),
                 context_dim: int | None = None, permutation=None, seed: int | None = None,
                 activation: type[nn.Module] = nn.ReLU, zero_init: bool = True):
        super().__init__()
        if not hidden:
            raise ValueError("MADE needs at least one hidden layer")
        self.input_dim, self.num_params = int(input_dim), int(num_params)
        self.context_dim = context_dim or 0
        deg_in = input_degrees(input_dim, permutation, seed)
        self.register_buffer("degrees", deg_in)
        lowest = 0 if self.context_dim else 1
        degs = [deg_in] + [hidden_degrees(h, input_dim, lowest) for h in hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(degs):
            layers.append(MaskedLinear(connectivity(a, b, strict=False)))
        self.input_layer = layers[0]
        self.hidden_layers = nn.ModuleList(layers[1:])
        self.activation = activation()
        deg_out = deg_in.repeat_interleave(num_params)  # output index d * P + p has degree m(d)
        self.output_layer = MaskedLinear(connectivity(degs[-1], deg_out, strict=True))
        if zero_init:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)
        self.context_layer = nn.Linear(self.context_dim, hidden[0], bias=False) if self.context_dim else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Parameters of shape ``(*batch, D, P)``; row ``d`` depends on ``x[..., <d]`` in the ordering."""
        h = self.input_layer(x)
        if self.context_layer is not None:
            if context is None:
                raise ValueError(f"this MADE needs a context of shape (..., {self.context_dim})")
            h = h + self.context_layer(context)
        h = self.activation(h)
        for layer in self.hidden_layers:
            h = self.activation(layer(h))
        out = self.output_layer(h)
        return out.unflatten(-1, (self.input_dim, self.num_params))

    def extra_repr(self):
        return f"input_dim={self.input_dim}, num_params={self.num_params}, context_dim={self.context_dim}"
