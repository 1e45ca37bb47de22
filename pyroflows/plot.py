"""Pictures of flows (matplotlib is an optional extra: ``pip install 'pyroflows[plot]'``).

Every function returns a matplotlib ``Figure`` (save it with
``fig.savefig(path)``; free it with :func:`close`).  matplotlib is imported
inside the functions, so ``import pyroflows.plot`` works without it and a
call raises an ``ImportError`` that says what to install.  Without a
display the non-interactive ``Agg`` backend is used.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = [
    "close",
    "compare_2d",
    "density_1d",
    "density_2d",
    "flow_layers_2d",
    "image_grid",
    "training_curves",
]


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("pyroflows.plot needs matplotlib: pip install 'pyroflows[plot]'") from e
    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def close(fig) -> None:
    """Release a figure's memory."""
    _plt().close(fig)


def _log_prob_fn(model):
    """A callable ``points -> log density`` from a flow, a distribution or a callable."""
    if hasattr(model, "log_prob"):
        return model.log_prob
    if callable(model):
        return model
    raise TypeError(f"expected a flow, a distribution or a callable log density, got {type(model).__name__}")


def _dtype_of(model):
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def _grid_log_prob(model, bounds, grid):
    x0, x1, y0, y1 = bounds
    xs = torch.linspace(x0, x1, grid)
    ys = torch.linspace(y0, y1, grid)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([X, Y], -1).reshape(-1, 2).to(_dtype_of(model))
    lp = torch.cat([_log_prob_fn(model)(c) for c in pts.split(20_000)])
    return lp.reshape(grid, grid).float()


def _check_bounds(bounds):
    if len(bounds) != 4 or not (bounds[0] < bounds[1] and bounds[2] < bounds[3]):
        raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax) with min < max, got {bounds}")
    return tuple(float(b) for b in bounds)


def _draw_density(ax, lp, bounds, samples=None, title=None):
    ax.imshow(lp.exp().numpy(), origin="lower", extent=bounds, aspect="auto", cmap="viridis")
    if samples is not None:
        s = torch.as_tensor(samples).detach().cpu().float()
        if s.dim() != 2 or s.shape[1] != 2:
            raise ValueError(f"samples must have shape (N, 2), got {tuple(s.shape)}")
        ax.scatter(s[:, 0], s[:, 1], s=2, c="white", alpha=0.4, linewidths=0)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    if title:
        ax.set_title(title)


def density_2d(model, samples=None, bounds=(-4, 4, -4, 4), grid: int = 200, title: str | None = None):
    """Heat map of a 2-D density (a flow, a distribution or a callable log
    density) on ``bounds = (xmin, xmax, ymin, ymax)``, with optional samples on top."""
    plt = _plt()
    bounds = _check_bounds(bounds)
    fig, ax = plt.subplots(figsize=(4, 4))
    _draw_density(ax, _grid_log_prob(model, bounds, grid), bounds, samples, title)
    fig.tight_layout()
    return fig


def compare_2d(*models, samples=None, titles=None, bounds=(-4, 4, -4, 4), grid: int = 150):
    """Side-by-side heat maps of several 2-D densities (e.g. the true one and a flow)."""
    plt = _plt()
    bounds = _check_bounds(bounds)
    titles = titles or [None] * len(models)
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for i, (m, ax) in enumerate(zip(models, axes[0])):
        _draw_density(ax, _grid_log_prob(m, bounds, grid), bounds, samples if i == len(models) - 1 else None,
                      titles[i])
    fig.tight_layout()
    return fig


def flow_layers_2d(flow, bounds=(-4, 4, -4, 4), grid: int = 120, max_panels: int = 8):
    """The base density pushed through a trained 2-D flow one layer at a time
    (the chapter's Fig. 16.4): panel :math:`k` shows the density of
    :math:`f_k \\circ \\dots \\circ f_1(z)`, computed exactly by the change of
    variables through the first :math:`k` layers."""
    import pyro.distributions as dist

    plt = _plt()
    bounds = _check_bounds(bounds)
    if tuple(getattr(flow, "event_shape", ())) != (2,):
        raise ValueError(f"flow_layers_2d needs a flow over 2-D points, got event shape "
                         f"{tuple(getattr(flow, 'event_shape', ()))}")
    if getattr(flow, "is_conditional", False):
        raise ValueError("flow_layers_2d needs an unconditional flow")
    layers = list(flow.transforms)
    steps = sorted({round(i) for i in torch.linspace(0, len(layers), min(max_panels, len(layers) + 1)).tolist()})
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 2.8), squeeze=False)
    base = flow.base_distribution()
    for ax, k in zip(axes[0], steps):
        d = dist.TransformedDistribution(base, layers[:k]) if k else base
        _draw_density(ax, _grid_log_prob(d, bounds, grid), bounds,
                      title="base" if k == 0 else f"after {k} layer{'s' if k > 1 else ''}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def density_1d(model, data=None, true_log_prob=None, bounds=None, grid: int = 400, bins: int = 60):
    """A 1-D model density over a histogram of ``data`` (and the true density if given)."""
    plt = _plt()
    if data is not None:
        data = torch.as_tensor(data).detach().cpu().float().reshape(-1)
    if bounds is None:
        lo, hi = (float(data.min()), float(data.max())) if data is not None else (-4.0, 4.0)
        pad = 0.15 * (hi - lo)
        bounds = (lo - pad, hi + pad)
    xs = torch.linspace(bounds[0], bounds[1], grid)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if data is not None:
        ax.hist(data.numpy(), bins=bins, density=True, color="0.8", label="data")
    with torch.no_grad():
        ax.plot(xs, _log_prob_fn(model)(xs[:, None].to(_dtype_of(model))).exp().float(), label="model")
        if true_log_prob is not None:
            ax.plot(xs, true_log_prob(xs[:, None]).exp(), "--", label="true")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    return fig


def training_curves(history, ax=None):
    """Per-epoch training (and validation) NLL of a :class:`pyroflows.train.History`."""
    plt = _plt()
    train = getattr(history, "train_nll", None)
    if train is None:
        raise TypeError("training_curves expects a History with train_nll (what pyroflows.train.fit returns)")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(len(train)), train, label="train")
    if history.val_nll:
        ax.plot(range(len(history.val_nll)), history.val_nll, label="validation")
    if getattr(history, "best_epoch", None) is not None and history.val_nll:
        ax.axvline(history.best_epoch, color="0.6", ls=":", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats)")
    ax.legend()
    fig.tight_layout()
    return fig


def image_grid(images, shape=None, nrow: int | None = None, cmap: str = "gray"):
    """A grid of images: ``images`` is ``(N, H, W)``, ``(N, C, H, W)`` (C = 1 or 3),
    or ``(N, D)`` rows reshaped to ``shape = (H, W)`` (square by default)."""
    plt = _plt()
    x = torch.as_tensor(images).detach().cpu().float()
    if x.dim() == 2:
        if shape is None:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"rows of width {x.shape[1]} are not square images: pass shape=(H, W)")
            shape = (side, side)
        x = x.reshape(x.shape[0], *shape)
    if x.dim() == 4:
        if x.shape[1] == 1:
            x = x[:, 0]
        elif x.shape[1] == 3:
            x = x.permute(0, 2, 3, 1)
        else:
            raise ValueError(f"images of shape (N, C, H, W) need C = 1 or 3, got C = {x.shape[1]}")
    if x.dim() not in (3, 4) or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
    n = x.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    fig, axes = plt.subplots(ncol, nrow, figsize=(nrow, ncol), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(x[i].numpy(), cmap=cmap)
    fig.tight_layout(pad=0.1)
    return fig
