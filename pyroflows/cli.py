"""The ``pyroflows`` command line: ``demo``, ``fit``, ``sample``, ``score``.

::

    pyroflows demo [--quick] [--out demo_report/]
    pyroflows fit DATA.csv [--flow auto] [--out model.pt] [--epochs N] ...
    pyroflows sample model.pt -n N [--out samples.csv]
    pyroflows score model.pt DATA.csv [--quantile 0.01] [--out scores.csv]

Also available as ``python -m pyroflows``.  Errors (missing or unreadable
files, malformed CSV rows) are reported on one line naming the file and the
line, with a non-zero exit status.

The flow architecture is chosen by name with :func:`make_flow`: names are
looked up in :mod:`pyroflows.flows` first; ``"elementwise"`` (a stack of
elementwise layers, which models each dimension's marginal only) is always
available; ``"auto"`` picks the first available of :data:`PREFERRED`.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .flow import Flow

__all__ = [
    "DEMO_SECTIONS",
    "NORMALIZING_DIRECTION_KINDS",
    "PREFERRED",
    "CLIError",
    "DemoContext",
    "SectionResult",
    "available_flows",
    "best_elementwise_kind",
    "elementwise_flow",
    "load_model",
    "main",
    "make_flow",
    "read_csv",
    "resolve_flow_name",
    "run_demo",
    "save_model",
]

# ----------------------------------------------------------------------
# architectures by name

#: Architectures tried, in order, by ``--flow auto``.
PREFERRED = ("nsf", "realnvp", "maf")


def best_elementwise_kind() -> str:
    """The most flexible elementwise transformer available (a spline once it exists)."""
    from .transforms.transformers import KINDS

    return next((k for k in ("rq_spline", "rational_quadratic", "cubic_spline", "piecewise_quadratic")
                 if k in KINDS), "piecewise_linear")


#: Transformer kinds whose density is piecewise constant with knots that move with the
#: parameters: used in the generative direction, a point crossing a moving knot jumps in
#: log-density, which the gradient cannot see, and maximum likelihood drifts.  In the
#: normalizing direction the knots sit at fixed places in the data space and the
#: likelihood is smooth in the parameters, so such layers are placed inverted.
NORMALIZING_DIRECTION_KINDS = ("piecewise_linear",)


def elementwise_flow(input_dim: int, kind: str | None = None, layers: int = 2, bins: int = 32,
                     bound: float = 4.0) -> Flow:
    """A composition of elementwise layers (eq. 16.2): ``layers`` times an
    ``elementwise(input_dim, kind=kind)`` layer followed by an affine one.

    ``kind`` defaults to :func:`best_elementwise_kind`.  A piecewise-linear
    layer is used through its inverse (``layer.inv``), so that its equal-width
    bins lie in the data space of the normalizing direction (see
    :data:`NORMALIZING_DIRECTION_KINDS`); its parameters stay registered on
    the flow as ``flow.inverted``.
    """
    from torch import nn

    from .transforms.elementwise import elementwise

    kind = kind or best_elementwise_kind()
    stack, inverted = [], []
    for _ in range(layers):
        layer = elementwise(input_dim, kind=kind, bins=bins, bound=bound)
        if kind in NORMALIZING_DIRECTION_KINDS:
            inverted.append(layer)
            layer = layer.inv
        stack += [elementwise(input_dim, kind="affine"), layer]
    flow = Flow(stack, event_shape=(input_dim,))
    if inverted:
        flow.inverted = nn.ModuleList(inverted)  # Pyro's .inv wrapper is not a module
    return flow


def _auto_tabular(input_dim: int, **kw) -> Flow:
    from .auto import auto_flow

    return auto_flow(input_dim, **kw)


_FALLBACKS: dict[str, Callable[..., Flow]] = {"elementwise": elementwise_flow, "auto_tabular": _auto_tabular}


def available_flows() -> list[str]:
    """Names :func:`make_flow` accepts (besides ``"auto"``)."""
    from . import flows

    return sorted(set(getattr(flows, "__all__", [])) | set(_FALLBACKS))


def resolve_flow_name(name: str, input_dim: int = 2) -> str:
    """``"auto"`` -> the first available of :data:`PREFERRED` (``"elementwise"`` in 1-D or if none)."""
    if name != "auto":
        return name
    if input_dim == 1:
        return "elementwise"
    names = available_flows()
    return next((n for n in PREFERRED if n in names), "elementwise")


def make_flow(name: str, input_dim: int, **kw) -> Flow:
    """Build the architecture ``name`` (from :mod:`pyroflows.flows`, or a
    built-in fallback) for ``input_dim``-dimensional data.

    Raises ``ValueError`` listing the available names for an unknown name.
    """
    from . import flows

    name = resolve_flow_name(name, input_dim)
    if name in getattr(flows, "__all__", []):
        return getattr(flows, name)(input_dim, **kw)
    if name in _FALLBACKS:
        return _FALLBACKS[name](input_dim, **kw)
    raise ValueError(f"unknown flow architecture {name!r}; available: {', '.join(available_flows())}, auto")


# ----------------------------------------------------------------------
# files
class CLIError(Exception):
    """An error reported to the user on one line (``pyroflows: error: ...``)."""


def _open_text(path: str):
    if path == "-":
        return io.StringIO(sys.stdin.read())
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path}: no such file")
    if p.is_dir():
        raise CLIError(f"{path}: is a directory, expected a CSV file")
    try:
        return open(p, newline="", encoding="utf-8")
    except OSError as e:
        raise CLIError(f"{path}: cannot read ({e.strerror})") from None


def read_csv(path: str) -> tuple[torch.Tensor, list[str] | None]:
    """Read a numeric CSV (optional header row) into an ``(N, D)`` float32 tensor.

    Blank lines are skipped.  Raises :class:`CLIError` with ``file:line`` for
    a row of the wrong length, a value that is not a number, or NaN/inf.
    """
    header, rows, width = None, [], None
    with _open_text(path) as f:
        try:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or all(not v.strip() for v in row):
                    continue
                try:
                    values = [float(v) for v in row]
                except ValueError:
                    if width is None and header is None and not rows:
                        header, width = [v.strip() for v in row], len(row)
                        continue
                    bad = next(v for v in row if not _is_float(v))
                    raise CLIError(f"{path}:{lineno}: {bad.strip()!r} is not a number") from None
                if width is None:
                    width = len(values)
                if len(values) != width:
                    raise CLIError(f"{path}:{lineno}: expected {width} values, got {len(values)}")
                if not all(math.isfinite(v) for v in values):
                    raise CLIError(f"{path}:{lineno}: NaN or infinite value")
                rows.append(values)
        except UnicodeDecodeError:
            raise CLIError(f"{path}: not a text CSV file (cannot decode as UTF-8)") from None
        except csv.Error as e:
            raise CLIError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise CLIError(f"{path}: no data rows")
    return torch.tensor(rows, dtype=torch.float32), header


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _write_csv(rows: torch.Tensor | list, header: list[str] | None, out: str | None, fmt="{:.6g}"):
    def write(f):
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(header)
        for r in rows:
            w.writerow([fmt.format(v) if isinstance(v, float) else v for v in r])

    if out in (None, "-"):
        write(sys.stdout)
        sys.stdout.flush()
        return
    try:
        with open(out, "w", newline="", encoding="utf-8") as f:
            write(f)
    except OSError as e:
        raise CLIError(f"{out}: cannot write ({e.strerror})") from None


# ----------------------------------------------------------------------
# models: a flow fitted to standardised data, plus the standardisation
def save_model(path, flow: Flow, *, flow_name: str, flow_kwargs: dict, mean, std, columns=None,
               train_log_prob=None, history=None):
    """Save a fitted flow with everything needed to rebuild it and undo the standardisation."""
    torch.save({
        "format": "pyroflows-model-1",
        "flow_name": flow_name, "flow_kwargs": dict(flow_kwargs),
        "input_dim": int(mean.numel()), "state_dict": flow.state_dict(),
        "mean": mean, "std": std, "columns": columns,
        "train_log_prob": train_log_prob,
        "history": None if history is None else {"train_nll": history.train_nll, "val_nll": history.val_nll},
    }, path)


@dataclass
class LoadedModel:
    """A flow on standardised data ``z = (x - mean) / std`` and the standardisation."""

    flow: Flow
    mean: torch.Tensor
    std: torch.Tensor
    columns: list[str] | None
    train_log_prob: torch.Tensor | None
    flow_name: str

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density in the original units: :math:`\\log p_z((x-m)/s) - \\sum \\log s`."""
        with torch.no_grad():
            return self.flow.log_prob((x - self.mean) / self.std) - self.std.log().sum()

    def sample(self, n: int) -> torch.Tensor:
        return self.flow.sample((n,)) * self.std + self.mean


def load_model(path: str) -> LoadedModel:
    """Load a model written by ``pyroflows fit`` (raises :class:`CLIError` if it is not one)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path}: no such file")
    try:
        m = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a model file"
        raise CLIError(f"{path}: not a pyroflows model file ({type(e).__name__})") from None
    if not isinstance(m, dict) or m.get("format") != "pyroflows-model-1":
        raise CLIError(f"{path}: not a pyroflows model file (written by `pyroflows fit`)")
    try:
        flow = make_flow(m["flow_name"], m["input_dim"], **m["flow_kwargs"])
        flow.load_state_dict(m["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CLIError(f"{path}: cannot rebuild flow {m['flow_name']!r}: {str(e).splitlines()[0]}") from None
    flow.eval()
    return LoadedModel(flow, m["mean"], m["std"], m["columns"], m["train_log_prob"], m["flow_name"])


# ----------------------------------------------------------------------
# commands
def cmd_fit(args) -> int:
    from .train import fit

    if not 0 <= args.val_fraction < 1:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    x, header = read_csv(args.data)
    mean, std = x.mean(0), x.std(0) if x.shape[0] > 1 else torch.ones(x.shape[1])
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(z.shape[0], generator=g)
    n_val = round(args.val_fraction * z.shape[0]) if z.shape[0] >= 20 else 0
    val, train = z[perm[:n_val]], z[perm[n_val:]]
    torch.manual_seed(args.seed)
    if args.flow == "auto":  # the size-aware default: a Gaussian stage, flow layers only if they help
        return _fit_auto(args, x, z, header, mean, std)
    name = resolve_flow_name(args.flow, x.shape[1])
    try:
        flow = make_flow(name, x.shape[1])
    except ValueError as e:
        raise CLIError(str(e)) from None
    hist = fit(flow, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               val_data=val if n_val else None, patience=args.patience if n_val else None,
               progress=not args.quiet, seed=args.seed)
    with torch.no_grad():
        train_lp = flow.log_prob(z) - std.log().sum()
    try:
        save_model(args.out, flow, flow_name=name, flow_kwargs={}, mean=mean, std=std, columns=header,
                   train_log_prob=train_lp, history=hist)
    except (OSError, RuntimeError) as e:
        raise CLIError(f"{args.out}: cannot write ({getattr(e, 'strerror', None) or str(e).splitlines()[0]})") from None
    nll = hist.val_nll[hist.best_epoch] if hist.val_nll else hist.train_nll[-1]
    print(f"fitted {name} to {x.shape[0]} rows x {x.shape[1]} columns in {hist.epochs} epochs; "
          f"{'validation' if hist.val_nll else 'training'} NLL {nll + float(std.log().sum()):.4f} nats/row; "
          f"saved {args.out}", file=sys.stderr)
    return 0


def _fit_auto(args, x, z, header, mean, std) -> int:
    from .auto import fit_auto

    # --epochs caps the flow layers' training; batch size, lr and weight decay are chosen by data size
    flow, report = fit_auto(z, val_fraction=args.val_fraction, seed=args.seed, progress=not args.quiet,
                            config={"epochs": args.epochs})
    with torch.no_grad():
        train_lp = flow.log_prob(z) - std.log().sum()
    try:
        save_model(args.out, flow, flow_name="auto_tabular", flow_kwargs=report.flow_kwargs, mean=mean, std=std,
                   columns=header, train_log_prob=train_lp, history=report.history)
    except (OSError, RuntimeError) as e:
        raise CLIError(f"{args.out}: cannot write ({getattr(e, 'strerror', None) or str(e).splitlines()[0]})") from None
    print(f"{report.summary()}\nfitted to {x.shape[0]} rows x {x.shape[1]} columns; saved {args.out}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    if args.n < 0:
        raise CLIError(f"-n must be >= 0, got {args.n}")
    model = load_model(args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    x = model.sample(args.n)
    _write_csv(x.tolist(), model.columns, args.out)
    return 0


def cmd_score(args) -> int:
    if not 0 < args.quantile < 1:
        raise CLIError(f"--quantile must be in (0, 1), got {args.quantile}")
    model = load_model(args.model)
    x, _ = read_csv(args.data)
    d = model.mean.numel()
    if x.shape[1] != d:
        raise CLIError(f"{args.data}: expected {d} columns (as the model was fitted), got {x.shape[1]}")
    lp = model.log_prob(x)
    ref = model.train_log_prob if model.train_log_prob is not None else lp
    source = "training" if model.train_log_prob is not None else "scored (the model file has no training scores)"
    threshold = float(torch.quantile(ref.double(), args.quantile))
    rows = [[float(v), int(v < threshold)] for v in lp.tolist()]
    _write_csv(rows, ["log_prob", "anomaly"], args.out)
    print(f"threshold log p < {threshold:.4f} (the {args.quantile:g} quantile of the {len(ref)} {source} rows' "
          f"log densities): {sum(r[1] for r in rows)} of {len(rows)} rows flagged", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------
# demo: a list of sections, each a function DemoContext -> SectionResult
@dataclass
class DemoContext:
    """What every demo section gets: where to write, how long to run."""

    out: Path
    quick: bool = False
    seed: int = 0
    flow: str = "auto"
    progress: bool = False

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class SectionResult:
    """A section's part of the report: a title, table rows, prose and figure files."""

    title: str
    rows: list[dict] = field(default_factory=list)
    text: str = ""
    figures: list[str] = field(default_factory=list)


def _density_section(ctx: DemoContext, density, flow_name: str, title: str, epochs: int,
                     n_train: int, plot_fn) -> SectionResult:
    from .train import fit

    torch.manual_seed(ctx.seed)
    train = density.sample(n_train, seed=ctx.seed + 1)
    val = density.sample(n_train // 4, seed=ctx.seed + 2)
    test = density.sample(ctx.size(5000, 2000), seed=ctx.seed + 3)
    name = resolve_flow_name(flow_name, density.dim)
    flow = make_flow(name, density.dim)
    t0 = time.perf_counter()
    hist = fit(flow, train, epochs=epochs, batch_size=256, lr=1e-2, val_data=val, patience=20,
               progress=ctx.progress, seed=ctx.seed)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        test_nll = float(-flow.log_prob(test).mean())
    true_nll = float(-density.log_prob(test).mean())
    row = {"density": density.name, "flow": name, "epochs": hist.epochs,
           "test NLL (flow)": test_nll, "test NLL (true density)": true_nll,
           "entropy": density.entropy(), "gap": test_nll - true_nll, "seconds": seconds}
    res = SectionResult(title, [row])
    res.text = (f"Fitted `{name}` to {n_train} samples of `{density.name}` by maximum likelihood "
                f"({hist.epochs} epochs). On {test.shape[0]} fresh samples the flow's NLL is "
                f"{test_nll:.3f} nats against {true_nll:.3f} for the true density (gap {test_nll - true_nll:.3f}).")
    if name == "elementwise" and density.dim > 1:
        res.text += (" An elementwise flow models each coordinate separately, so it cannot capture the "
                     "dependence between them; coupling/autoregressive flows close this gap.")
    res.figures += plot_fn(ctx, density, flow, train, hist)
    return res


def _try_plot(fn):
    try:
        return fn()
    except ImportError as e:
        print(f"pyroflows demo: skipping plots ({e})", file=sys.stderr)
        return []


def _plots_1d(ctx, density, flow, train, hist):
    def draw():
        from . import plot

        fig = plot.density_1d(flow, data=train, true_log_prob=density.log_prob)
        fig.savefig(ctx.out / "density_1d.png", dpi=100)
        fig2 = plot.training_curves(hist)
        fig2.savefig(ctx.out / "training_1d.png", dpi=100)
        plot.close(fig)
        plot.close(fig2)
        return ["density_1d.png", "training_1d.png"]

    return _try_plot(draw)


def _plots_2d(ctx, density, flow, train, hist):
    def draw():
        from . import plot

        fig = plot.compare_2d(density.log_prob, flow, samples=flow.sample((1000,)),
                              titles=(f"true {density.name}", "flow"))
        fig.savefig(ctx.out / f"density_2d_{density.name}.png", dpi=100)
        fig2 = plot.flow_layers_2d(flow)
        fig2.savefig(ctx.out / f"layers_2d_{density.name}.png", dpi=100)
        plot.close(fig)
        plot.close(fig2)
        return [f"density_2d_{density.name}.png", f"layers_2d_{density.name}.png"]

    return _try_plot(draw)


def demo_density_1d(ctx: DemoContext) -> SectionResult:
    """Section 16.1-16.3: a 1-D elementwise flow fitted to a bimodal density."""
    from .data import Bimodal1D

    return _density_section(ctx, Bimodal1D(), "elementwise", "Density modelling in 1-D (16.1-16.3)",
                            epochs=ctx.size(150, 40), n_train=ctx.size(4000, 1500), plot_fn=_plots_1d)


def demo_density_2d(ctx: DemoContext) -> SectionResult:
    """Section 16.4-16.5: a 2-D flow fitted to eight Gaussians."""
    from .data import EightGaussians

    return _density_section(ctx, EightGaussians(), ctx.flow, "Density modelling in 2-D (16.4-16.5)",
                            epochs=ctx.size(80, 40), n_train=ctx.size(4000, 1500), plot_fn=_plots_2d)


def _funnel_2d():
    """Neal's funnel in 2-D: v ~ N(0, 3^2), x | v ~ N(0, e^v); no data, so log p(data) = 0."""
    import pyro
    import pyro.distributions as dist

    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def _funnel_2d_log_density(z):
    import pyro.distributions as dist

    v, x = z[..., 0], z[..., 1]
    return dist.Normal(0.0, 3.0).log_prob(v) + dist.Normal(0.0, torch.exp(v / 2)).log_prob(x)


def demo_svi_guide(ctx: DemoContext) -> SectionResult:
    """An SVI guide: ``AutoFlow`` against Pyro's ``AutoNormal`` on a 2-D funnel (PSIS k-hat, ESS, log evidence)."""
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from .infer import AutoFlow
    from .infer.compare import fit_guide
    from .infer.diagnostics import guide_log_weights, importance_diagnostics

    steps = ctx.size(300, 200)
    rows, guides = [], {}
    for name, make in [("AutoNormal (Pyro)", lambda: AutoNormal(_funnel_2d)),
                       ("AutoFlow", lambda: AutoFlow(_funnel_2d, hidden=(32, 32)))]:
        pyro.set_rng_seed(ctx.seed)
        guide = make()
        t0 = time.perf_counter()
        fit_guide(_funnel_2d, guide, num_steps=steps, lr=1e-2)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            d = importance_diagnostics(guide_log_weights(_funnel_2d, guide, num_samples=4000))
        guides[name] = guide
        rows.append({"guide": name, "SVI steps": steps, "k-hat": d.khat, "ESS": f"{100 * d.ess:.1f}%",
                     "log p(data) (exact 0)": d.log_evidence, "seconds": seconds})
    res = SectionResult("An SVI guide: AutoFlow on a 2-D funnel", rows)
    res.text = (f"Neal's funnel, v ~ N(0, 3^2), x | v ~ N(0, e^v), fitted by SVI ({steps} Trace_ELBO steps) with "
                "Pyro's mean-field `AutoNormal` and with `pyroflows.infer.AutoFlow` (its default: 3 affine IAF layers, a triangular linear layer and the path-derivative gradient). "
                "Scored by importance sampling from 4000 guide draws: PSIS k-hat (< 0.5 good, > 0.7 unreliable), "
                "importance ESS, and the log evidence, which is exactly 0 here.")

    def draw():
        from . import plot

        flow_guide = guides["AutoFlow"]
        with torch.no_grad():
            post = flow_guide.get_posterior()
            fig = plot.compare_2d(_funnel_2d_log_density, post, samples=post.sample((500,)),
                                  titles=("true funnel (v, x)", "AutoFlow guide"), bounds=(-8, 8, -12, 12))
        fig.savefig(ctx.out / "svi_funnel.png", dpi=100)
        plot.close(fig)
        return ["svi_funnel.png"]

    res.figures += _try_plot(draw)
    return res


def _u1(z):
    """Energy U1 of Rezende & Mohamed (2015): a ring of radius 2 cut by two bumps."""
    r = z.norm(dim=-1)
    a = torch.stack([-0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2], -1)
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logsumexp(a, -1)


def _grid_log_z(log_density, half_width=6.0, n=600) -> float:
    h = 2 * half_width / n
    c = -half_width + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    zz = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return float(torch.logsumexp(log_density(zz), 0) + 2 * math.log(h))


def demo_distillation(ctx: DemoContext) -> SectionResult:
    """Distillation: a flow fitted by reverse KL to the unnormalised energy U1 (log Z error, ESS, k-hat)."""
    from .flows import nsf
    from .infer import distill

    torch.manual_seed(ctx.seed)
    steps = ctx.size(300, 200)
    exact = _grid_log_z(lambda z: -_u1(z))
    flow = nsf(2, hidden=(32, 32))
    t0 = time.perf_counter()
    r = distill(flow, lambda z: -_u1(z), num_steps=steps, num_samples=256, lr=3e-3, anneal_steps=steps // 2,
                progress=False)
    seconds = time.perf_counter() - t0
    row = {"target": "U1 (Rezende & Mohamed)", "steps": steps, "exact log Z": exact, "distilled log Z": r.log_z,
           "abs error": abs(r.log_z - exact), "ESS": f"{100 * r.ess:.1f}%", "k-hat": r.khat, "seconds": seconds}
    res = SectionResult("Distillation: a flow fitted to an unnormalised energy", [row])
    res.text = (f"`pyroflows.infer.distill` fitted `flows.nsf(2)` to exp(-U1) by reverse KL ({steps} steps of 256 "
                f"samples, tempered over the first half). Its importance-sampled log Z is {r.log_z:.4f} +- "
                f"{r.log_z_se:.4f} against {exact:.4f} by quadrature (error {abs(r.log_z - exact):.4f}).")

    def draw():
        from . import plot

        with torch.no_grad():
            fig = plot.compare_2d(lambda z: -_u1(z), flow, samples=flow.sample((1000,)),
                                  titles=("exp(-U1), unnormalised", "distilled flow"))
        fig.savefig(ctx.out / "distill_u1.png", dpi=100)
        plot.close(fig)
        return ["distill_u1.png"]

    res.figures += _try_plot(draw)
    return res


#: The demo's sections, in order.  A later feature (e.g. a VAE) adds a function
#: ``DemoContext -> SectionResult`` here.
DEMO_SECTIONS: list[Callable[[DemoContext], SectionResult]] = [demo_density_1d, demo_density_2d,
                                                                demo_svi_guide, demo_distillation]


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def run_demo(ctx: DemoContext, sections=None) -> list[SectionResult]:
    """Run the demo sections, print a summary table and write ``report.md`` to ``ctx.out``."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    results = []
    for section in sections or DEMO_SECTIONS:
        res = section(ctx)
        results.append(res)
        for row in res.rows:
            print(f"{res.title}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()), flush=True)
    lines = ["# pyroflows demo report", "",
             (f"{'Quick run' if ctx.quick else 'Full run'}, seed {ctx.seed}. NLL in nats per row "
              "(lower is better; the true density's NLL on the same test rows is the floor a perfect "
              "model reaches, and its expectation is the entropy)."), ""]
    for res in results:
        lines += [f"## {res.title}", "", res.text, ""]
        if res.rows:
            keys = list(res.rows[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in res.rows]
            lines.append("")
        lines += [f"![{f}]({f})" for f in res.figures] + [""]
    (ctx.out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"report written to {ctx.out / 'report.md'}")
    return results


def cmd_demo(args) -> int:
    run_demo(DemoContext(Path(args.out), quick=args.quick, seed=args.seed, flow=args.flow,
                         progress=not args.quiet))
    return 0


# ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyroflows", description="Normalizing flows for Pyro.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="fit flows to built-in data and write a report")
    d.add_argument("--out", default="demo_report", help="report folder (default demo_report/)")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    d.add_argument("--flow", default="auto", help="architecture for the 2-D section (default auto)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fit", help="fit a flow to the rows of a CSV file")
    f.add_argument("data", help="CSV file of numbers (optional header row)")
    f.add_argument("--flow", default="auto",
                   help="architecture name (default auto: a full-covariance Gaussian stage, plus spline "
                        "couplings sized to the data only if they beat it on the validation rows)")
    f.add_argument("--out", default="model.pt", help="model file to write (default model.pt)")
    f.add_argument("--epochs", type=int, default=200)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    f.add_argument("--val-fraction", type=float, default=0.1, help="rows held out for validation")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="draw samples from a fitted model as CSV")
    s.add_argument("model")
    s.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--out", default=None, help="CSV file (default standard output)")
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("score", help="per-row log density and anomaly flag",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score the rows of DATA with a fitted model.",
                       epilog="output: CSV with a header and one row per input row:\n"
                              "  log_prob  log density of the row in the data's units (nats; the\n"
                              "            standardisation's Jacobian included)\n"
                              "  anomaly   1 if log_prob is below the threshold, else 0\n"
                              "The threshold is the --quantile quantile of the training rows' log\n"
                              "densities (stored in the model file); it is printed on standard error.")
    c.add_argument("model")
    c.add_argument("data")
    c.add_argument("--quantile", type=float, default=0.01,
                   help="flag rows whose log density is below this quantile of the training rows'")
    c.add_argument("--out", default=None, help="CSV file (default standard output)")
    c.set_defaults(func=cmd_score)
    return p


def main(argv=None) -> int:
    """Entry point of the ``pyroflows`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"pyroflows: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FloatingPointError) as e:
        print(f"pyroflows: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyroflows: interrupted", file=sys.stderr)
        return 130
