"""The one base class through which every pyroflows layer writes its math.

A layer implements two hooks and nothing else::

    _call_and_ladj(x)     -> (y, log|det dy/dx|)   # the generative direction, x = f(z)
    _inverse_and_ladj(y)  -> (x, log|det dy/dx|)   # the normalizing direction

and everything else uses the two public, cache-aware passes built on them,
``call_and_ladj(x)`` and ``inverse_and_ladj(y)`` (zuko's ``call_and_ladj``).
``layer(x)`` and ``layer.forward(x)`` both return ``y`` alone, as an
``nn.Module`` reader expects.

Both return the log-determinant of the *forward* Jacobian, evaluated at the
point ``x``, already summed over the event dimensions, so its shape is the
batch shape.  Pyro's ``_call``, ``_inverse`` and ``log_abs_det_jacobian`` and
the caching are derived from these two methods here and nowhere else.

Caching rules (the two things Pyro's built-in flows get wrong):

1. The log-determinant computed during a pass is kept with the pair
   ``(x, y)``; ``log_abs_det_jacobian(x, y)`` on that very pair returns it
   instead of running the network again.  So ``log_prob`` of the flow's own
   ``rsample`` costs no extra conditioner call (for IAF it avoids the
   sequential inverse altogether).
2. A cached pass is only reused while it is still valid.  Its key is the
   state of every parameter and buffer the layer reads: each tensor's
   identity (a replaced ``Parameter``, as ``pyro.module(...,
   update_module_params=True)`` or ``torch.func.functional_call`` do), its
   version counter (in-place updates: optimizer steps, ``load_state_dict``)
   and its storage address (``p.data = ...``; the old storage is pinned by the
   entry so its address cannot be reused), plus the train/eval mode.  A pass
   cached without gradients is not reused when gradients are wanted, and a
   pass whose graph has been consumed by ``backward`` is dropped.  A cached entry is also dropped once its log-determinant has been
   handed out, so scoring the same data tensor twice runs twice.  Users never
   need ``clear_cache()``.
"""

from __future__ import annotations

import weakref

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import constraints

__all__ = ["Bijector", "ConditionalBijector", "ConditionedBijector"]


class _Pass:
    """One cached pass: the pair (x, y), its log-det and a validity key
    ``(grad_enabled, training, tensors, numbers)``; ``pinned`` keeps the
    storages the key's addresses refer to alive."""

    __slots__ = ("__weakref__", "key", "ladj", "pinned", "valid", "x", "y")

    def __init__(self, x, y, ladj, key, pinned):
        self.x, self.y, self.ladj, self.key, self.pinned, self.valid = x, y, ladj, key, pinned, True


def state_of(tensors):
    """``(tensors, numbers)``: the identity, version counter and storage address of each tensor,
    the fingerprint a cached pass is checked against."""
    nums = []
    for t in tensors:
        nums += (t._version, t.data_ptr())
    return tensors, tuple(nums)


def same_state(a, b) -> bool:
    """Whether two :func:`state_of` fingerprints agree (tensors compared by identity)."""
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0]))


def _invalidate_on_backward(entry: _Pass, tensors) -> None:
    """Drop ``entry`` as soon as a backward pass runs through any of ``tensors``.

    After ``backward`` (without ``retain_graph``) the graph behind a cached
    tensor is freed, so handing it out again would make the next ``backward``
    fail.  A weak reference keeps the hook from extending the entry's life.
    The hook sits on each tensor's autograd node, once per distinct node (a
    node pre-hook costs about half a tensor hook in an SVI step); a leaf has
    no node, so it gets a tensor hook.
    """
    ref = weakref.ref(entry)

    def hook(*_):
        e = ref()
        if e is not None:
            e.valid = False

    nodes = []
    for t in tensors:
        if not (isinstance(t, torch.Tensor) and t.requires_grad):
            continue
        node = t.grad_fn
        if node is None:
            t.register_hook(hook)
        elif not any(node is n for n in nodes):
            nodes.append(node)
            node.register_prehook(hook)


class CachedPasses:
    """Caching logic shared by plain and conditioned bijectors.

    Subclasses provide ``_forward_pass(x)``, ``_inverse_pass(y)``,
    ``_cache_dependencies()`` (the tensors the pass reads, looked up afresh) and
    ``_training_flag()``.
    """

    _pass: _Pass | None = None

    def _lookup(self, *, x=None, y=None):
        entry = self._pass
        if entry is None or not entry.valid or self._cache_size == 0:
            return None
        if x is not None and entry.x is not x:
            return None
        if y is not None and entry.y is not y:
            return None
        grad_wanted, training, state = entry.key
        if torch.is_grad_enabled() and not grad_wanted:
            return None
        if training != self._training_flag() or not same_state(state, state_of(self._cache_dependencies())):
            return None
        return entry

    def _hand_out(self, *, x=None, y=None):
        """The valid cached pass on this ``x`` / ``y``, marked as used (its log-det is handed
        out once; a second request recomputes), or ``None``."""
        entry = self._lookup(x=x, y=y)
        if entry is not None:
            entry.valid = False
        return entry

    def _store(self, x, y, ladj):
        if self._cache_size == 0:
            return
        tensors = self._cache_dependencies()
        pinned = tuple(t.detach() for t in tensors)
        entry = _Pass(x, y, ladj, (torch.is_grad_enabled(), self._training_flag(), state_of(tensors)), pinned)
        _invalidate_on_backward(entry, (x, y, ladj))
        self._pass = entry

    # Pyro / torch.distributions interface -----------------------------------
    def __call__(self, x):
        entry = self._lookup(x=x)
        if entry is not None:
            return entry.y
        y, ladj = self._forward_pass(x)
        self._store(x, y, ladj)
        return y

    def _inv_call(self, y):
        entry = self._lookup(y=y)
        if entry is not None:
            return entry.x
        x, ladj = self._inverse_pass(y)
        self._store(x, y, ladj)
        return x

    def call_and_ladj(self, x, *, cache: bool = True):
        """``(y, log|det dy/dx|)`` for ``y = f(x)``: the one public forward pass.

        Reuses (and hands out once) a cached pass on this very ``x``; a new pass
        is cached so that ``log_abs_det_jacobian`` or ``inverse_and_ladj`` of its
        output costs nothing.  ``cache=False`` always recomputes and stores
        nothing (e.g. under parameters swapped in by ``torch.func.functional_call``)."""
        if not cache:
            return self._forward_pass(x)
        entry = self._hand_out(x=x)
        if entry is not None:
            return entry.y, entry.ladj
        y, ladj = self._forward_pass(x)
        self._store(x, y, ladj)
        return y, ladj

    def inverse_and_ladj(self, y, *, cache: bool = True):
        """``(x, log|det dy/dx|)`` for ``x = f^{-1}(y)``, the log-determinant of the
        *forward* map at that ``x``: the one public inverse pass.  A cached pass
        that produced this very ``y`` is reused (handed out once), so the flow's
        own samples are scored for free; a new inverse pass is not cached (its
        log-determinant has been handed out already).  ``cache=False`` always
        recomputes."""
        if not cache:
            return self._inverse_pass(y)
        entry = self._hand_out(y=y)
        if entry is not None:
            return entry.x, entry.ladj
        return self._inverse_pass(y)

    def _call(self, x):
        return self._forward_pass(x)[0]

    def _inverse(self, y):
        return self._inverse_pass(y)[0]

    def log_abs_det_jacobian(self, x, y):
        entry = self._hand_out(x=x, y=y)
        if entry is not None:
            return entry.ladj
        return self._forward_pass(x)[1]

    def __getstate__(self):
        # a cached pass holds tensors of a live autograd graph: never copy or pickle it
        state = super().__getstate__()
        state.pop("_pass", None)
        state.pop("_deps", None)
        return state

    def clear_cache(self):
        """Forget the cached pass (never needed for correctness)."""
        self._pass = None


class TensorList:
    """The parameters and buffers of a layer, as slots ``(dict, name)`` listed once
    (walking the module tree on every pass is measurable) until an attribute of
    the layer is reassigned; the tensors themselves are read from their slots
    on every pass, so a ``Parameter`` replaced anywhere in the tree (``.to()``,
    ``pyro.module(..., update_module_params=True)``, ``functional_call``) is seen."""

    def _tensor_slots(self):
        slots = self.__dict__.get("_deps")
        if slots is None:
            slots = self.__dict__["_deps"] = tuple(
                (d, name) for m in self.modules() for d in (m._parameters, m._buffers) for name in d)
        return slots

    def _cache_dependencies(self):
        return tuple(t for d, name in self._tensor_slots() if (t := d.get(name)) is not None)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_deps", None)
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            self.__dict__.pop("_deps", None)
        super().__setattr__(name, value)


class Bijector(CachedPasses, TensorList, TransformModule):
    r"""Base class of every pyroflows layer: a Pyro ``TransformModule``.

    Subclasses implement

    * ``_call_and_ladj(x) -> (y, ladj)`` with :math:`y = f(x)` and
      :math:`\mathrm{ladj} = \log|\det \partial f/\partial x|` summed over the
      event dimensions;
    * ``_inverse_and_ladj(y) -> (x, ladj)`` with :math:`x = f^{-1}(y)` and the
      same forward log-determinant evaluated at that ``x``.

    Callers use the cache-aware public passes :meth:`call_and_ladj` and
    :meth:`inverse_and_ladj`; ``layer(x)`` and ``layer.forward(x)`` return ``y``.

    ``domain``/``codomain`` default to ``real_vector`` (event_dim 1); image
    layers override them.  ``bijective = True``.  ``sign`` is only defined for
    elementwise monotone layers (which set it to +1).

    Layers whose ``log_abs_det_jacobian`` is a stochastic, unbiased estimate
    rather than the exact value set ``exact_log_det = False``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    exact_log_det = True

    def __init__(self, cache_size: int = 1):
        super().__init__(cache_size=cache_size)

    def _call_and_ladj(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse_and_ladj(self, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        """``y = f(x)``, the same as ``layer(x)`` (``nn.Module`` convention)."""
        return self(x)

    def _forward_pass(self, x):
        return self._call_and_ladj(x)

    def _inverse_pass(self, y):
        return self._inverse_and_ladj(y)

    def _training_flag(self):
        return self.training

    def with_cache(self, cache_size=1):
        self._cache_size = cache_size
        return self

    def __hash__(self):
        return object.__hash__(self)

    # Transform.__repr__ comes first in the MRO; nn.Module's shows the submodules and extra_repr
    __repr__ = torch.nn.Module.__repr__


class ConditionalBijector(TensorList, ConditionalTransformModule):
    r"""Base class of every conditional pyroflows layer.

    Subclasses implement ``_call_and_ladj(x, context)`` and
    ``_inverse_and_ladj(y, context)`` with the same contract as :class:`Bijector`; ``context`` has shape
    ``(..., context_dim)`` and broadcasts against the batch shape of ``x``.
    ``condition(context)`` returns a :class:`ConditionedBijector`, a plain
    Pyro ``Transform`` bound to that context.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    exact_log_det = True
    context_dim: int

    def _call_and_ladj(self, x, context):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse_and_ladj(self, y, context):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x, context):
        """``y = f(x; context)``, the same as ``layer.condition(context)(x)``."""
        return self.condition(context)(x)

    def call_and_ladj(self, x, context, *, cache: bool = True):
        """``(y, log|det dy/dx|)`` given ``context`` (see :meth:`Bijector.call_and_ladj`)."""
        return self.condition(context).call_and_ladj(x, cache=cache)

    def inverse_and_ladj(self, y, context, *, cache: bool = True):
        """``(x, log|det dy/dx|)`` given ``context`` (see :meth:`Bijector.inverse_and_ladj`)."""
        return self.condition(context).inverse_and_ladj(y, cache=cache)

    __repr__ = torch.nn.Module.__repr__

    def condition(self, context):
        context_dim = getattr(self, "context_dim", None)
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context_dim is not None and (context.dim() == 0 or context.shape[-1] != context_dim):
            raise ValueError(
                f"{type(self).__name__} expects a context of shape (..., {context_dim}), "
                f"got {tuple(context.shape)}"
            )
        return ConditionedBijector(self, context)

    def __hash__(self):
        return object.__hash__(self)


class ConditionedBijector(CachedPasses, torch.distributions.Transform):
    """A :class:`ConditionalBijector` bound to one context tensor."""

    bijective = True

    def __init__(self, parent: ConditionalBijector, context: torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.parent = parent
        self.context = context
        self.exact_log_det = parent.exact_log_det

    @property
    def domain(self):
        return self.parent.domain

    @property
    def codomain(self):
        return self.parent.codomain

    @property
    def sign(self):
        return self.parent.sign

    def _forward_pass(self, x):
        return self.parent._call_and_ladj(x, self.context)

    def _inverse_pass(self, y):
        return self.parent._inverse_and_ladj(y, self.context)

    def _cache_dependencies(self):
        return (*self.parent._cache_dependencies(), self.context)

    def _training_flag(self):
        return self.parent.training

    def with_cache(self, cache_size=1):
        return ConditionedBijector(self.parent, self.context, cache_size)

    def __hash__(self):
        return object.__hash__(self)
