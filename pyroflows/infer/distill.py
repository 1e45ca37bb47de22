r"""Fitting a flow to an unnormalised density by reverse KL ("distillation").

Given :math:`\tilde p(x) = Z\,p(x)` that can be evaluated but not sampled, fit
:math:`q_\phi` by minimising (Prince, *Understanding Deep Learning*, eq. 16.25)

.. math::

    \mathrm{KL}(q_\phi \,\|\, p) = \mathbb E_{z \sim p_0}\big[\log q_\phi(f_\phi(z))
    - \log \tilde p(f_\phi(z))\big] + \log Z,

with reparametrised samples :math:`x = f_\phi(z)` (the flow's cheap direction
must be sampling, e.g. IAF, coupling or spline flows).  Reverse KL is
mode-seeking, so three guards against mode collapse are built in:

* **annealing** (Rezende & Mohamed 2015): the target is tempered,
  :math:`\beta_t \log \tilde p` with :math:`\beta_t` rising linearly from
  ``beta0`` to 1 over ``anneal_steps``; a flat early target makes ``q`` spread
  over every mode before they sharpen;
* **a forward-KL term** when some samples :math:`y_m \sim p` are at hand:
  ``forward_kl_weight`` :math:`\times\, (-\frac1M\sum_m \log q_\phi(y_m))` pulls
  ``q`` onto every mode the samples visit (mass-covering);
* without target samples, an **importance-weighted forward-KL term**
  (``is_forward_kl_weight``): the flow's own draws, detached and
  self-normalised by :math:`\bar w_s \propto \tilde p^{\beta}(x_s)/q(x_s)`, give
  :math:`-\sum_s \bar w_s \log q_\phi(x_s)`, a consistent estimate of the
  forward KL :math:`\mathrm{KL}(p_\beta \| q)` up to a constant (Müller et al.,
  "Neural importance sampling", 2019).  It moves mass towards under-covered
  regions that ``q`` still reaches (a mode it gives too little, not one it
  never visits), and costs one scoring pass of the detached draws (the flow's
  inverse).

At the end, :math:`\log Z`, the importance ESS and PSIS k-hat are estimated
from fresh draws of ``q`` (see :mod:`pyroflows.infer.diagnostics`).

``distill_flow(teacher, student)`` is the recipe of Prince section 16.3.5 (van
den Oord et al., "Parallel WaveNet", 2018): a MAF teacher (fast density)
distilled into an IAF student (fast sampling) by minimising
:math:`\mathrm{KL}(\text{student} \,\|\, \text{teacher})` with student samples
scored by the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..progress import progress_bar
from ..train import NonFiniteGuard
from ..transforms.continuous import regularization_loss
from .diagnostics import importance_diagnostics

__all__ = ["DistillResult", "distill", "distill_flow"]


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        losses: per-step loss (the tempered reverse-KL estimate plus the forward-KL term);
            non-finite for a step that was skipped.
        skipped_steps: steps skipped for a non-finite loss or gradient
            (:class:`~pyroflows.train.NonFiniteGuard`).
        betas: the annealing schedule used, per step.
        log_z: importance-sampled :math:`\\log Z` of the target from ``num_eval_samples`` draws of ``q``.
        log_z_se: its standard error.
        ess: importance ESS as a fraction of ``num_eval_samples``.
        khat: PSIS k-hat (< 0.5: ``q`` covers the target well).
        elbo: :math:`E_q[\\log \\tilde p - \\log q]`; ``log_z - elbo`` estimates
            :math:`\\mathrm{KL}(q \\| p)`, and for a normalised target (``distill_flow``)
            ``-elbo`` is the KL itself.
        warm_start_nll: per-epoch training NLL of :func:`distill_flow`'s maximum-likelihood
            warm start (empty otherwise); ``warm_start_skipped`` counts its minibatches
            skipped for a non-finite loss or gradient.
    """

    losses: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    log_z: float = math.nan
    log_z_se: float = math.nan
    ess: float = math.nan
    khat: float = math.nan
    elbo: float = math.nan
    warm_start_nll: list[float] = field(default_factory=list)
    warm_start_skipped: int = 0
    skipped_steps: int = 0

    @property
    def kl(self) -> float:
        """Estimated :math:`\\mathrm{KL}(q \\| p)` = ``log_z - elbo`` (>= 0 up to noise)."""
        return self.log_z - self.elbo


def _check_log_density(lp, x, step) -> torch.Tensor:
    if not isinstance(lp, torch.Tensor):
        raise TypeError(f"log_density must return a torch.Tensor, got {type(lp).__name__}")
    if lp.shape != x.shape[:-1]:
        raise ValueError(f"log_density must map points of shape (N, D) = {tuple(x.shape)} to log "
                         f"densities of shape (N,) = {tuple(x.shape[:-1])}, got {tuple(lp.shape)}")
    bad = ~torch.isfinite(lp)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"log_density returned non-finite values ({int(bad.sum())} of {lp.numel()}) "
                         f"at step {step}, e.g. {float(lp[i].detach())} at x = {x[i].detach().tolist()}; it must be "
                         f"finite wherever the flow can put samples (bound the flow's support, or "
                         f"use a large negative value instead of -inf)")
    return lp


def _as_distribution(flow):
    d = flow() if isinstance(flow, nn.Module) else flow
    if not hasattr(d, "rsample") or not getattr(d, "has_rsample", True):
        raise TypeError("flow must be a pyroflows Flow (or a module returning a distribution with rsample)")
    return d


def _linear_beta(step: int, anneal_steps: int, beta0: float) -> float:
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, beta0 + (1.0 - beta0) * step / anneal_steps)


def _cosine(step: int, num_steps: int, floor: float = 0.01) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(num_steps, 1)))


_SCHEDULES = {"constant": lambda step, num_steps: 1.0, "cosine": _cosine}


def _check_distill_args(flow, num_steps, num_samples, beta0, is_forward_kl_weight, lr_schedule, target_samples):
    """distill's argument checks; returns ``target_samples`` as a tensor (or ``None``)."""
    if num_steps < 0 or num_samples < 1:
        raise ValueError(f"need num_steps >= 0 and num_samples >= 1, got {num_steps}, {num_samples}")
    if not 0 < beta0 <= 1:
        raise ValueError(f"beta0 must be in (0, 1], got {beta0}")
    if not (math.isfinite(is_forward_kl_weight) and is_forward_kl_weight >= 0):
        raise ValueError(f"is_forward_kl_weight must be a finite number >= 0, got {is_forward_kl_weight!r}")
    if lr_schedule not in _SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(_SCHEDULES)}, got {lr_schedule!r}")
    if target_samples is not None:
        target_samples = torch.as_tensor(target_samples)
        event = tuple(_as_distribution(flow).event_shape)
        if target_samples.dim() != 1 + len(event) or tuple(target_samples.shape[1:]) != event:
            raise ValueError(f"target_samples must have shape (M, {', '.join(map(str, event))}), "
                             f"got {tuple(target_samples.shape)}")
        if not torch.isfinite(target_samples).all():
            raise ValueError("target_samples contain NaN or inf")
    return target_samples


def _reverse_kl_loss(flow, log_density, num_samples, beta, step, target_samples, fwd_n, forward_kl_weight,
                     is_forward_kl_weight) -> torch.Tensor:
    """One step's loss: the tempered reverse KL plus the optional forward-KL terms
    (NaN when the flow's own draws are not finite, which :class:`NonFiniteGuard` skips)."""
    d = _as_distribution(flow)
    x = d.rsample((num_samples,))
    if not bool(torch.isfinite(x).all()):
        return torch.tensor(math.nan)
    log_q = d.log_prob(x)
    log_p = _check_log_density(log_density(x), x, step)
    loss = (log_q - beta * log_p).mean()
    if target_samples is not None and forward_kl_weight > 0:
        idx = torch.randint(len(target_samples), (min(fwd_n, len(target_samples)),))
        loss = loss - forward_kl_weight * _as_distribution(flow).log_prob(target_samples[idx]).mean()
    if is_forward_kl_weight > 0:
        w = torch.softmax((beta * log_p - log_q).detach(), 0)
        loss = loss - is_forward_kl_weight * (w * _as_distribution(flow).log_prob(x.detach())).sum()
    return loss


def distill(flow: nn.Module, log_density: Callable[[torch.Tensor], torch.Tensor], *, num_steps: int = 3000,
            num_samples: int = 256, lr: float = 3e-3, anneal_steps: int | None = None, beta0: float = 0.01,
            target_samples: torch.Tensor | None = None, forward_kl_weight: float = 1.0,
            is_forward_kl_weight: float = 1.0,
            forward_batch_size: int | None = None, clip_grad: float | None = 10.0,
            num_eval_samples: int = 4096, optimizer: torch.optim.Optimizer | None = None,
            lr_schedule: str = "cosine", progress: bool | None = None, max_nonfinite: int = 10) -> DistillResult:
    r"""Fit ``flow`` to the unnormalised density ``exp(log_density)`` by reverse KL (eq. 16.25).

    Args:
        flow: a :class:`~pyroflows.Flow` (its parameters are trained in place).
        log_density: a callable mapping a batch of points ``(N, D)`` to
            :math:`\log \tilde p` of shape ``(N,)``; must be finite and
            differentiable (``ValueError`` otherwise).
        num_steps: optimisation steps.
        num_samples: reparametrised draws of ``q`` per step.
        lr: Adam learning rate (ignored when ``optimizer`` is given).
        anneal_steps: steps over which the tempering :math:`\beta` rises from
            ``beta0`` to 1 (0 = no annealing; ``None``, the default, anneals over
            the first half of the steps).
        target_samples: optional samples of the target ``(M, D)``; adds the
            forward-KL term with weight ``forward_kl_weight`` (a minibatch of
            ``forward_batch_size`` rows, default ``num_samples``, per step).
        is_forward_kl_weight: weight of the importance-weighted forward-KL term on the
            flow's own (detached) draws (0 = off; see the module docstring).
        clip_grad: gradient-norm clipping (``None`` to disable).
        num_eval_samples: draws used for the final ``log_z``, ``ess``, ``khat``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (the learning rate of every
            parameter group decays as :math:`\tfrac12(1 + \cos \pi t/T)` to 1%
            of its start over the ``num_steps`` steps; the late small steps cut the
            Monte Carlo noise in the fitted flow, hence in ``log_z``).
        progress: show a tqdm progress bar (``None``: only when stderr is a terminal).
        max_nonfinite: a step with a non-finite loss or gradient (or non-finite
            draws of the flow) is skipped and the parameters restored, the one
            policy of :class:`~pyroflows.train.NonFiniteGuard`; this many in a
            row raise ``FloatingPointError``.

    The defaults (3000 steps of 256 draws, lr 3e-3 with cosine decay, annealing
    over the first half, importance-weighted forward-KL weight 1) are the one
    generic setting measured in ``docs/bench_distill.md``: every mode of the
    chapter's energies U1-U4 and of an 8-component mixture, log Z within 0.02.

    Returns:
        a :class:`DistillResult`.

    Raises:
        ValueError: bad arguments, or ``log_density`` returning a wrong shape or
            non-finite values at finite points.
        FloatingPointError: ``max_nonfinite`` consecutive non-finite steps.
    """
    target_samples = _check_distill_args(flow, num_steps, num_samples, beta0, is_forward_kl_weight, lr_schedule,
                                         target_samples)
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    result = DistillResult()
    if anneal_steps is None:
        anneal_steps = int(num_steps) // 2
    steps = bar = progress_bar(range(int(num_steps)), progress, desc="distill", leave=False)
    fwd_n = forward_batch_size or num_samples
    guard = NonFiniteGuard(params, max_consecutive=max_nonfinite, where="distill",
                           hint="lower lr, enable clip_grad, or anneal (anneal_steps)")
    for step in steps:
        beta = _linear_beta(step, anneal_steps, beta0)
        factor = _SCHEDULES[lr_schedule](step, num_steps)
        for g, g_lr in zip(opt.param_groups, base_lrs):
            g["lr"] = g_lr * factor
        loss = _reverse_kl_loss(flow, log_density, num_samples, beta, step, target_samples, fwd_n,
                                forward_kl_weight, is_forward_kl_weight)
        opt.zero_grad()
        if loss.requires_grad:
            # continuous flows' speed penalties (Finlay et al. 2020), recorded during the pass
            (loss + regularization_loss(flow)).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad is not None else math.inf)
        if guard.check(loss, norm, at=f"step {step}"):
            opt.step()
        value = float(loss.detach())
        result.losses.append(value)
        result.betas.append(beta)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{value:.4f}", beta=f"{beta:.2f}")
    result.skipped_steps = guard.skipped
    bar.close()
    for g, g_lr in zip(opt.param_groups, base_lrs):
        g["lr"] = g_lr
    _evaluate(flow, log_density, num_eval_samples, num_steps, result)
    return result


@torch.no_grad()
def _evaluate(flow, log_density, num_samples: int, step: int, result: DistillResult) -> None:
    """Importance-sampled log Z, ESS, k-hat and ELBO from fresh draws of the flow, into ``result``."""
    d = _as_distribution(flow)
    x = d.sample((num_samples,))
    diag = importance_diagnostics(_check_log_density(log_density(x), x, step) - d.log_prob(x))
    result.log_z, result.log_z_se, result.ess, result.khat, result.elbo = (
        diag.log_evidence, diag.log_evidence_se, diag.ess, diag.khat, diag.elbo)


def _event_shape(flow, name) -> tuple[int, ...]:
    if not isinstance(flow, nn.Module) or not hasattr(flow, "log_prob"):
        raise TypeError(f"{name} must be a pyroflows Flow (an nn.Module with log_prob), got {type(flow).__name__}")
    return tuple(_as_distribution(flow).event_shape)


@torch.no_grad()
def _draw(flow, n: int, chunk: int = 4096) -> torch.Tensor:
    d = _as_distribution(flow)
    return torch.cat([d.sample((min(chunk, n - i),)) for i in range(0, n, chunk)])


def _warm_start(student, pool, epochs, batch_size, lr, clip_grad, progress, max_nonfinite=10):
    """Maximum likelihood of ``student`` on the rows of ``pool``; returns (per-epoch NLL, skipped batches)."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    guard = NonFiniteGuard(params, max_consecutive=max_nonfinite, where="distill_flow warm start",
                           hint="lower warm_start_lr")
    history = []
    for epoch in progress_bar(range(epochs), progress, desc="warm start", unit="epoch", leave=False):
        total, count = 0.0, 0
        for b, idx in enumerate(torch.randperm(len(pool)).split(batch_size)):
            loss = -_as_distribution(student).log_prob(pool[idx]).mean()
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad is not None else math.inf)
            if guard.check(loss, norm, at=f"epoch {epoch}, batch {b}"):
                opt.step()
                total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        history.append(total / count if count else math.nan)
    return history, guard.skipped


def _check_warm_start_args(warm_start_samples, warm_start_epochs) -> None:
    if isinstance(warm_start_samples, bool) or not isinstance(warm_start_samples, int) or warm_start_samples < 0:
        raise ValueError(f"warm_start_samples must be a non-negative int, got {warm_start_samples!r}")
    if warm_start_samples and not (isinstance(warm_start_epochs, int) and warm_start_epochs >= 1):
        raise ValueError(f"warm_start_epochs must be a positive int, got {warm_start_epochs!r}")
    if 0 < warm_start_samples < 20:
        raise ValueError(f"warm_start_samples={warm_start_samples} is too few to fit a flow to; use 0 (no warm "
                         f"start) or at least 20")


def distill_flow(teacher: nn.Module, student: nn.Module, *, num_steps: int, num_samples: int = 256,
                 lr: float = 1e-3, progress: bool | None = None, warm_start_samples: int = 0,
                 warm_start_epochs: int = 20, warm_start_lr: float | None = None, **kw) -> DistillResult:
    r"""Distil a trained ``teacher`` flow (e.g. MAF: fast density, slow sampling) into a
    ``student`` flow (e.g. IAF: fast sampling), Prince section 16.3.5 (van den Oord et al.,
    "Parallel WaveNet", 2018).

    The main stage minimises the reverse KL with reparametrised student samples
    :math:`x = f_\phi(z)` scored by the frozen teacher :math:`t`:

    .. math::

        \mathrm{KL}(s_\phi \,\|\, t) = \mathbb E_{z \sim p_0}\big[\log s_\phi(f_\phi(z))
        - \log t(f_\phi(z))\big],

    which only needs the student's cheap direction (IAF: sampling, and ``log_prob`` of its
    own samples through the cache) and the teacher's (MAF: density).

    Reverse KL from a student at :math:`\mathcal N(0, I)` is mode-seeking and slow in high
    dimension, so an optional **warm start** first fits the student to
    ``warm_start_samples`` teacher draws by maximum likelihood, i.e. minimises the forward KL
    :math:`\mathrm{KL}(t \,\|\, s_\phi) = -\mathbb E_t[\log s_\phi] + \text{const}`
    (mass-covering; Adam for ``warm_start_epochs`` epochs over the draws in minibatches of
    ``num_samples``).  This costs the expensive directions once: teacher sampling (MAF:
    :math:`D` passes per layer) and student scoring of new points (IAF: :math:`D` passes per
    layer), both fine at moderate batch.  A rare far-out teacher draw can overflow the IAF's
    sequential inverse (its scales compound across layers); a minibatch with a non-finite
    loss or gradient is skipped, the parameters restored and the skip counted
    (``warm_start_skipped``), the one policy of :class:`~pyroflows.train.NonFiniteGuard`
    (``max_nonfinite`` in a row stop it).  On the 64-D digits benchmark
    (``docs/bench_distill.md``) the warm start lowered the KL, but more reverse-KL steps
    with ``lr_schedule="cosine"`` lowered it further per second of compute, so it is off
    by default.

    The teacher is frozen (its parameters get no gradients and are not updated) and given
    back trainable, in its original train/eval mode.  Other keywords go to :func:`distill`
    (e.g. ``lr_schedule="cosine"``, or ``target_samples=`` data rows for a forward-KL term
    during the reverse stage); unlike :func:`distill`'s defaults, the teacher is not
    tempered and there is no importance-weighted term unless asked for
    (``anneal_steps=0, is_forward_kl_weight=0, lr_schedule="constant"``): a normalised
    teacher needs neither, and the term would run the student's slow direction every step.  Since the teacher is normalised, the result's ``-elbo``
    estimates :math:`\mathrm{KL}(\text{student}\,\|\,\text{teacher})` and ``log_z`` should
    be close to 0; ``warm_start_nll`` holds the warm start's per-epoch training NLL.

    Args:
        teacher, student: :class:`~pyroflows.Flow` objects with the same event shape.
        num_steps, num_samples, lr: the reverse-KL stage (see :func:`distill`).
        warm_start_samples: teacher draws for the maximum-likelihood warm start (0: none).
        warm_start_epochs: epochs of the warm start.
        warm_start_lr: its learning rate (default ``lr``).

    Raises:
        TypeError: teacher or student is not a flow.
        ValueError: their event shapes differ, or a warm-start argument is out of range.
        FloatingPointError: ``max_nonfinite`` consecutive non-finite minibatches or steps.
    """
    t_event, s_event = _event_shape(teacher, "teacher"), _event_shape(student, "student")
    if t_event != s_event:
        raise ValueError(f"teacher and student must have the same event shape, got {t_event} and {s_event}")
    _check_warm_start_args(warm_start_samples, warm_start_epochs)
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    was_training = teacher.training
    teacher.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        warm_nll, skipped = [], 0
        if warm_start_samples:
            pool = _draw(teacher, warm_start_samples)
            warm_nll, skipped = _warm_start(student, pool, warm_start_epochs, num_samples, warm_start_lr or lr,
                                            kw.get("clip_grad", 10.0), progress, kw.get("max_nonfinite", 10))
        # a normalised teacher needs neither tempering nor the mode-covering term (and the term
        # would score detached draws through the student's slow direction every step)
        kw = {"anneal_steps": 0, "is_forward_kl_weight": 0.0, "lr_schedule": "constant", **kw}
        result = distill(student, teacher.log_prob, num_steps=num_steps, num_samples=num_samples,
                         lr=lr, progress=progress, **kw)
        result.warm_start_nll, result.warm_start_skipped = warm_nll, skipped
        return result
    finally:
        for p in frozen:
            p.requires_grad_(True)
        teacher.train(was_training)
