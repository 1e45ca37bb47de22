"""The documentation's moving parts, checked without building it (CI runs `make docs`)."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_conf_generates_api_for_every_module_and_the_tour_table():
    ns = runpy.run_path(str(DOCS / "conf.py"))
    api = (DOCS / "_autogen" / "api_modules.rst").read_text()
    for module in ["pyroflows.train", "pyroflows.data", "pyroflows.flow", "pyroflows.plot", "pyroflows.cli",
                   "pyroflows.transforms.base", "pyroflows.transforms.elementwise"]:
        assert f".. automodule:: {module}" in api
    assert "pyroflows.__main__" not in api
    table = (DOCS / "_autogen" / "tour_table.rst").read_text()
    assert all(sec in table for sec in ["16.1", "16.2", "16.3.1", "16.4.1", "16.5"])
    for _, _, _, example in ns["TOUR"]:
        if example and example.startswith("examples/"):
            assert (ROOT / example).exists(), example


def test_every_page_in_a_toctree_exists():
    pages, in_toctree = [], False
    for ln in (DOCS / "index.rst").read_text().splitlines():
        if ln.startswith(".. "):
            in_toctree = ln.startswith(".. toctree::")
        elif in_toctree and ln.startswith("   ") and not ln.strip().startswith(":"):
            pages.append(ln.strip())
    assert "scaling" in pages and "tour" in pages and "api" in pages
    for page in pages:
        assert (DOCS / f"{page}.rst").exists() or (DOCS / f"{page}.md").exists(), page


def test_readme_quick_start_is_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start")[1].split("```")[1]
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["make demo", "make test"]


def test_ci_runs_the_tests_and_the_docs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make docs" in ci
    assert "sphinx -W" in (ROOT / "Makefile").read_text()


def test_example_one_d_flow_runs(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "one_d.png"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "one_d_flow.py"), "--epochs", "3",
                        "--out", str(out)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 10_000 and "test NLL" in r.stdout
