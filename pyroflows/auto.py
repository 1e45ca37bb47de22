r"""The data-size-aware default for tables: :func:`fit_auto`.

A flow that can represent every Gaussian should never score worse than one,
yet on a few hundred rows an unregularised flow overfits.  :func:`fit_auto`
therefore builds the model in two stages and keeps the second only when it
earns its place on held-out rows:

1. **Gaussian stage** -- a full-covariance Gaussian fitted in closed form: the
   generative map :math:`x = L u + \mu` with :math:`L` the Cholesky factor of
   a shrunk covariance (a :class:`~pyroflows.transforms.linear.Triangular`
   layer), so :math:`u = L^{-1}(x - \mu)` are whitened rows.  The covariance
   is the sample correlation shrunk towards the identity (as in Ledoit & Wolf,
   "A well-conditioned estimator for large-dimensional covariance matrices",
   2004), with the intensity chosen by cross-validated likelihood on the
   training rows: it stays invertible with fewer rows than columns and is
   the maximum-likelihood estimate when shrinking does not help.
   When the whitened rows are clusters, the stage's base becomes a Gaussian
   mixture (:class:`~pyroflows.mixture.GaussianMixtureBase`, fitted by
   regularised EM), its number of components and covariance prior chosen by
   cross-validated likelihood on the training rows
   (:func:`~pyroflows.mixture.choose_mixture`; one component, the Gaussian,
   unless more predict held-out rows better).
2. **Flow layers** -- spline couplings (:func:`pyroflows.flows.nsf`) on the
   whitened rows, starting at the identity, with depth, width and weight
   decay chosen from the number of rows and columns
   (:func:`choose_config`); fitted by :func:`pyroflows.train.fit` with early
   stopping on validation rows (the best epoch's parameters are restored).
   Weight decay pulls the conditioners towards zero, i.e. the layers towards
   the identity: the stage.

The flow layers are kept only if their validation log-likelihood beats the
stage's by more than two standard errors of the paired per-row difference and
on most validation rows (a positive median difference: a gain carried by one
or two outlying rows, which the layers buy by spreading mass everywhere, does
not count); otherwise the returned model *is* the stage, and the report says
so.  Finally (``refit=True``) the chosen model is refitted on all
rows: the Gaussian stage in closed form, the mixture (same number of
components) by EM, the flow layers for the number of epochs validation picked.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field

import torch

from .flow import Flow
from .mixture import GaussianMixtureBase, choose_mixture, fit_gaussian_mixture
from .train import check_data, fit
from .transforms.linear import Triangular

__all__ = ["AutoReport", "auto_flow", "choose_config", "choose_shrinkage", "fit_auto", "gaussian_stage",
           "shrunk_covariance"]


# ----------------------------------------------------------------------
# the Gaussian stage
#: Shrinkage intensities tried by :func:`choose_shrinkage` (0: the sample covariance).
SHRINKAGE_GRID = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                  0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _moments(x: torch.Tensor):
    """Mean, column standard deviations (1 for a constant column) and correlation of the rows (float64)."""
    mean = x.mean(0)
    sd = x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = (x - mean) / sd
    return mean, sd, z.T @ z / x.shape[0]


def _shrunk(sd, corr, alpha: float) -> torch.Tensor:
    eye = torch.eye(corr.shape[0], dtype=corr.dtype)
    return ((1 - alpha) * corr + alpha * eye) * sd[:, None] * sd[None, :]


def _gaussian_log_prob(x, mean, cov) -> torch.Tensor | None:
    """Per-row log density of N(mean, cov); ``None`` when ``cov`` is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return None
    return torch.distributions.MultivariateNormal(mean, scale_tril=chol).log_prob(x)


def choose_shrinkage(x: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    r"""The shrinkage :math:`\alpha` of :func:`shrunk_covariance` from :data:`SHRINKAGE_GRID`
    with the best ``folds``-fold cross-validated log-likelihood on the rows of ``x``.

    Shrinking the correlation towards the identity keeps the covariance
    invertible with fewer rows than columns and trades variance for bias the
    way the held-out likelihood prefers (as Ledoit & Wolf, 2004, but
    tuned for likelihood, not Frobenius loss)."""
    x = x.double()
    n = x.shape[0]
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    total = torch.zeros(len(SHRINKAGE_GRID), dtype=torch.float64)
    for k in range(folds):
        held = torch.zeros(n, dtype=torch.bool)
        held[order[k::folds]] = True
        mean, sd, corr = _moments(x[~held])
        for i, alpha in enumerate(SHRINKAGE_GRID):
            lp = _gaussian_log_prob(x[held], mean, _shrunk(sd, corr, alpha))
            total[i] += -math.inf if lp is None else float(lp.sum())
    return SHRINKAGE_GRID[int(total.argmax())]


def shrunk_covariance(x: torch.Tensor, alpha: float | None = None, seed: int = 0) -> tuple[torch.Tensor, float]:
    r"""Covariance of the rows of ``x`` (float64) with the sample correlation
    :math:`R` shrunk towards the identity,

    .. math:: \Sigma = S^{1/2}\,((1-\alpha) R + \alpha I)\,S^{1/2},

    :math:`S` the column variances (1 for a constant column).  ``alpha=None``
    picks :math:`\alpha` by cross-validation (:func:`choose_shrinkage`).
    Returns ``(covariance, alpha)``.
    """
    x = x.double()
    if alpha is None:
        alpha = choose_shrinkage(x, seed=seed)
    _, sd, corr = _moments(x)
    return _shrunk(sd, corr, alpha), alpha


@torch.no_grad()
def gaussian_stage(x: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Triangular, float]:
    r"""The :class:`~pyroflows.transforms.linear.Triangular` layer :math:`x = L u + \mu`
    with :math:`L L^\top` = :func:`shrunk_covariance` of ``x`` and :math:`\mu` its
    mean: a standard normal pushed through it is the fitted Gaussian.
    Returns ``(layer, shrinkage)``."""
    layer, alpha, _ = _gaussian_stage_and_whitened(x, dtype, seed)
    return layer, alpha


def _gaussian_stage_and_whitened(x, dtype, seed):
    r""":func:`gaussian_stage` plus the whitened rows :math:`u = L^{-1}(x - \mu)` (float64)."""
    x = x.double()
    cov, alpha = shrunk_covariance(x, seed=seed)
    chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype))
    mean = x.mean(0)
    layer = Triangular.from_matrix(chol, bias=mean).to(dtype)
    layer.requires_grad_(False)  # fixed: the flow layers model what is left after whitening
    whitened = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    return layer, alpha, whitened


# ----------------------------------------------------------------------
# the architecture, as a function of the data's size
def choose_config(n_rows: int, n_cols: int) -> dict:
    """Flow-layer settings for ``n_rows`` training rows of ``n_cols`` columns.

    Fewer rows: fewer and narrower layers, fewer spline bins, stronger
    weight decay.  Returns the keywords of :func:`auto_flow` plus
    ``weight_decay``, ``batch_size`` and ``epochs`` for the training.
    """
    if n_rows < 150:
        layers, width, bins, wd = 2, 16, 4, 1e-2
    elif n_rows < 600:
        layers, width, bins, wd = 3, 32, 6, 1e-3
    else:
        layers, width, bins, wd = 4, 64, 8, 1e-4
    width = max(width, min(2 * n_cols, 4 * width))  # wide tables need room to condition on
    batch = int(min(128, max(16, n_rows // 8)))
    steps_per_epoch = math.ceil(n_rows / batch)
    return {"num_layers": layers, "hidden_dims": (width,), "count_bins": bins, "bound": 5.0,
            "weight_decay": wd, "batch_size": batch, "epochs": int(min(400, max(60, 4000 // steps_per_epoch)))}


#: The flow layers are kept only if their validation gain over the Gaussian stage exceeds this many
#: standard errors (the early-stopping epoch was picked on the same rows, so the gain is optimistic).
MARGIN_SE = 2.0

#: The covariance prior strength, per dimension, of a mixture stage whose size is given, not chosen.
DEFAULT_MIXTURE_PRIOR_PER_DIM = 0.3

_ARCH_KEYS = ("num_layers", "hidden_dims", "count_bins", "bound")


def auto_flow(input_dim: int, *, num_layers: int = 2, hidden_dims=(16,), count_bins: int = 4,
              bound: float = 5.0, mixture_components: int = 1) -> Flow:
    r"""The architecture :func:`fit_auto` fits: ``num_layers`` spline couplings
    (:func:`pyroflows.flows.nsf`) followed, in the generative direction, by a
    :class:`~pyroflows.transforms.linear.Triangular` Gaussian stage, over a standard
    normal base, or a :class:`~pyroflows.mixture.GaussianMixtureBase` of
    ``mixture_components`` components when that is more than 1 (then the "stage" is a
    Gaussian mixture).  With ``num_layers=0`` it is the stage alone.  The layers start
    at the identity (a fresh Triangular layer is :math:`x = u`, a fresh mixture base
    is the standard normal); :func:`fit_auto` sets the stage from data.  Rebuilding
    with the keywords of :attr:`AutoReport.flow_kwargs` and loading the state dict
    restores a fit.
    """
    from . import flows

    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    layers = []
    if num_layers > 0 and input_dim > 1:
        layers = list(flows.nsf(input_dim, num_layers=num_layers, hidden_dims=tuple(hidden_dims), count_bins=count_bins,
                                bound=bound).transforms)
    stage = Triangular(input_dim)
    stage.requires_grad_(False)
    base = GaussianMixtureBase(input_dim, mixture_components) if mixture_components != 1 else None
    return Flow([*layers, stage], base=base, event_shape=(input_dim,))


# ----------------------------------------------------------------------
@dataclass
class AutoReport:
    """What :func:`fit_auto` decided and why.

    Attributes:
        chosen: ``"flow"`` (the stage + flow layers), ``"gaussian"`` (the Gaussian
            stage alone) or ``"mixture"`` (a Gaussian-mixture stage alone).
        reason: one sentence saying why.
        n_rows, n_cols, n_train, n_val: the data and its split.
        config: the flow-layer settings tried (:func:`choose_config`).
        flow_kwargs: keywords that rebuild the returned model's architecture
            with :func:`auto_flow` (``num_layers=0`` for the stage alone).
        shrinkage: the Gaussian stage's shrinkage intensity (0: the sample
            covariance; :func:`choose_shrinkage`).
        components, mixture_prior: the stage's number of Gaussian components
            (1: the Gaussian) and, for a mixture, its covariance prior strength
            (:func:`~pyroflows.mixture.choose_mixture`).
        gaussian_val_ll, flow_val_ll, val_ll_se: mean validation
            log-likelihood per row of the stage and of stage + flow layers, and
            the standard error of their paired difference (``None`` when not
            measured).
        best_epoch: the epoch early stopping kept (``None`` if no flow fitted).
        refit: whether the returned model was refitted on all rows.
    """

    chosen: str
    reason: str
    n_rows: int
    n_cols: int
    n_train: int
    n_val: int
    config: dict = field(default_factory=dict)
    flow_kwargs: dict = field(default_factory=dict)
    shrinkage: float = 0.0
    components: int = 1
    mixture_prior: float | None = None
    gaussian_val_ll: float | None = None
    flow_val_ll: float | None = None
    val_ll_se: float | None = None
    best_epoch: int | None = None
    refit: bool = False
    history: object = None

    @property
    def stage_name(self) -> str:
        return "Gaussian stage" if self.components == 1 else f"Gaussian-mixture stage ({self.components} components)"

    def summary(self) -> str:
        """One line for the user."""
        s = f"auto: {self.chosen} ({self.reason})"
        if self.gaussian_val_ll is not None and self.flow_val_ll is not None:
            s += (f"; validation log-likelihood per row: {self.stage_name} {self.gaussian_val_ll:.3f}, "
                  f"flow {self.flow_val_ll:.3f} (difference SE {self.val_ll_se:.3f}, {self.n_val} rows)")
        return s


def _with_stage(d: int, arch: dict, rows: torch.Tensor, dtype, seed: int, report: AutoReport,
                components: int | None) -> Flow:
    """:func:`auto_flow` with ``arch`` and its stage fitted to ``rows``: the Gaussian stage, then,
    on the whitened rows, a mixture of ``components`` (``None``: chosen by cross-validation,
    with the prior strength; otherwise the report's prior is reused).  Records the choices."""
    stage, report.shrinkage, whitened = _gaussian_stage_and_whitened(rows, dtype, seed)
    if components is None:
        components, report.mixture_prior, _ = choose_mixture(whitened, seed=seed)
    report.components = components
    if components > 1 and report.mixture_prior is None:
        report.mixture_prior = DEFAULT_MIXTURE_PRIOR_PER_DIM * d
    flow = auto_flow(d, **arch, **({"mixture_components": components} if components > 1 else {}))
    flow.transforms[-1].load_state_dict(stage.state_dict())
    if components > 1:
        weights, means, covs = fit_gaussian_mixture(whitened, components, report.mixture_prior, seed=seed,
                                                    restarts=3)
        frame = _base_frame(flow.transforms[:-1], d)  # the layers' fixed mixing, in the base's frame
        flow.base.set(weights.to(dtype), (means @ frame.T).to(dtype), (frame @ covs @ frame.T).to(dtype))
    return flow


@torch.no_grad()
def _base_frame(layers, d: int) -> torch.Tensor:
    r"""The matrix :math:`A` with :math:`z = A u` for the freshly built ``layers`` (base side
    :math:`z`, whitened rows :math:`u`).  The couplings start at the identity but ``nsf``
    mixes coordinates between them (a permutation), which leaves a standard normal base
    unchanged but not a mixture: the mixture fitted to :math:`u` is moved to :math:`z`."""
    probe = torch.cat([torch.zeros(1, d), torch.eye(d), 2 * torch.eye(d)]).double()
    z = probe
    for layer in reversed(layers):
        z = copy.deepcopy(layer).double().inv(z)
    a = (z[1:d + 1] - z[0]).T
    if z[0].abs().max() > 1e-9 or (z[d + 1:] - z[0] - 2 * a.T).abs().max() > 1e-9:
        raise RuntimeError("the flow layers do not start linear: cannot place the mixture stage")
    return a


def fit_auto(data, *, val_fraction: float = 0.2, seed: int = 0, progress: bool | None = None,
             refit: bool = True, config: dict | None = None, min_val_rows: int = 20,
             dtype: torch.dtype = torch.float32) -> tuple[Flow, AutoReport]:
    """Fit the size-aware default model to the rows of ``data`` (an ``(N, D)``
    tensor or array).  See the module docstring for the procedure.

    Args:
        data: the rows (any units: the Gaussian stage standardises them).
        val_fraction: share of rows held out to early-stop the flow layers and
            to decide flow versus stage; with fewer than ``min_val_rows``
            validation rows no flow layers are tried (on 10 rows, the epoch early
            stopping picks on them makes the flow look several nats better than it is
            on new rows: measured on digits and breast cancer, ``docs/bench_tabular.md``).
        seed: seeds the split, the initialisation and the shuffling.
        progress: a progress bar (``None``: only on a terminal).
        refit: refit the chosen model on all rows (the stage with the same number
            of components, the flow layers for the number of epochs early
            stopping picked).
        config: override :func:`choose_config` (same keys), and ``components``:
            the stage's number of Gaussian components (default ``None``: chosen by
            cross-validation on the training rows; 1: the Gaussian).

    Returns:
        ``(flow, report)``: a :class:`~pyroflows.Flow` in ``eval()`` mode and
        an :class:`AutoReport`.
    """
    x = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
    if x.dim() != 2:
        raise ValueError(f"data must have shape (rows, columns), got {x.dim()}-D shape {tuple(x.shape)}")
    x = check_data(x, (x.shape[1],), "data", torch.float64)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if x.shape[0] < 2:
        raise ValueError(f"data needs at least 2 rows to fit a Gaussian, got {x.shape[0]}")
    if progress is None:
        progress = sys.stderr.isatty()
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = round(val_fraction * n)
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    cfg = {**choose_config(train.shape[0], d), **(config or {})}
    components = cfg.get("components")
    report = AutoReport("gaussian", "", n, d, train.shape[0], n_val, config=cfg, flow_kwargs={"num_layers": 0})

    def stage_only(reason):
        flow = _with_stage(d, {"num_layers": 0}, x, dtype, seed, report, components)
        report.chosen = "gaussian" if report.components == 1 else "mixture"
        report.reason = reason
        if report.components > 1:
            report.flow_kwargs = {"num_layers": 0, "mixture_components": report.components}
        return flow.eval(), report

    if d == 1:
        return stage_only("one column: no couplings to add")
    if cfg["num_layers"] == 0:
        return stage_only("no flow layers asked for (num_layers=0)")
    if n_val < min_val_rows:
        return stage_only(f"only {n_val} validation rows (< {min_val_rows}): flow layers not tried")

    arch = {k: cfg[k] for k in _ARCH_KEYS}
    train_kw = {"batch_size": cfg["batch_size"], "lr": cfg.get("lr", 1e-3), "weight_decay": cfg["weight_decay"],
                "progress": progress, "seed": seed}
    torch.manual_seed(seed)
    flow = _with_stage(d, arch, train, dtype, seed, report, components)
    xv = val.to(dtype)
    with torch.no_grad():
        stage_lp = flow.log_prob(xv).double()  # the flow layers start at the identity: the stage
    hist = fit(flow, train.to(dtype), epochs=cfg["epochs"], val_data=xv, patience=cfg.get("patience", 30),
               **train_kw)
    with torch.no_grad():
        diff = flow.log_prob(xv).double() - stage_lp
    report.gaussian_val_ll = float(stage_lp.mean())
    report.flow_val_ll = report.gaussian_val_ll + float(diff.mean())
    report.val_ll_se = float(diff.std() / math.sqrt(n_val))
    report.best_epoch, report.history = hist.best_epoch, hist
    if not float(diff.mean()) > MARGIN_SE * report.val_ll_se:
        components = report.components  # the stage chosen on the training rows
        return stage_only(f"the flow layers did not beat the {report.stage_name} on the validation rows "
                          f"by more than {MARGIN_SE:g} standard errors")
    if not float(diff.median()) > 0:
        components = report.components
        return stage_only(f"the flow layers beat the {report.stage_name} on average but not on most validation "
                          f"rows (median difference {float(diff.median()):.3f}): a gain carried by a few rows")

    report.chosen = "flow"
    report.flow_kwargs = {**arch, **({"mixture_components": report.components} if report.components > 1 else {})}
    report.reason = f"the flow layers beat the {report.stage_name} on {n_val} validation rows"
    if refit:
        torch.manual_seed(seed)
        flow = _with_stage(d, arch, x, dtype, seed, report, report.components)
        fit(flow, x.to(dtype), epochs=hist.best_epoch + 1, **train_kw)
        report.refit = True
    return flow.eval(), report
