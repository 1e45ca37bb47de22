r"""Maximum-likelihood training of a flow: :func:`fit`.

Minimises the negative log-likelihood per row,

.. math:: \mathrm{NLL}(\phi) = -\frac{1}{N}\sum_{i=1}^{N} \log p_\phi(x_i)

(eq. 16.8 of the chapter, in nats), with Adam on shuffled minibatches.

Launched under ``torchrun`` (``WORLD_SIZE > 1``), :func:`fit` trains with
PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel` and a
:class:`~torch.utils.data.DistributedSampler`: each process sees its own
shard of every epoch, gradients are averaged across processes, and all
processes end with identical parameters.  The progress bar, logging and
checkpoints happen on rank 0 only.  See the "Scaling out" page of the docs.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from .io import FileFormatError, load_checkpoint, save_checkpoint
from .progress import progress_bar
from .transforms.continuous import regularization_loss

__all__ = ["History", "NonFiniteGuard", "check_data", "fit"]

log = logging.getLogger(__name__)


@dataclass
class History:
    """What :func:`fit` measured.

    Attributes:
        train_nll: mean training NLL (nats per row) of each epoch, averaged
            over the minibatches as the parameters moved.
        val_nll: NLL of the validation data after each epoch (empty without
            validation data).
        best_epoch: the epoch (0-based) whose parameters the flow holds at the
            end: the best validation epoch when ``val_data`` was given, else
            the last one.
        stopped_early: whether early stopping ended training.
        resumed_from: the epoch count loaded from a checkpoint (0 if none).
        skipped_steps: minibatches skipped for a non-finite loss or gradient
            (see :class:`NonFiniteGuard`).
    """

    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_from: int = 0
    skipped_steps: int = 0

    @property
    def epochs(self) -> int:
        return len(self.train_nll)


# ----------------------------------------------------------------------
# data checks (all done before any parameter is touched)
def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} could not be converted to a numeric array: {e}") from None
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _bad_rows(x: torch.Tensor) -> list[int]:
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(-1)
    return torch.nonzero(~finite).flatten().tolist()


def check_data(data, event_shape, what: str = "data", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Validate rows of ``data`` for a flow of ``event_shape``; return them as a tensor.

    Raises ``ValueError`` naming the problem: not at least 2-D (a 1-D array
    is ambiguous: rows or features?), empty, wrong width (expected and got),
    or NaN/inf values (naming the first offending row indices).
    """
    x = _as_tensor(data, what)
    event_shape = tuple(event_shape)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
    if x.dim() < 1 + len(event_shape) or x.dim() == 1:
        hint = " (for one feature use data.reshape(-1, 1))" if x.dim() == 1 else ""
        raise ValueError(f"{what} must have shape (rows, {', '.join(map(str, event_shape))}), "
                         f"got {x.dim()}-D shape {tuple(x.shape)}{hint}")
    if tuple(x.shape[1:]) != event_shape:
        raise ValueError(f"{what} has the wrong width: expected rows of shape {event_shape}, "
                         f"got {tuple(x.shape[1:])}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 rows)")
    bad = _bad_rows(x.double() if not x.is_floating_point() else x)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(f"{what} has NaN or infinite values in {len(bad)} row(s): {shown}")
    return x.to(dtype) if dtype is not None else x


def _check_context(context, flow, n: int, what: str, dtype) -> torch.Tensor | None:
    conditional = getattr(flow, "is_conditional", False)
    if context is None:
        if conditional:
            raise ValueError(f"this flow is conditional: pass {what}= with {n} rows of width {flow.context_dim}")
        return None
    if not conditional:
        raise ValueError(f"{what} was given but the flow is not conditional")
    width = flow.context_dim
    c = check_data(context, (width,) if width is not None else _as_tensor(context, what).shape[1:], what, dtype)
    if c.shape[0] != n:
        raise ValueError(f"{what} has {c.shape[0]} rows but the data have {n}")
    return c


# ----------------------------------------------------------------------
# one policy for non-finite losses, shared with pyroflows.infer.distill
class NonFiniteGuard:
    r"""What training does when a loss or a gradient is NaN or infinite.

    The one policy of :func:`fit`, :func:`pyroflows.infer.distill` and
    :func:`pyroflows.infer.distill_flow`'s warm start:

    1. the step is **skipped** (no optimizer update);
    2. the parameters are **restored** to the last ones whose loss and gradient
       were finite (the step before may have moved them somewhere bad);
    3. the skip is **counted** (:attr:`skipped`), and the first one issues a
       ``RuntimeWarning``;
    4. after ``max_consecutive`` skips in a row, ``FloatingPointError`` is
       raised, with the parameters left at the last good values.

    A rare overflow (one far-out minibatch) thus costs one step, while a run
    that has diverged stops with a clear error.  Use it after
    ``loss.backward()`` and gradient clipping::

        if guard.check(loss, grad_norm, at=f"step {t}"):
            optimizer.step()

    Args:
        params: the parameters being trained.
        max_consecutive: skips in a row that end training (default 10).
        where: the name of the procedure, for the messages.
        hint: advice appended to the error.
        sync: under ``torchrun``, a function ``bool -> bool`` that makes every
            process agree (the step is skipped everywhere if it is skipped anywhere).
    """

    def __init__(self, params, *, max_consecutive: int = 10, where: str = "training",
                 hint: str = "try a smaller lr, clip_grad, or standardising the data", sync=None):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_nonfinite must be a positive int, got {max_consecutive!r}")
        self.params = list(params)
        self.good = [p.detach().clone() for p in self.params]
        self.max_consecutive, self.where, self.hint, self.sync = max_consecutive, where, hint, sync
        self.skipped = 0
        self.consecutive = 0

    def check(self, loss, grad_norm=None, at: str = "") -> bool:
        """``True``: the step may be taken (and the parameters are remembered as good);
        ``False``: skip it (the parameters were restored)."""
        loss = torch.as_tensor(loss).detach()
        finite = bool(torch.isfinite(loss).all()) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        if self.sync is not None:
            finite = self.sync(finite)
        with torch.no_grad():
            for good, p in zip(self.good, self.params):
                if finite:
                    good.copy_(p)  # the parameters that gave this finite loss
                else:
                    p.copy_(good)
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        value = float(loss.reshape(-1)[0]) if loss.numel() else math.nan
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.where}: non-finite loss or gradient in {self.consecutive} consecutive steps (the last at "
                f"{at or 'the last step'}, loss={value}); the parameters are the last ones that gave a finite "
                f"loss ({self.skipped} steps skipped in all). {self.hint}")
        if self.skipped == 1:
            warnings.warn(f"{self.where}: skipped a step with a non-finite loss or gradient at {at or 'a step'} "
                          f"(loss={value}); the parameters were restored to the last finite ones", RuntimeWarning,
                          stacklevel=3)
        return False


# ----------------------------------------------------------------------
# the parts of fit: argument checks, the distributed context, the train state, one epoch
class _NLL(nn.Module):
    """Wraps a flow so that ``forward`` returns the mean NLL (what DDP needs)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x, context=None):
        if context is None:
            return -self.flow.log_prob(x).mean()
        return -self.flow.log_prob(x, context).mean()


@dataclass
class _Options:
    """fit's keyword arguments that shape the loop."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    clip_grad: float | None
    patience: int | None
    restore_best: bool
    progress: bool | None
    checkpoint: str | os.PathLike | None
    seed: int | None
    max_nonfinite: int


def _check_options(o: _Options, resume: bool) -> None:
    for name, value, low in (("epochs", o.epochs, 0), ("batch_size", o.batch_size, 1),
                             ("max_nonfinite", o.max_nonfinite, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} int, got {value!r}")
    if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
        raise ValueError(f"lr must be a positive number, got {o.lr!r}")
    if o.patience is not None and (not isinstance(o.patience, int) or o.patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {o.patience!r}")
    if o.clip_grad is not None and not o.clip_grad > 0:
        raise ValueError(f"clip_grad must be positive or None, got {o.clip_grad!r}")
    if resume and o.checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")


def _check_inputs(flow, data, context, val_data, val_context):
    """The flow and the data, checked before anything is touched: returns (x, c, xv, cv)."""
    if not isinstance(flow, nn.Module) or not hasattr(flow, "log_prob"):
        raise TypeError(f"flow must be an nn.Module with log_prob (a pyroflows.Flow), got {type(flow).__name__}")
    event_shape = tuple(getattr(flow, "event_shape", ()))
    param = next(iter(flow.parameters()), None)
    if param is None:
        raise ValueError("the flow has no parameters to fit")
    x = check_data(data, event_shape, "data", param.dtype)
    c = _check_context(context, flow, x.shape[0], "context", param.dtype)
    xv = cv = None
    if val_data is not None:
        xv = check_data(val_data, event_shape, "val_data", param.dtype)
        cv = _check_context(val_context, flow, xv.shape[0], "val_context", param.dtype)
    elif val_context is not None:
        raise ValueError("val_context was given without val_data")
    return x, c, xv, cv


def _dist_info():
    """(world_size, rank, local_rank) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class _Distributed:
    """Where this process trains and, under ``torchrun``, its place in the process group."""

    device: torch.device
    world: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t)

    def wrap(self, model: nn.Module, x, c, batch_size: int) -> nn.Module:
        """``model`` under DDP (identical start on every rank), or itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Data-dependent initialisation (ActNorm) happens on the first batch a layer sees; run it
        # here, before DDP broadcasts rank 0's parameters and buffers, so every rank starts equal.
        with torch.no_grad():
            model(x[:batch_size], None if c is None else c[:batch_size])
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


@contextmanager
def _distributed(device, default_device):
    """Join (and afterwards leave) torchrun's process group when ``WORLD_SIZE > 1``."""
    world, rank, local_rank = _dist_info()
    if device is None:
        device = torch.device("cuda", local_rank) if world > 1 and torch.cuda.is_available() else default_device
    ctx = _Distributed(torch.device(device), world, rank)
    created = False
    if ctx.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
            created = True
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
    try:
        yield ctx
        if ctx.enabled:
            # Rank 0 may still be writing the checkpoint; tearing gloo down while a peer is
            # mid-epoch aborts the process ("terminate called without an active exception").
            torch.distributed.barrier()
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class _TrainState:
    """Everything a checkpoint holds: resuming from it continues the run exactly."""

    flow: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: History = field(default_factory=History)
    best: float = math.inf
    best_state: dict | None = None
    since_best: int = 0

    def to_checkpoint(self) -> dict:
        """The state as plain data (see :mod:`pyroflows.io`)."""
        return {"flow": self.flow.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": asdict(self.history), "best": self.best, "best_state": self.best_state,
                "since_best": self.since_best, "generator": self.generator.get_state()}

    def restore(self, ckpt: dict, path) -> None:
        """Load a checkpoint checked by :func:`pyroflows.io.load_checkpoint` (all or nothing)."""
        before = _state(self.flow)
        try:
            self.flow.load_state_dict(ckpt["flow"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.generator.set_state(ckpt["generator"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            self.flow.load_state_dict(before)
            raise FileFormatError(path, f"cannot resume from it ({type(e).__name__}: "
                                        f"{(str(e).splitlines() or [''])[0]})") from None
        known = {f.name for f in fields(History)}
        self.history = History(**{k: v for k, v in ckpt["history"].items() if k in known})
        self.history.resumed_from = self.history.epochs
        self.best, self.best_state, self.since_best = float(ckpt["best"]), ckpt["best_state"], ckpt["since_best"]

    def end_epoch(self, epoch: int, train_nll: float, val_nll: float | None, keep_best: bool) -> None:
        """Record the epoch and track the best one (validation NLL if any, else training)."""
        h = self.history
        h.train_nll.append(train_nll)
        if val_nll is not None:
            h.val_nll.append(val_nll)
        monitored = train_nll if val_nll is None else val_nll
        if monitored < self.best:
            self.best, self.since_best = monitored, 0
            h.best_epoch = epoch
            if keep_best:
                self.best_state = _state(self.flow)
        else:
            self.since_best += 1
        if val_nll is None:
            h.best_epoch = epoch


@torch.no_grad()
def _mean_nll(flow, x, context, batch_size, device) -> float:
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        cb = None if context is None else context[i:i + batch_size].to(device)
        lp = flow.log_prob(xb) if cb is None else flow.log_prob(xb, cb)
        total += float(lp.sum())
        count += xb.shape[0]
    return -total / count


def _run_epoch(epoch, model, state, x, c, order, o: _Options, guard, dist) -> float:
    """One pass over ``order``: a guarded Adam step per minibatch; returns the mean NLL."""
    params = guard.params
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for b, i in enumerate(range(0, order.numel(), o.batch_size)):
        idx = order[i:i + o.batch_size].to(dist.device)
        loss = model(x[idx], None if c is None else c[idx])
        state.optimizer.zero_grad(set_to_none=True)
        # continuous flows' speed penalties (Finlay et al. 2020), recorded during the pass
        (loss + regularization_loss(state.flow)).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad if o.clip_grad is not None else math.inf)
        if guard.check(loss, norm, at=f"epoch {epoch}, batch {b}"):
            state.optimizer.step()
            total[0] += float(loss.detach()) * idx.numel()
            total[1] += idx.numel()
    dist.sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def _progress_bar(o: _Options, rank: int, start: int):
    if rank != 0 or o.epochs <= start:
        return None
    return progress_bar(None, o.progress, total=o.epochs, initial=start, desc="fit", unit="epoch", leave=False)


def _train(state: _TrainState, model, data, o: _Options, dist: _Distributed) -> None:
    """The epochs from where ``state`` is to ``o.epochs`` (or early stopping)."""
    x, c, xv, cv = data
    sampler = None
    if dist.enabled:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(x.shape[0]), num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                     seed=o.seed if o.seed is not None else 0)
    guard = NonFiniteGuard([p for p in state.flow.parameters() if p.requires_grad], where="fit",
                           max_consecutive=o.max_nonfinite, sync=dist.all_true if dist.enabled else None)
    bar = _progress_bar(o, dist.rank, state.history.epochs)
    try:
        for epoch in range(state.history.epochs, o.epochs):
            state.flow.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            order = (torch.as_tensor(list(iter(sampler))) if sampler is not None
                     else torch.randperm(x.shape[0], generator=state.generator))
            skipped = guard.skipped
            train_nll = _run_epoch(epoch, model, state, x, c, order, o, guard, dist)
            state.history.skipped_steps += guard.skipped - skipped
            state.flow.eval()
            val_nll = None if xv is None else _mean_nll(state.flow, xv, cv, max(o.batch_size, 1024), dist.device)
            state.end_epoch(epoch, train_nll, val_nll, keep_best=xv is not None and o.restore_best)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{train_nll:.3f}", **({"val": f"{val_nll:.3f}"} if xv is not None else {}))
            state.history.stopped_early = o.patience is not None and state.since_best >= o.patience
            if o.checkpoint is not None and dist.rank == 0:
                save_checkpoint(o.checkpoint, state.to_checkpoint())
            if state.history.stopped_early:
                if dist.rank == 0:
                    log.info("early stopping at epoch %d (best epoch %d)", epoch, state.history.best_epoch)
                break
    finally:
        if bar is not None:
            bar.close()
        state.flow.eval()


def fit(flow, data, *, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
        val_data=None, progress: bool | None = None, patience: int | None = None,
        clip_grad: float | None = 5.0, weight_decay: float = 0.0,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        device: str | torch.device | None = None, context=None, val_context=None,
        seed: int | None = None, restore_best: bool = True, max_nonfinite: int = 10) -> History:
    r"""Fit ``flow`` to the rows of ``data`` by maximum likelihood.

    Args:
        flow: a :class:`pyroflows.Flow` (or any ``nn.Module`` with
            ``log_prob(x[, context])`` and ``event_shape``); trained in place.
        data: tensor or array of shape ``(N, *event_shape)``.
        epochs: number of passes over the data (in total, counting epochs
            loaded from a checkpoint when resuming).
        batch_size: rows per minibatch (per process under ``torchrun``).
        lr, weight_decay: Adam's step size and L2 penalty.
        val_data: optional held-out rows; their NLL is recorded after each
            epoch, and with ``restore_best`` (default) the flow ends with the
            parameters of the best validation epoch.
        progress: show a tqdm bar on rank 0 (``None``, the default: only when
            stderr is a terminal; ``True``: always; ``False``: never).
        patience: stop when the monitored NLL (validation if given, else
            training) has not improved for this many epochs.
        clip_grad: clip the gradient norm to this value (``None``: no clipping).
        checkpoint: a file path; the training state is written there after
            every epoch (rank 0 only, atomically, plain data: see :mod:`pyroflows.io`).
        resume: continue from ``checkpoint`` if that file exists.  The file is
            read safely (nothing in it is executed) and checked against the
            flow before anything changes.
        device: where to train (default: where the flow is; under ``torchrun``
            with CUDA, ``cuda:LOCAL_RANK``).  The flow is moved there.
        context, val_context: conditioning rows for a conditional flow.
        seed: seeds the shuffling (and torch's global RNG) for reproducibility.
        max_nonfinite: a minibatch with a non-finite loss or gradient is
            skipped (:class:`NonFiniteGuard`); this many in a row stop training.

    Returns:
        a :class:`History` with per-epoch ``train_nll`` and ``val_nll``.
        The flow is left in ``eval()`` mode (BatchNorm layers then use their
        running statistics, the exact bijection).

    Raises:
        ValueError: bad data (NaN/inf rows, wrong width, empty, 1-D), bad
            arguments, a checkpoint that is not one for this flow
            (:class:`~pyroflows.io.FileFormatError`), all before any parameter is touched.
        FloatingPointError: ``max_nonfinite`` consecutive minibatches with a
            non-finite loss or gradient; the flow keeps the last parameters that
            gave a finite loss.
    """
    o = _Options(epochs, batch_size, lr, weight_decay, clip_grad, patience, restore_best, progress, checkpoint,
                 seed, max_nonfinite)
    _check_options(o, resume)
    x, c, xv, cv = _check_inputs(flow, data, context, val_data, val_context)
    ckpt = load_checkpoint(checkpoint, flow) if resume and os.path.exists(checkpoint) else None
    with _distributed(device, next(flow.parameters()).device) as dist:
        if seed is not None:
            torch.manual_seed(seed)
        flow.to(dist.device)
        x, c = x.to(dist.device), None if c is None else c.to(dist.device)
        model = dist.wrap(_NLL(flow), x, c, batch_size)
        params = [p for p in flow.parameters() if p.requires_grad]
        state = _TrainState(flow, torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
                            torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ()))))
        if ckpt is not None:
            state.restore(ckpt, checkpoint)
            if dist.rank == 0:
                log.info("resumed from %s at epoch %d", checkpoint, state.history.epochs)
        _train(state, model, (x, c, xv, cv), o, dist)
    if state.best_state is not None:
        flow.load_state_dict(state.best_state)
    return state.history
