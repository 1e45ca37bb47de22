"""Smoke test of benchmarks/quality_2d.py at a toy budget: structure and finiteness, no quality claim."""

import math

import pytest
import torch
from scripts import load_script

pytest.importorskip("zuko")


def _load():
    return load_script("benchmarks/quality_2d.py")


KEYS = {"density", "model", "params", "steps", "batch_size", "lr", "n_test", "seed", "kl", "se", "test_nll",
        "entropy", "train_nll", "train_wall_s", "train_cpu_s", "nonfinite"}


def test_run_tiny_budget_table(tmp_path):
    q = _load()
    torch.manual_seed(0)
    models = ("zuko_nsf", "nsf", "iresnet")
    densities = ("two_moons",)
    seen = []
    rows = q.run(densities, models, steps=2, batch_size=32, n_test=200, on_row=seen.append)
    assert len(rows) == len(seen) == len(models) * len(densities)
    assert {(r["density"], r["model"]) for r in rows} == {(d, m) for d in densities for m in models}
    for r in rows:
        assert set(r) == KEYS
        assert r["params"] > 0 and r["steps"] == 2 and r["nonfinite"] == 0
        for k in ("kl", "se", "test_nll", "entropy", "train_nll"):
            assert math.isfinite(r[k]), (r["model"], k, r[k])
        # the KL estimate is test NLL minus the entropy estimate on the same points
        assert r["kl"] == pytest.approx(r["test_nll"] - r["entropy"], abs=1e-9)
        assert r["se"] > 0
    # equal parameter budgets: every model within 3% of zuko's NSF
    ref = next(r["params"] for r in rows if r["model"] == "zuko_nsf")
    assert all(abs(r["params"] - ref) <= 0.03 * ref for r in rows)
    out = tmp_path / "table.md"
    q.write_markdown(rows, out, ["python benchmarks/quality_2d.py --steps 2"], tmp_path)
    text = out.read_text()
    assert "| density | zuko_nsf | nsf | iresnet |" in text
    assert text.count("±") >= len(rows)


def test_exact_log_det_switch():
    q = _load()
    model = q.build("iresnet")
    assert q._set_exact_log_det(model) == 6
    assert all(m.log_det == "exact" for m in model.modules() if hasattr(m, "exact_log_det"))


def test_unknown_model_is_a_clear_error():
    q = _load()
    with pytest.raises(ValueError, match="unknown model"):
        q.build("glowy")
