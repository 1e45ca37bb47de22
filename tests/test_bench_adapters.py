"""The eager speed-benchmark adapter (benchmarks/peers_pyroflows.py) builds each architecture and
answers the harness's calls: a stale adapter would only show up as FAILED rows in a benchmark run."""

import pytest
import torch
from scripts import load_script


@pytest.mark.parametrize("kind", ["affine_coupling", "spline_coupling", "maf"])
def test_eager_adapter_answers_the_harness(kind):
    spec = {"kind": kind, "D": 4, "layers": 2, "hidden": [8, 8], "bins": 4, "bound": 3.0}
    torch.manual_seed(0)
    m = load_script("benchmarks/peers_pyroflows.py").build_pyroflows(spec)
    x = torch.randn(5, 4)
    lp = m.log_prob(x)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    assert m.sample(3).shape == (3, 4)
    with torch.no_grad():
        assert torch.allclose(m.roundtrip(x), x, atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) > 0 and m.notes
