"""The eager speed-benchmark adapter (benchmarks/peers_pyroflows.py) builds each architecture and
answers the harness's calls: a stale adapter would only show up as FAILED rows in a benchmark run."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers_pyroflows.py"


def _load():
    spec = importlib.util.spec_from_file_location("peers_pyroflows", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["affine_coupling", "spline_coupling", "maf"])
def test_eager_adapter_answers_the_harness(kind):
    spec = {"kind": kind, "D": 4, "layers": 2, "hidden": [8, 8], "bins": 4, "bound": 3.0}
    torch.manual_seed(0)
    m = _load().build_pyroflows(spec)
    x = torch.randn(5, 4)
    lp = m.log_prob(x)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    assert m.sample(3).shape == (3, 4)
    with torch.no_grad():
        assert torch.allclose(m.roundtrip(x), x, atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) > 0 and m.notes
