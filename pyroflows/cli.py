"""The ``pyroflows`` command line: ``demo``, ``fit``, ``sample``, ``score``.

::

    pyroflows demo [--quick] [--out demo_report/]
    pyroflows fit DATA.csv [--flow auto] [--out model.pt] [--epochs N] ...
    pyroflows sample model.pt -n N [--out samples.csv]
    pyroflows score model.pt DATA.csv [--quantile 0.01] [--out scores.csv]

Also available as ``python -m pyroflows``.  This module is argparse and the
commands only: architectures come from the registry in :mod:`pyroflows.flows`,
files are read and written by :mod:`pyroflows.io` (model files are read
safely: nothing in them is executed), and the demo lives in
:mod:`pyroflows.demo`.  Errors (missing, unreadable or malformed files, bad
options) are reported on one line, ``pyroflows: error: FILE: problem``, with
exit status 1 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .flows import available_flows, make_flow, resolve_flow_name
from .io import load_model, read_csv, save_model, write_csv

__all__ = ["CLIError", "build_parser", "main"]


class CLIError(Exception):
    """A bad option, reported to the user on one line (``pyroflows: error: ...``)."""


def _standardise(x: torch.Tensor):
    """Column means and standard deviations (1 where a column is constant or there is one row)."""
    mean = x.mean(0)
    std = x.std(0) if x.shape[0] > 1 else torch.ones(x.shape[1])
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _split(z: torch.Tensor, val_fraction: float, seed: int):
    """(train, validation) rows; no validation rows below 20 rows."""
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * z.shape[0]) if z.shape[0] >= 20 else 0
    return z[perm[n_val:]], z[perm[:n_val]]


def cmd_fit(args) -> int:
    from .train import fit

    if args.val_fraction is None:
        args.val_fraction = 0.2 if args.flow == "auto" else 0.1  # 0.2: what fit_auto was measured with
    if not 0 <= args.val_fraction < 1:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    x, header = read_csv(args.data)
    mean, std = _standardise(x)
    z = (x - mean) / std
    if args.flow == "auto" and x.shape[1] > 1:  # the size-aware default: a Gaussian stage, flow layers
        return _fit_auto(args, x, z, header, mean, std)  # only if they help (1-D: elementwise splines)
    train, val = _split(z, args.val_fraction, args.seed)
    torch.manual_seed(args.seed)
    name, kwargs = resolve_flow_name(args.flow, x.shape[1]), {}
    flow = make_flow(name, x.shape[1], **kwargs)
    hist = fit(flow, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               val_data=val if len(val) else None, patience=args.patience if len(val) else None,
               progress=None if not args.quiet else False, seed=args.seed)
    with torch.no_grad():
        train_lp = flow.log_prob(z) - std.log().sum()
    save_model(args.out, flow, flow_name=name, flow_kwargs=kwargs, mean=mean, std=std, columns=header,
               train_log_prob=train_lp, history=hist)
    nll = hist.val_nll[hist.best_epoch] if hist.val_nll else hist.train_nll[-1]
    print(f"fitted {name} to {x.shape[0]} rows x {x.shape[1]} columns in {hist.epochs} epochs; "
          f"{'validation' if hist.val_nll else 'training'} NLL {nll + float(std.log().sum()):.4f} nats/row; "
          f"saved {args.out}", file=sys.stderr)
    return 0


def _fit_auto(args, x, z, header, mean, std) -> int:
    from .auto import fit_auto

    # --epochs caps the flow layers' training; batch size, lr and weight decay are chosen by data size
    flow, report = fit_auto(z, val_fraction=args.val_fraction, seed=args.seed,
                            progress=None if not args.quiet else False, config={"epochs": args.epochs})
    with torch.no_grad():
        train_lp = flow.log_prob(z) - std.log().sum()
    save_model(args.out, flow, flow_name="auto_tabular", flow_kwargs=report.flow_kwargs, mean=mean, std=std,
               columns=header, train_log_prob=train_lp, history=report.history)
    print(f"{report.summary()}\nfitted to {x.shape[0]} rows x {x.shape[1]} columns; saved {args.out}",
          file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    if args.n < 0:
        raise CLIError(f"-n must be >= 0, got {args.n}")
    model = load_model(args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    write_csv(model.sample(args.n).tolist(), model.columns, args.out)
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
    threshold = float(torch.quantile(ref.double(), args.quantile))
    rows = [[float(v), int(v < threshold)] for v in lp.tolist()]
    write_csv(rows, ["log_prob", "anomaly"], args.out)
    source = "training" if model.train_log_prob is not None else "scored (the model file has no training scores)"
    print(f"threshold log p < {threshold:.4f} (the {args.quantile:g} quantile of the {len(ref)} {source} rows' "
          f"log densities): {sum(r[1] for r in rows)} of {len(rows)} rows flagged", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoContext, run_demo

    run_demo(DemoContext(Path(args.out), quick=args.quick, seed=args.seed, flow=args.flow,
                         progress=None if not args.quiet else False))
    return 0


# ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--flow`` choices are the registry's names and ``auto``."""
    p = argparse.ArgumentParser(prog="pyroflows", description="Normalizing flows for Pyro.")
    sub = p.add_subparsers(dest="command", required=True)
    flows = ["auto", *available_flows()]

    d = sub.add_parser("demo", help="fit flows to built-in data and write a report")
    d.add_argument("--out", default="demo_report", help="report folder (default demo_report/)")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    d.add_argument("--flow", default="auto", choices=flows, metavar="NAME",
                   help=f"architecture for the 2-D section: {', '.join(flows)} (default auto)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fit", help="fit a flow to the rows of a CSV file")
    f.add_argument("data", help="CSV file of numbers (optional header row)")
    f.add_argument("--flow", default="auto", choices=flows, metavar="NAME",
                   help=f"architecture: {', '.join(flows)} (default auto: a full-covariance Gaussian stage "
                        f"(a Gaussian mixture where cross-validation prefers one), plus spline couplings sized to "
                        f"the data only if they beat it on the validation rows)")
    f.add_argument("--out", default="model.pt", help="model file to write (default model.pt)")
    f.add_argument("--epochs", type=int, default=200)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    f.add_argument("--val-fraction", type=float, default=None,
                   help="rows held out for validation (default 0.2 with --flow auto, else 0.1)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="draw samples from a fitted model as CSV")
    s.add_argument("model", help="model file written by `pyroflows fit` (read safely)")
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
    c.add_argument("model", help="model file written by `pyroflows fit` (read safely)")
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
    except (CLIError, ValueError, FloatingPointError) as e:
        print(f"pyroflows: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
    except OSError as e:
        print(f"pyroflows: error: {e.filename or ''}: cannot write ({e.strerror or e})", file=sys.stderr)
    except KeyboardInterrupt:
        print("pyroflows: interrupted", file=sys.stderr)
        return 130
    return 1
