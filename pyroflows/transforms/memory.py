r"""Training memory that does not grow with depth: recompute activations from outputs.

Ordinary backpropagation through a flow of :math:`K` layers stores every
layer's activations, so training memory grows linearly with depth.  But every
layer of a flow is invertible: the input of each layer can be recomputed from
its output.  :func:`memory_saving_log_prob` runs the normalizing pass
(data :math:`\to` base) without recording a graph and keeps only its output
:math:`z`.  The backward pass then walks the layers from the base side: it
recomputes a layer's input from its output with the layer's *generative*
pass, reruns that one layer's normalizing pass with autograd, backpropagates
through it, frees it, and moves on.  Memory: the output, one layer's
activations and the parameter gradients, whatever the depth (the RevNet
trick of Gomez et al., 2017, applied across a whole stack of arbitrary
exactly invertible layers, not only inside one reversible block).  Compute:
about one extra pass in each direction.

This is only correct when the recomputed input equals the true one, so it is
refused for layers whose inverse is numerical (fixed-point iterations,
root finding: ``exact_inverse = False``), whose log-determinant is a
stochastic estimate (``exact_log_det = False``), or that are not pyroflows
``Bijector`` objects.  Composite layers that expose their exactly invertible
parts as ``layers`` (:class:`~pyroflows.transforms.MultiScale`) are walked part
by part.  Splines with iterative inverses (cubic, logistic mixture) are
allowed: they invert to the dtype's precision.
"""

from __future__ import annotations

import torch

from .base import Bijector

__all__ = ["check_memory_saving", "memory_saving_log_prob"]


def _parts(layer):
    sub = getattr(layer, "layers", None)
    if isinstance(layer, Bijector) and isinstance(sub, torch.nn.ModuleList):
        return [p for s in sub for p in _parts(s)]
    return [layer]


def check_memory_saving(transforms) -> list[Bijector]:
    """The flat list (generative order) of exactly invertible layers of ``transforms``,
    or a ``ValueError`` naming the first layer for which recomputation is not exact."""
    flat = [p for t in transforms for p in _parts(t)]
    for layer in flat:
        name = type(layer).__name__
        if not isinstance(layer, Bijector):
            raise ValueError(f"memory_saving needs pyroflows Bijector layers (unconditional); got {name}")
        if not getattr(layer, "exact_log_det", True):
            raise ValueError(f"memory_saving is refused for {name}: its log-determinant is a stochastic estimate")
        if not getattr(layer, "exact_inverse", True):
            raise ValueError(f"memory_saving is refused for {name}: its inverse is numerical (fixed point / root "
                             f"finding) or batch-dependent, so inputs recomputed from outputs would not be exact")
    return flat


def _params(layers):
    """The distinct trainable parameters of ``layers``, in a fixed order."""
    seen = {}
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


class _RecomputingNormalizingPass(torch.autograd.Function):
    """``(z, ladj)`` of the normalizing pass through ``layers`` (generative order), storing only ``z``."""

    @staticmethod
    def forward(ctx, x, layers, num_params, *params):
        z = x
        ladj = x.new_zeros(())
        for layer in reversed(layers):
            z, l_ = layer.inverse_and_ladj(z, cache=False)
            ladj = ladj + l_
        ctx.layers = layers
        ctx.save_for_backward(z)
        return z, ladj.expand(z.shape[:z.dim() - len(layers[0].event_shape)]).clone()

    @staticmethod
    def backward(ctx, grad_z, grad_ladj):
        (out,) = ctx.saved_tensors
        params = _params(ctx.layers)
        grads = {id(p): None for p in params}
        for layer in ctx.layers:  # from the base side: layers[0] produced z
            with torch.no_grad():
                x, _ = layer.call_and_ladj(out, cache=False)  # this layer's input, recomputed from its output
            ps = [p for p in layer.parameters() if p.requires_grad]
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                y, l_ = layer.inverse_and_ladj(x, cache=False)
                outs = [(y, grad_z), (l_, grad_ladj.expand_as(l_))]
                outs = [(o, g) for o, g in outs if o.requires_grad]  # a squeeze's log-det is a constant
                got = torch.autograd.grad([o for o, _ in outs], [x, *ps], [g for _, g in outs],
                                          allow_unused=True)
            grad_z, out = got[0], x.detach()
            for p, g in zip(ps, got[1:]):
                if g is not None:
                    grads[id(p)] = g if grads[id(p)] is None else grads[id(p)] + g
        if grad_z is None:
            grad_z = torch.zeros_like(out)
        return (grad_z, None, None, *(grads[id(p)] for p in params))


def memory_saving_log_prob(transforms, base, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p(x) = \log p_0(z) - \sum_k \log|\det J_k|` with a backward pass whose
    memory does not grow with the number of layers (see the module docstring).

    ``transforms``: the layers in the generative order; ``base``: the base
    distribution.  Gradients equal ordinary backpropagation up to rounding."""
    layers = check_memory_saving(transforms)
    params = _params(layers)
    z, ladj = _RecomputingNormalizingPass.apply(x, layers, len(params), *params)
    return base.log_prob(z) - ladj
