"""Discovery and building blocks of the exactness harness.

Every public helper in ``pyroflows.transforms.__all__`` is built here; the
checks in ``test_exactness.py`` then run on each, in float64, with no per-layer
exceptions.  The rules that decide how a helper is called are generic:

* a helper with a parameter ``shape`` is an image layer and gets the image
  shape ``(C, H, W)`` as ``shape=`` (Pyro's ``generalized_channel_permute``
  takes it as a keyword); otherwise it gets ``input_dim`` first;
* a helper named ``conditional_*`` also gets ``context_dim``;
* a helper with a ``kind`` parameter is built once per transformer kind in
  ``pyroflows.transforms.transformers.KINDS``;
* a helper without required arguments (Pyro's parameter-free ``leaky_relu()``,
  ``elu()``) is called with none; such a layer works elementwise on any shape
  (event shape ``()``), so it has no dimension to vary (tested as 1-D);
* a combinator (first parameter ``repeats``: Pyro's ``iterated``) composes two
  layers of :data:`COMBINATOR_BASE`;
* a helper that rejects a dimension with ``ValueError`` (a coupling layer
  cannot split one dimension) is not tested in that dimension.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.distributions import constraints

import pyroflows.transforms as T
from pyroflows import Flow
from pyroflows.nn import MADE
from pyroflows.transforms.transformers import KINDS

CONTEXT_DIM = 3
IMAGE_SHAPE = (4, 4, 4)
COMBINATOR_BASE = "planar"


@dataclass(frozen=True)
class Case:
    helper: str
    kind: str | None = None

    @property
    def conditional(self) -> bool:
        return self.helper.startswith("conditional_")

    @property
    def is_image(self) -> bool:
        return "shape" in inspect.signature(getattr(T, self.helper)).parameters

    def __str__(self):
        return self.helper + (f"[{self.kind}]" if self.kind else "")


def public_helpers() -> list[str]:
    """Lowercase callables of ``pyroflows.transforms.__all__`` (the helpers)."""
    return [n for n in T.__all__ if n[0].islower() and inspect.isfunction(getattr(T, n))]


def public_layer_classes() -> list[type]:
    """Concrete public layer classes of ``pyroflows.transforms.__all__``."""
    abstract = {T.Bijector, T.ConditionalBijector, T.ConditionedBijector}
    out = []
    for n in T.__all__:
        obj = getattr(T, n)
        if inspect.isclass(obj) and issubclass(obj, (T.Bijector, T.ConditionalBijector)) and obj not in abstract:
            out.append(obj)
    return out


def cases() -> list[Case]:
    out = []
    for name in public_helpers():
        params = inspect.signature(getattr(T, name)).parameters
        if "kind" in params:
            out += [Case(name, kind) for kind in KINDS]
        else:
            out.append(Case(name))
    return out


def build(case: Case, dim: int | None = None, seed: int = 0, perturb: float = 0.3):
    """Build the layer of ``case`` in float64 with randomly perturbed parameters
    (``perturb * N(0, 1)``, divided by sqrt(fan_in) for the weights of linear layers).

    Returns ``None`` when the helper rejects that dimension with ``ValueError``.
    """
    torch.manual_seed(seed)
    fn = getattr(T, case.helper)
    kw = {}
    if case.kind is not None:
        kw["kind"] = case.kind
    if case.conditional:
        kw["context_dim"] = CONTEXT_DIM
    first = dim if dim is not None else 4
    if case.is_image:
        kw["shape"] = IMAGE_SHAPE  # image helpers take the image shape (C, H, W)
    params = inspect.signature(fn).parameters
    required = [p for p in params.values() if p.default is p.empty and p.name not in kw
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        if not required:
            layer = fn(**kw)
        elif required[0].name == "repeats":
            layer = fn(2, getattr(T, COMBINATOR_BASE), first, **kw)
        else:
            layer = fn(first, **kw)
    except ValueError:
        return None
    layer = layer.double()
    # noise on each parameter's natural scale: a network weight's is 1/sqrt(fan_in)
    fan_in = {id(m.weight): m.weight[0].numel() for m in layer.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))}
    # a MADE packs its layers' weights and biases into one tensor: each is perturbed on its own scale
    packed = {id(m.weights): m.unpacked() for m in layer.modules() if isinstance(m, MADE)}
    with torch.no_grad():
        for p in layer.parameters():
            for q in packed.get(id(p), [p]):
                scale = q.shape[1] if id(p) in packed and q.dim() == 2 else fan_in.get(id(q), 1)
                q.add_(perturb / scale ** 0.5 * torch.randn_like(q))
    layer.eval()  # BatchNorm-style layers are exact bijections in eval mode
    return layer


def perturb_parameters(module, scale: float = 0.3, seed: int = 0):
    """Add ``scale * N(0, 1)`` noise (a seeded generator, not the global RNG) to every
    parameter of ``module``; returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def event_shape_of(layer, case: Case):
    return torch.Size(layer.event_shape)


def sample_domain(constraint, shape, generator=None) -> torch.Tensor:
    """Points inside ``constraint`` (the reals or the unit interval), float64."""
    base = constraint
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if isinstance(base, constraints._Interval):
        lo, hi = float(base.lower_bound), float(base.upper_bound)
        return lo + (hi - lo) * (0.02 + 0.96 * torch.rand(shape, dtype=torch.float64, generator=generator))
    return 1.5 * torch.randn(shape, dtype=torch.float64, generator=generator)


def bind(layer, case: Case, context: torch.Tensor | None):
    """The Pyro ``Transform`` to test: the layer itself or the layer bound to a context."""
    if case.conditional:
        return layer.condition(context)
    return layer


def make_context(batch_shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch_shape, CONTEXT_DIM, dtype=torch.float64, generator=g)


def flow_of(layer, case: Case):
    return Flow([layer]).double()
