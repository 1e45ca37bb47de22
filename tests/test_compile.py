"""Every coupling / autoregressive / permutation layer class compiles with
``torch.compile(fullgraph=True)`` (no graph breaks) and matches eager mode.

Compilation is slow on small machines, so each class is compiled once or twice
with tiny networks; between them every class and both kinds of pass (one-pass
and sequential) are covered.  One case goes through the full inductor
backend (C++ code generation); the others use ``aot_eager``, which captures
the same full graph (Dynamo, no graph breaks allowed) and traces it with AOT
autograd, without the slow C++ build.
"""

from __future__ import annotations

import pytest
import torch

import pyroflows.transforms as T

torch._dynamo.config.cache_size_limit = 64


def _perturbed(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


CASES = {
    # name: (builder, directions to compile, context_dim)
    "affine_coupling": (lambda: T.affine_coupling(4, hidden_dims=(8,)), ("forward", "inverse"), None),
    "conditional_spline_coupling_any_mask": (
        lambda: T.conditional_spline_coupling(4, 2, kind="piecewise_linear", hidden_dims=(8,),
                                              mask=[True, False, True, False]), ("inverse",), 2),
    "maf": (lambda: T.masked_autoregressive(3, hidden_dims=(8,)), ("forward", "inverse"), None),
    "conditional_iaf": (lambda: T.conditional_inverse_autoregressive(3, 2, kind="piecewise_linear", hidden_dims=(8,)),
                        ("inverse",), 2),
    "iaf": (lambda: T.inverse_autoregressive(3, hidden_dims=(8,)), ("forward",), None),
    "conditional_maf": (lambda: T.conditional_masked_autoregressive(3, 2, hidden_dims=(8,)), ("forward",), 2),
    "permute": (lambda: T.permute(4, permutation=[2, 0, 3, 1]), ("inverse",), None),
}


INDUCTOR_CASE = "affine_coupling"
# the layer's math, without the cache around it
HOOKS = {"forward": "_call_and_ladj", "inverse": "_inverse_and_ladj"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiles_fullgraph_and_matches_eager(name):
    build, directions, context_dim = CASES[name]
    layer = _perturbed(build())
    x = torch.randn(5, layer.event_shape[0])
    args = (x,) if context_dim is None else (x, torch.randn(5, context_dim))
    for direction in directions:
        eager = getattr(layer, HOOKS[direction])
        backend = "inductor" if name == INDUCTOR_CASE else "aot_eager"
        compiled = torch.compile(eager, fullgraph=True, backend=backend)
        y, ladj = compiled(*args)
        y0, ladj0 = eager(*args)
        assert torch.allclose(y, y0, atol=1e-5) and torch.allclose(ladj, ladj0, atol=1e-5)
