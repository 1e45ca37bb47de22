"""Sphinx configuration for pyroflows (built with ``make docs``: ``sphinx-build -W``).

The API reference and the list of benchmark pages are generated here at
build time from what exists, so a module or a ``bench_*.md`` table added on
another branch appears without editing the docs, and a module that does not
exist yet is simply absent (never a warning).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

project = "pyroflows"
author = "the pyroflows developers"
copyright = "2026, the pyroflows developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_autogen", "Thumbs.db", ".DS_Store"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# links from the Markdown notes to files outside the docs (the repository's
# sources, ../shared/DESIGN.md) are fine on GitHub but not documents here
suppress_warnings = ["myst.xref_missing"]
html_theme = "alabaster"
html_static_path: list[str] = []

# modules that are not part of the reference (entry points, private helpers)
_SKIP = {"pyroflows.__main__"}


def _public_modules() -> list[str]:
    import pyroflows

    names = ["pyroflows"]
    for info in pkgutil.walk_packages(pyroflows.__path__, "pyroflows."):
        name = info.name
        if name in _SKIP or any(part.startswith("_") for part in name.split(".")[1:]):
            continue
        if _exists(name):
            names.append(name)
        else:
            print(f"[pyroflows docs] skipping {name}: not importable here")
    return sorted(names)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)
    if not path.exists() or path.read_text() != text:  # keep mtimes stable for incremental builds
        path.write_text(text)


def _generate() -> None:
    out = HERE / "_autogen"
    api = []
    for name in _public_modules():
        api += [f".. _api-{name}:", "", name, "-" * len(name), "", f".. automodule:: {name}", ""]
    _write(out / "api_modules.rst", "\n".join(api) + "\n")

    bench = sorted(p.stem for p in HERE.glob("bench_*.md"))
    lines = [".. toctree::", "   :maxdepth: 1", ""] + [f"   {b}" for b in bench]
    if not bench:
        lines = ["No benchmark tables have been written yet (``benchmarks/`` writes them to ``docs/bench_*.md``)."]
    _write(out / "benchmarks.rst", "\n".join(lines) + "\n")

    known = {"index", "developing"} | set(bench)
    extra = sorted(p.stem for p in HERE.glob("*.md") if p.stem not in known)
    lines = [".. toctree::", "   :maxdepth: 1", "   :caption: Notes", ""] + [f"   {e}" for e in extra]
    _write(out / "notes.rst", "\n".join(lines) + "\n" if extra else "\n")



# ----------------------------------------------------------------------
# the tour's map of the chapter to the code, with what exists marked
TOUR = [
    ("16.1", "A 1-D example: change of variables (eqs. 16.1-16.2)",
     ["pyroflows.transforms.elementwise", "pyroflows.flow"], "examples/one_d_flow.py"),
    ("16.2", "The general case: forward/inverse mappings, likelihood, sampling, training",
     ["pyroflows.flow", "pyroflows.transforms.base", "pyroflows.train"], "pyroflows demo"),
    ("16.3.1", "Linear flows (LU, triangular, Householder)", ["pyroflows.transforms.linear"], None),
    ("16.3.2", "Elementwise flows (leaky ReLU, piecewise linear, splines)",
     ["pyroflows.transforms.elementwise", "pyroflows.transforms.transformers"], "examples/one_d_flow.py"),
    ("16.3.3", "Coupling flows (NICE, RealNVP, NSF)",
     ["pyroflows.transforms.coupling", "pyroflows.flows"], None),
    ("16.3.4", "Autoregressive flows (MAF)", ["pyroflows.transforms.autoregressive", "pyroflows.nn"], None),
    ("16.3.5", "Inverse autoregressive flows (IAF)", ["pyroflows.transforms.autoregressive"], None),
    ("16.3.6", "Residual flows (iRevNet, i-ResNet)", ["pyroflows.transforms.residual"], None),
    ("16.3.7", "Multi-scale flows (Glow)",
     ["pyroflows.transforms.image", "pyroflows.transforms.multiscale", "pyroflows.transforms.memory"],
     "examples/glow.py"),
    ("16.4.1", "Modelling densities, anomaly detection",
     ["pyroflows.train", "pyroflows.data", "pyroflows.cli"], "pyroflows fit / score"),
    ("16.4.2", "Synthesis (images): dequantization, bits/dim, temperature, interpolation",
     ["pyroflows.images", "pyroflows.flows"], "examples/glow.py"),
    ("16.4.3", "Approximating other density models (distillation)", ["pyroflows.infer"], None),
    ("16.5", "Variational inference with flows (SVI guides)", ["pyroflows.infer"], None),
    ("16.5", "Classic VAE posteriors: planar, radial, Sylvester", ["pyroflows.transforms.planar"], None),
]


def _exists(module: str) -> bool:
    """Importable and a real module (an empty folder is a namespace package without a file)."""
    try:
        return getattr(importlib.import_module(module), "__file__", None) is not None
    except Exception:  # noqa: BLE001
        return False


def _tour_table() -> None:
    rows = [".. list-table::", "   :header-rows: 1", "   :widths: 8 40 36 16", "",
            "   * - Section", "     - Topic", "     - Code", "     - Example"]
    for sec, topic, modules, example in TOUR:
        code = ", ".join(f":ref:`{m} <api-{m}>`" if _exists(m) else f"``{m}`` (in progress)" for m in modules)
        rows += [f"   * - {sec}", f"     - {topic}", f"     - {code}",
                 f"     - ``{example}``" if example else "     - "]
    _write(HERE / "_autogen" / "tour_table.rst", "\n".join(rows) + "\n")


os.environ.setdefault("MPLBACKEND", "Agg")
_generate()
_tour_table()
