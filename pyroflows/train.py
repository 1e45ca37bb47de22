r"""Maximum-likelihood training of a flow: :func:`fit`.

Minimises the negative log-likelihood per row,

.. math:: \mathrm{NLL}(\phi) = -\frac{1}{N}\sum_{i=1}^{N} \log p_\phi(x_i)

(eq. 16.9 of the chapter, in nats), with Adam on shuffled minibatches.

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
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from .transforms.continuous import regularization_loss
from torch import nn

__all__ = ["History", "check_data", "fit"]

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
    """

    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_from: int = 0

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
class _NLL(nn.Module):
    """Wraps a flow so that ``forward`` returns the mean NLL (what DDP needs)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x, context=None):
        if context is None:
            return -self.flow.log_prob(x).mean()
        return -self.flow.log_prob(x, context).mean()


def _dist_info():
    """(world_size, rank, local_rank) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _progress_enabled(progress: bool, rank: int) -> bool:
    return bool(progress) and rank == 0 and sys.stderr.isatty()


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


_CHECKPOINT_KEYS = {"flow", "optimizer", "history", "best", "best_state", "since_best", "generator"}


def _load_checkpoint(path, flow) -> dict:
    """Read and validate a checkpoint before anything is changed (ValueError naming the file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling error means: not a checkpoint
        raise ValueError(f"cannot resume: {path} is not a pyroflows checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= set(ckpt):
        raise ValueError(f"cannot resume: {path} is not a checkpoint written by pyroflows.train.fit")
    own = flow.state_dict()
    theirs = ckpt["flow"]
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        raise ValueError(f"cannot resume: {path} holds the parameters of a different flow architecture")
    return ckpt


def _save_checkpoint(path, payload):
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


def fit(flow, data, *, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
        val_data=None, progress: bool = True, patience: int | None = None,
        clip_grad: float | None = 5.0, weight_decay: float = 0.0,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        device: str | torch.device | None = None, context=None, val_context=None,
        seed: int | None = None, restore_best: bool = True) -> History:
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
        progress: show a tqdm bar (only on a terminal, and only on rank 0).
        patience: stop when the monitored NLL (validation if given, else
            training) has not improved for this many epochs.
        clip_grad: clip the gradient norm to this value (``None``: no clipping).
        checkpoint: a file path; the training state is written there after
            every epoch (rank 0 only, atomically).
        resume: continue from ``checkpoint`` if that file exists.
        device: where to train (default: where the flow is; under ``torchrun``
            with CUDA, ``cuda:LOCAL_RANK``).  The flow is moved there.
        context, val_context: conditioning rows for a conditional flow.
        seed: seeds the shuffling (and torch's global RNG) for reproducibility.

    Returns:
        a :class:`History` with per-epoch ``train_nll`` and ``val_nll``.
        The flow is left in ``eval()`` mode (BatchNorm layers then use their
        running statistics, the exact bijection).

    Raises:
        ValueError: bad data (NaN/inf rows, wrong width, empty, 1-D), bad
            arguments, all before any parameter is touched.
        FloatingPointError: a non-finite loss or gradient during training;
            the flow is left with the last parameters that gave a finite
            loss.
    """
    # ---- arguments and data, before touching anything -----------------
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, "
                             f"got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {patience!r}")
    if clip_grad is not None and not clip_grad > 0:
        raise ValueError(f"clip_grad must be positive or None, got {clip_grad!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if not isinstance(flow, nn.Module) or not hasattr(flow, "log_prob"):
        raise TypeError(f"flow must be an nn.Module with log_prob (a pyroflows.Flow), got {type(flow).__name__}")
    event_shape = tuple(getattr(flow, "event_shape", ()))
    param = next(iter(flow.parameters()), None)
    if param is None:
        raise ValueError("the flow has no parameters to fit")
    dtype = param.dtype
    x = check_data(data, event_shape, "data", dtype)
    c = _check_context(context, flow, x.shape[0], "context", dtype)
    xv = cv = None
    if val_data is not None:
        xv = check_data(val_data, event_shape, "val_data", dtype)
        cv = _check_context(val_context, flow, xv.shape[0], "val_context", dtype)
    elif val_context is not None:
        raise ValueError("val_context was given without val_data")
    ckpt = _load_checkpoint(checkpoint, flow) if resume and os.path.exists(checkpoint) else None

    # ---- distributed set-up --------------------------------------------
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    created_group = False
    if device is None:
        if distributed and torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
        else:
            device = param.device
    device = torch.device(device)
    if distributed:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            created_group = True
        if device.type == "cuda":
            torch.cuda.set_device(device)

    if seed is not None:
        torch.manual_seed(seed)
    flow.to(device)
    x, c = x.to(device), None if c is None else c.to(device)
    model = _NLL(flow)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Data-dependent initialisation (ActNorm) happens on the first batch a layer sees; run it
        # here, before DDP broadcasts rank 0's parameters and buffers, so every rank starts equal.
        with torch.no_grad():
            model(x[:batch_size], None if c is None else c[:batch_size])

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
    history = History()
    best = math.inf
    best_state = None
    since_best = 0
    start = 0
    if ckpt is not None:
        flow.load_state_dict(ckpt["flow"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = ckpt["history"]
        history.resumed_from = start = history.epochs
        best, best_state, since_best = ckpt["best"], ckpt["best_state"], ckpt["since_best"]
        generator.set_state(ckpt["generator"])
        if rank == 0:
            log.info("resumed from %s at epoch %d", checkpoint, start)

    # ---- the loop --------------------------------------------------------
    n = x.shape[0]
    if distributed:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed if seed is not None else 0)
    good = [p.detach().clone() for p in params]
    bar = None
    if _progress_enabled(progress, rank) and epochs > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=start, desc="fit", unit="epoch", leave=False)
    try:
        for epoch in range(start, epochs):
            flow.train()
            if distributed:
                sampler.set_epoch(epoch)
                order = torch.as_tensor(list(iter(sampler)))
            else:
                order = torch.randperm(n, generator=generator)
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for b, i in enumerate(range(0, order.numel(), batch_size)):
                idx = order[i:i + batch_size]
                idx = idx.to(device)
                xb = x[idx]
                cb = None if c is None else c[idx]
                loss = model(xb, cb)
                optimizer.zero_grad(set_to_none=True)
                # continuous flows' speed penalties (Finlay et al. 2020), recorded during the pass
                (loss + regularization_loss(flow)).backward()
                norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad is not None else math.inf)
                if not (torch.isfinite(loss) and torch.isfinite(norm)):
                    with torch.no_grad():
                        for p, g in zip(params, good):
                            p.copy_(g)
                    raise FloatingPointError(
                        f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at epoch {epoch}, "
                        f"batch {b} (loss={float(loss.detach())}); the flow keeps the last parameters that gave a "
                        f"finite loss. Try a smaller lr, clip_grad, or standardising the data")
                with torch.no_grad():
                    for p, g in zip(params, good):
                        g.copy_(p)
                optimizer.step()
                total[0] += float(loss.detach()) * idx.numel()
                total[1] += idx.numel()
            if distributed:
                import torch.distributed as tdist

                tdist.all_reduce(total)
            history.train_nll.append(float(total[0] / total[1]))

            flow.eval()
            monitored = history.train_nll[-1]
            if xv is not None:
                history.val_nll.append(_mean_nll(flow, xv, cv, max(batch_size, 1024), device))
                monitored = history.val_nll[-1]
            if monitored < best:
                best, since_best = monitored, 0
                history.best_epoch = epoch
                if xv is not None and restore_best:
                    best_state = _state(flow)
            else:
                since_best += 1
            if xv is None:
                history.best_epoch = epoch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{history.train_nll[-1]:.3f}",
                                **({"val": f"{history.val_nll[-1]:.3f}"} if history.val_nll else {}))
            stop = patience is not None and since_best >= patience
            history.stopped_early = stop
            if checkpoint is not None and rank == 0:
                _save_checkpoint(checkpoint, {"flow": flow.state_dict(), "optimizer": optimizer.state_dict(),
                                              "history": history, "best": best, "best_state": best_state,
                                              "since_best": since_best, "generator": generator.get_state()})
            if stop:
                if rank == 0:
                    log.info("early stopping at epoch %d (best epoch %d)", epoch, history.best_epoch)
                break
        if distributed:
            # Rank 0 may still be writing the checkpoint; tearing gloo down while a peer is
            # mid-epoch aborts the process ("terminate called without an active exception").
            tdist.barrier()
    finally:
        if bar is not None:
            bar.close()
        flow.eval()
        if created_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    if best_state is not None:
        flow.load_state_dict(best_state)
    return history
