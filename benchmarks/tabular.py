r"""Density estimation and anomaly scores on small real tables: :func:`pyroflows.auto.fit_auto`
against the classical density estimators.

Data sets: scikit-learn's offline copies of iris (150 x 4), wine (178 x 13),
breast cancer (569 x 30), diabetes' features (442 x 10) and digits (1797 x 64).

**Preparation, identical for every method.**  Columns constant over the whole
data set are dropped (digits has three always-blank pixels: no method can say
anything about them).  Every column is dequantised once per seed: uniform
noise on :math:`[-q/2, q/2]` is added, with :math:`q` the column's recording
resolution (the smallest gap between its distinct values: 1 for the digits'
pixel counts, 0.1 for iris' centimetres, a tiny amount for finely recorded
columns), so a density cannot win by piling mass on repeated values (and a
column constant in a small training set still has a spread).  Then the rows
are split, and train and test are standardised with the training rows' mean
and standard deviation.  Log-likelihoods are in nats per row of these
standardised, dequantised rows: the same change of variables for all
methods, so differences between methods are exactly differences of their
log-likelihoods in the original units.

**Density estimation.**  Per seed, 30 % of the rows are the test set; the
training set is the first ``n`` of the remaining rows for ``n`` in
``--sizes`` (and all of them).  Methods:

* ``auto``: :func:`pyroflows.auto.fit_auto` with its defaults (seeded);
* ``gauss_ml``: the maximum-likelihood full-covariance Gaussian
  (``GaussianMixture(1, reg_covar=1e-6)``);
* ``gauss_lw``: the full-covariance Gaussian with Ledoit-Wolf shrinkage
  (``sklearn.covariance.LedoitWolf``);
* ``gmm_bic``: ``GaussianMixture`` with 1-6 components and full or diagonal
  covariances, the lowest BIC of the 12;
* ``kde``: a Gaussian ``KernelDensity`` with the bandwidth chosen by 5-fold
  cross-validated likelihood (``GridSearchCV`` over 20 values in
  :math:`[10^{-1.5}, 10^{0.5}]`).

**Anomalies** (the classification sets): per seed one class is held out as
the anomalies (class ``seed mod C``); the models are fitted to ``n`` rows of
the other classes, and scored on 30 % held-out normal rows plus every
anomaly row.  AUROC of the negative log density (``isoforest``: of
``-IsolationForest.score_samples``, 200 trees).

Raw results go one JSON line per run to ``--results``; ``--out`` is rewritten
from that file after every run.

Usage (the run reported in ``docs/bench_tabular.md``)::

    OMP_NUM_THREADS=1 python benchmarks/tabular.py --seeds 0,1,2
    python benchmarks/tabular.py --report-only --results benchmarks/tabular_results.jsonl --notes benchmarks/tabular_notes.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyroflows.auto import fit_auto  # noqa: E402

DATASETS = ("iris", "wine", "breast_cancer", "diabetes", "digits")
CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits")
DENSITY_METHODS = ("auto", "gauss_ml", "gauss_lw", "gmm_bic", "kde")
TEST_FRACTION = 0.3


# ----------------------------------------------------------------------
# data
def load(name: str):
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine,
              "breast_cancer": datasets.load_breast_cancer, "diabetes": datasets.load_diabetes,
              "digits": datasets.load_digits}[name]
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)
    return x[:, x.std(0) > 0], np.asarray(bunch.target)


def resolution(x: np.ndarray) -> np.ndarray:
    """Per column, the smallest gap between distinct values (the recording resolution)."""
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        gaps = np.diff(np.unique(x[:, j]))
        spread = np.ptp(x[:, j])
        gaps = gaps[gaps > 1e-9 * spread]
        out[j] = gaps.min()
    return out


def dequantise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + (rng.random(x.shape) - 0.5) * resolution(x)


def standardise(train, *others):
    m, s = train.mean(0), train.std(0)
    return [(a - m) / s for a in (train, *others)]


def sizes_for(pool: int, sizes) -> list[int]:
    return [n for n in sizes if n < pool] + [pool]


# ----------------------------------------------------------------------
# models: each returns a function rows -> per-row log density
def fit_density(method: str, train: np.ndarray, seed: int):
    from scipy.stats import multivariate_normal
    from sklearn.covariance import LedoitWolf
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KernelDensity

    info = {}
    if method == "auto":
        flow, report = fit_auto(torch.tensor(train), seed=seed, progress=False)
        info = {"chosen": report.chosen, "flow_kwargs": report.flow_kwargs, "summary": report.summary()}

        def score(x):
            with torch.no_grad():
                return flow.log_prob(torch.tensor(x, dtype=torch.float32)).double().numpy()
        return score, info
    if method == "gauss_ml":
        g = GaussianMixture(1, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(train)
        return g.score_samples, info
    if method == "gauss_lw":
        lw = LedoitWolf().fit(train)
        info = {"shrinkage": float(lw.shrinkage_)}
        return multivariate_normal(lw.location_, lw.covariance_, allow_singular=False).logpdf, info
    if method == "gmm_bic":
        best = None
        for cov in ("full", "diag"):
            for k in range(1, 7):
                if k * 2 > train.shape[0]:
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = GaussianMixture(k, covariance_type=cov, reg_covar=1e-6, random_state=seed).fit(train)
                bic = g.bic(train)
                if best is None or bic < best[0]:
                    best = (bic, g, k, cov)
        info = {"components": best[2], "covariance": best[3]}
        return best[1].score_samples, info
    if method == "kde":
        folds = min(5, train.shape[0])
        search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": np.logspace(-1.5, 0.5, 20)},
                              cv=folds).fit(train)
        info = {"bandwidth": float(search.best_params_["bandwidth"])}
        return search.best_estimator_.score_samples, info
    raise ValueError(method)


def density_run(name, x, seed, n, test, pool):
    train, test = standardise(pool[:n], test)
    row = {"task": "density", "dataset": name, "seed": seed, "n_train": n, "size": "all" if n == len(pool) else n,
           "n_test": len(test),
           "n_cols": x.shape[1], "ll": {}, "info": {}, "seconds": {}}
    lls = {}
    for method in DENSITY_METHODS:
        t0 = time.process_time()
        score, info = fit_density(method, train, seed)
        lls[method] = np.asarray(score(test), dtype=np.float64)
        row["seconds"][method] = round(time.process_time() - t0, 2)
        row["ll"][method] = float(lls[method].mean())
        row["info"][method] = info
    best_gauss = max(("gauss_ml", "gauss_lw"), key=lambda m: row["ll"][m])
    diff = lls["auto"] - lls[best_gauss]
    row["vs_gauss"] = {"against": best_gauss, "diff": float(diff.mean()),
                       "se": float(diff.std(ddof=1) / math.sqrt(len(diff)))}
    return row


def anomaly_run(name, x, y, seed, sizes):
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score

    classes = np.unique(y)
    anomaly_class = classes[seed % len(classes)]
    rng = np.random.default_rng(seed)
    xd = dequantise(x, rng)
    normal, anomalies = xd[y != anomaly_class], xd[y == anomaly_class]
    normal = normal[rng.permutation(len(normal))]
    n_test = round(TEST_FRACTION * len(normal))
    test_normal, pool = normal[:n_test], normal[n_test:]
    rows = []
    for n in sizes_for(len(pool), sizes):
        train, test = standardise(pool[:n], np.concatenate([test_normal, anomalies]))
        labels = np.r_[np.zeros(len(test_normal)), np.ones(len(anomalies))]
        row = {"task": "anomaly", "dataset": name, "seed": seed, "n_train": n, "size": "all" if n == len(pool) else n,
               "anomaly_class": int(anomaly_class),
               "n_test_normal": len(test_normal), "n_anomalies": len(anomalies), "auroc": {}, "info": {}}
        for method in DENSITY_METHODS:
            score, info = fit_density(method, train, seed)
            row["auroc"][method] = float(roc_auc_score(labels, -np.asarray(score(test))))
            row["info"][method] = info
        forest = IsolationForest(n_estimators=200, random_state=seed).fit(train)
        row["auroc"]["isoforest"] = float(roc_auc_score(labels, -forest.score_samples(test)))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------
# the table
def _fmt(v, digits=2):
    return f"{v:.{digits}f}"


def report(results: list[dict], commands: list[str]) -> str:
    out = ["# Small real tables: density estimation and anomaly scores", "",
           f"Generated by `benchmarks/tabular.py` ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC), "
           f"torch {torch.__version__}, Python {platform.python_version()}, 1 thread on a shared CPU.", "",
           "Commands:", "", "```", *commands, "```", "",
           "Protocol: see the docstring of `benchmarks/tabular.py` (dequantisation by each column's recording "
           "resolution, constant columns dropped, standardisation by the training rows, identical for every "
           "method; 30 % test rows per seed). `auto` is `pyroflows.auto.fit_auto` with its defaults.", ""]
    dens = [r for r in results if r["task"] == "density"]
    if dens:
        out += ["## Test log-likelihood (nats per row, higher is better)", "",
                "Mean over seeds. `auto - gauss` is the mean paired per-row difference against the better "
                "of the two full-covariance Gaussians, ± its standard error (pooled over the seeds' test rows); "
                "`auto's model` counts the seeds where `fit_auto` kept its flow layers (`F`) and where its "
                "stage was a Gaussian mixture (`M`), e.g. `F1 M2` (otherwise: the Gaussian stage alone).", "",
                "| data | n train | test rows | auto | gauss_ml | gauss_lw | gmm_bic | kde | auto - gauss | "
                "auto's model |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key in _groups(dens):
            rs = [r for r in dens if _key(r) == key]
            ll = {m: np.mean([r["ll"][m] for r in rs]) for m in DENSITY_METHODS}
            best = max(ll.values())
            cells = [f"**{_fmt(ll[m])}**" if ll[m] == best else _fmt(ll[m]) for m in DENSITY_METHODS]
            d = np.mean([r["vs_gauss"]["diff"] for r in rs])
            se = math.sqrt(sum(r["vs_gauss"]["se"] ** 2 for r in rs)) / len(rs)
            out.append(f"| {key[0]} | {_size_label(rs)} | {rs[0]['n_test']} | " + " | ".join(cells)
                       + f" | {d:+.2f} ± {se:.2f} | {_models(rs)} |")
        out.append("")
    anom = [r for r in results if r["task"] == "anomaly"]
    if anom:
        methods = (*DENSITY_METHODS, "isoforest")
        out += ["## Anomaly AUROC (one class held out, higher is better)", "",
                "Mean over seeds (seed s holds out class s mod C). `auto - best` is against the best "
                "baseline (every column but `auto`).", "",
                "| data | n train | " + " | ".join(methods) + " | auto - best | auto's model |",
                "|---|---|" + "---|" * (len(methods) + 2)]
        for key in _groups(anom):
            rs = [r for r in anom if _key(r) == key]
            au = {m: np.mean([r["auroc"][m] for r in rs]) for m in methods}
            best = max(au.values())
            cells = [f"**{au[m]:.3f}**" if au[m] == best else f"{au[m]:.3f}" for m in methods]
            base = max(v for m, v in au.items() if m != "auto")
            out.append(f"| {key[0]} | {_size_label(rs)} | " + " | ".join(cells) + f" | {au['auto'] - base:+.3f} | "
                       f"{_models(rs)} |")
        out.append("")
    return "\n".join(out)


def _models(rs) -> str:
    """``F<k> M<m>``: seeds with flow layers kept, seeds with a Gaussian-mixture stage."""
    flow = sum(r["info"]["auto"]["chosen"] == "flow" for r in rs)
    mixture = sum(r["info"]["auto"]["flow_kwargs"].get("mixture_components", 1) > 1 for r in rs)
    return f"F{flow} M{mixture}"


def _key(r):
    return r["dataset"], r["size"]


def _size_label(rs) -> str:
    ns = sorted({r["n_train"] for r in rs})
    if rs[0]["size"] != "all":
        return str(ns[0])
    return f"all ({ns[0]})" if len(ns) == 1 else f"all ({ns[0]}-{ns[-1]})"


def _groups(rows):
    seen = []
    for r in rows:
        if _key(r) not in seen:
            seen.append(_key(r))
    order = {d: i for i, d in enumerate(DATASETS)}
    return sorted(seen, key=lambda k: (order.get(k[0], 99), math.inf if k[1] == "all" else k[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--sizes", default="50,100,250", help="training sizes (all remaining rows are always added)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", default="density,anomaly")
    p.add_argument("--results", type=Path, default=Path("/tmp/bench_tabular.jsonl"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_tabular.md")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended under the tables")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/tabular.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report_only:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        for name in args.datasets.split(","):
            x, y = load(name)
            for seed in (int(s) for s in args.seeds.split(",")):
                new = []
                if "density" in args.tasks:
                    rng = np.random.default_rng(seed)
                    xd = dequantise(x, rng)[rng.permutation(len(x))]
                    n_test = round(TEST_FRACTION * len(xd))
                    test, pool = xd[:n_test], xd[n_test:]
                    new += [density_run(name, x, seed, n, test, pool) for n in sizes_for(len(pool), sizes)]
                if "anomaly" in args.tasks and name in CLASSIFICATION:
                    new += anomaly_run(name, x, y, seed, sizes)
                with open(args.results, "a") as f:
                    for r in new:
                        r["command"] = command
                        f.write(json.dumps(r) + "\n")
                for r in new:
                    print(r["task"], r["dataset"], r["seed"], r["n_train"],
                          json.dumps(r.get("ll") or r.get("auroc")), r["info"]["auto"]["chosen"], flush=True)
                _write(args)
    _write(args)


def _write(args):
    if not args.results.exists():
        return
    results = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    commands = list(dict.fromkeys(r["command"] for r in results))
    text = report(results, commands)
    if args.notes is not None and args.notes.exists():
        text += "\n" + args.notes.read_text()
    args.out.write_text(text)


if __name__ == "__main__":
    main()
