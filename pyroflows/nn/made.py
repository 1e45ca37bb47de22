r"""MADE: a masked MLP whose outputs depend autoregressively on its inputs.

The degree logic lives here once (:func:`input_degrees`, :func:`hidden_degrees`,
:func:`connectivity`); :class:`MADE` only multiplies its weights by the masks
it builds from them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import hidden_activation

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


class _ReusesMaskedProduct:
    """``weight * mask``, taken on every call with gradients (and under ``torch.compile``);
    without gradients (sampling a MAF runs ``D`` passes per layer) computed once and reused
    while the weight and the mask are the same tensors at the same version and storage (an
    optimizer step, ``load_state_dict``, ``.to()`` or assigning ``.data`` renews it)."""

    def _masked_product(self, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
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

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_masked"] = None
        return state


class MaskedLinear(_ReusesMaskedProduct, nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask on every call (the
    product is reused without gradients, see :class:`_ReusesMaskedProduct`)."""

    def __init__(self, mask: torch.Tensor, bias: bool = True):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.clone())
        self._masked = None

    def masked_weight(self) -> torch.Tensor:
        return self._masked_product(self.weight, self.mask)

    def forward(self, x):
        return F.linear(x, self.masked_weight(), self.bias)


class MADE(_ReusesMaskedProduct, nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    An MLP :math:`\mathbb{R}^D \to \mathbb{R}^{D \times P}` whose output row
    :math:`d` depends only on the inputs that precede :math:`d` in the
    ordering, so its Jacobian is strictly triangular (after permuting by the
    ordering).  With input degrees :math:`m(d) \in \{1..D\}`, hidden degrees
    :math:`m(k)`, a hidden unit sees input :math:`i` iff :math:`m(k) \ge m(i)`
    and output :math:`d` sees hidden unit :math:`k` iff :math:`m(d) > m(k)`.

    Every layer's weight and bias (and the context weight) live in one flat
    parameter, ``weights``, with one flat 0/1 ``mask`` beside it: the masking
    is a single product per call, and an optimizer that steps each parameter
    tensor separately (Pyro's ``PyroOptim`` builds one torch optimizer per
    tensor, about 0.1 ms of Python each) steps one tensor per MADE.

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
        input_bound: read each input :math:`x` as :math:`b \tanh(x / b)` with :math:`b` =
            ``input_bound`` (default ``None``: as it is).  The outputs are then bounded
            functions of the inputs, so an autoregressive affine layer is asymptotically
            linear far out: a Lipschitz triangular map, which keeps the tail index of its
            input (Jaini et al., "Tails of Lipschitz triangular flows", ICML 2020), where
            an unbounded conditioner can scale a far draw by up to :math:`e^{s_{\max}}` per
            layer and send a heavy-tailed base's draws to :math:`10^7` and beyond.
    """

    input_bound: float | None = None  # also what a MADE pickled before the option reads

    def __init__(self, input_dim: int, num_params: int, hidden: Sequence[int] = (64, 64),
                 context_dim: int | None = None, permutation=None, seed: int | None = None,
                 activation: type[nn.Module] = nn.ReLU, zero_init: bool = True,
                 input_bound: float | None = None):
        super().__init__()
        if input_bound is not None and not input_bound > 0:
            raise ValueError(f"input_bound must be positive (or None), got {input_bound}")
        self.input_bound = None if input_bound is None else float(input_bound)
        if not hidden:
            raise ValueError("MADE needs at least one hidden layer")
        self.input_dim, self.num_params = int(input_dim), int(num_params)
        self.context_dim = context_dim or 0
        deg_in = input_degrees(input_dim, permutation, seed)
        self.register_buffer("degrees", deg_in)
        lowest = 0 if self.context_dim else 1
        degs = [deg_in] + [hidden_degrees(h, input_dim, lowest) for h in hidden]
        # for solve(): each hidden layer's units sorted by degree, and how many have degree <= j
        self._units_by_degree = [
            (torch.argsort(deg, stable=True), torch.searchsorted(deg.sort().values, torch.arange(input_dim), right=True).tolist())
            for deg in degs[1:]]
        deg_out = deg_in.repeat_interleave(num_params)  # output index d * P + p has degree m(d)
        masks = [connectivity(a, b, strict=False) for a, b in itertools.pairwise(degs)]
        masks.append(connectivity(degs[-1], deg_out, strict=True))
        # layout of the flat parameter: (weight, bias) of each layer in turn, then the context weight
        self._shapes, weights, flat_mask = [], [], []
        for mask in masks:
            layer = nn.Linear(mask.shape[1], mask.shape[0])  # nn.Linear's initialisation
            self._shapes += [tuple(mask.shape), (mask.shape[0],)]
            weights += [layer.weight.detach().flatten(), layer.bias.detach()]
            flat_mask += [mask.flatten(), torch.ones(mask.shape[0])]
        if zero_init:
            weights[-2].zero_()
            weights[-1].zero_()
        if self.context_dim:
            layer = nn.Linear(self.context_dim, hidden[0], bias=False)
            self._shapes.append(tuple(layer.weight.shape))
            weights.append(layer.weight.detach().flatten())
            flat_mask.append(torch.ones(layer.weight.numel()))
        self._sizes = [math.prod(shape) for shape in self._shapes]
        self.weights = nn.Parameter(torch.cat(weights).to(torch.get_default_dtype()))
        self.register_buffer("mask", torch.cat(flat_mask).to(torch.get_default_dtype()))
        self.activation = hidden_activation(activation)
        self._masked = self._views = None

    def unpacked(self) -> list[torch.Tensor]:
        """The tensors packed in ``weights``, as views in their own shapes (writable in place
        under ``torch.no_grad``): each layer's weight ``(out, in)`` and bias ``(out,)``, input to
        output, then the context weight ``(hidden[0], context_dim)``; unmasked."""
        return self._unflatten(self.weights)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (laid out as ``weights``) as views in the packed tensors' shapes: one split
        (its backward is one concatenation), not a slice per tensor."""
        return [part.view(shape) for part, shape in zip(flat.split(self._sizes), self._shapes)]

    def layers(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """``[(masked weight, bias) of each layer, input to output], context weight or None``:
        views of ``weights * mask``."""
        flat = self._masked_product(self.weights, self.mask)
        views = self.__dict__.get("_views")
        # without gradients the product is reused, and so are its views: a batch-8 MAF sample (5
        # layers x 16 sequential passes) takes 4.6 ms with them, 6.4 ms re-splitting every pass
        if views is not None and views[0] is flat:
            return views[1]
        parts = self._unflatten(flat)
        context_weight = parts.pop() if self.context_dim else None
        layers = list(zip(parts[0::2], parts[1::2]))
        cached = self.__dict__.get("_masked")
        if cached is not None and flat is cached[3]:
            self.__dict__["_views"] = (flat, (layers, context_weight))
        return layers, context_weight

    def __getstate__(self):
        state = super().__getstate__()
        state["_views"] = None
        return state

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Parameters of shape ``(*batch, D, P)``; row ``d`` depends on ``x[..., <d]`` in the ordering."""
        ((w, b), *rest), context_weight = self.layers()
        h = F.linear(self._bounded(x), w, b)
        if context_weight is not None:
            if context is None:
                raise ValueError(f"this MADE needs a context of shape (..., {self.context_dim})")
            h = h + F.linear(context, context_weight)
        for w, b in rest:
            h = F.linear(self.activation(h), w, b)
        return h.unflatten(-1, (self.input_dim, self.num_params))

    def _bounded(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs as the first layer reads them (see ``input_bound``)."""
        b = self.input_bound
        return x if b is None else b * torch.tanh(x / b)

    @torch.no_grad()
    def solve(self, step, batch_shape, context: torch.Tensor | None = None) -> torch.Tensor:
        r"""Solve an autoregressive system one input at a time, each hidden unit computed once.

        For ``j = 1..D`` in the ordering, ``step(d, params)`` receives the input dimension ``d``
        of degree ``j`` and its parameters ``params`` (``(*batch, P)``, what :meth:`forward`
        gives in row ``d``), computed from the inputs already returned, and returns that input
        ``(*batch,)``.  Returns the solved inputs ``(*batch, D)``.

        This is what sampling a MAF (or inverting an IAF) needs: running :meth:`forward` ``D``
        times recomputes every hidden unit ``D`` times, yet a unit of degree :math:`k` only
        depends on the inputs of degree :math:`\le k`, so its value is final as soon as they are.
        Here each pass computes the units of one degree (layer by layer, from units sorted by
        degree) and the ``P`` outputs of one dimension: the whole solve costs about one dense
        pass of arithmetic instead of ``D``.  It writes into preallocated buffers, so it runs
        without autograd (the layers use it only when no gradient is needed); the activation
        must act elementwise.
        """
        D, P = self.input_dim, self.num_params
        layers, context_weight = self.layers()
        ref = layers[0][0]
        order = torch.argsort(self.degrees)  # order[j]: the input of degree j + 1
        sorts = [order] + [rows.to(ref.device) for rows, _ in self._units_by_degree]
        counts = [count for _, count in self._units_by_degree]  # count[j]: units of degree <= j
        hidden = [(w[rows][:, cols], b[rows]) for (w, b), rows, cols in zip(layers[:-1], sorts[1:], sorts[:-1])]
        w_out, b_out = layers[-1]
        w_out = w_out.view(D, P, -1)[:, :, sorts[-1]]
        b_out = b_out.view(D, P)
        if context is not None:
            if context_weight is None:
                raise ValueError("this MADE takes no context")
            batch_shape = torch.broadcast_shapes(tuple(batch_shape), context.shape[:-1])
            extra = F.linear(context, context_weight[sorts[1]]).expand(*batch_shape, -1)
        elif context_weight is not None:
            raise ValueError(f"this MADE needs a context of shape (..., {self.context_dim})")
        kw, n, dims = {"dtype": ref.dtype, "device": ref.device}, math.prod(batch_shape), order.tolist()
        u = torch.zeros(*batch_shape, D, **kw)  # inputs in degree order
        u_read = u if self.input_bound is None else torch.zeros_like(u)  # as the first layer reads them
        acts = [torch.zeros(*batch_shape, w.shape[0], **kw) for w, _ in hidden]
        for j in range(D):
            prev, n_prev = u_read, j  # inputs of degree <= j
            for layer, ((w, b), count, a) in enumerate(zip(hidden, counts, acts)):
                lo, hi = (count[j - 1] if j else 0), count[j]
                if hi > lo:
                    h = torch.addmm(b[lo:hi], prev[..., :n_prev].reshape(n, n_prev),
                                    w[lo:hi, :n_prev].t()).view(*batch_shape, hi - lo)
                    if layer == 0 and context is not None:
                        h = h + extra[..., lo:hi]
                    a[..., lo:hi] = self.activation(h)
                prev, n_prev = a, hi
            d = dims[j]
            params = torch.addmm(b_out[d], prev[..., :n_prev].reshape(n, n_prev),
                                 w_out[d, :, :n_prev].t()).view(*batch_shape, P)
            u[..., j] = step(d, params)
            if u_read is not u:
                u_read[..., j] = self._bounded(u[..., j])
        return u[..., torch.argsort(order)]

    def extra_repr(self):
        return f"input_dim={self.input_dim}, num_params={self.num_params}, context_dim={self.context_dim}"
