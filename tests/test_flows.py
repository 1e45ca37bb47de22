"""Named architectures: build, train a few steps, finite log_prob; conditional variants."""

from __future__ import annotations

import pytest
import torch

import pyroflows
from pyroflows import flows

ARCHS = {
    "nice": flows.nice,
    "realnvp": flows.realnvp,
    "nsf": flows.nsf,
    "nsf_autoregressive": lambda d, **kw: flows.nsf(d, autoregressive=True, **kw),
    "realnvp_lu": lambda d, **kw: flows.realnvp(d, mixing="lu", **kw),
    "maf": flows.maf,
    "iaf": flows.iaf,
}


def _toy(n=256, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g)
    return torch.cat([z[:, :1], 0.5 * z[:, 1:] + z[:, :1] ** 2], dim=1)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_builds_trains_and_scores(name):
    torch.manual_seed(0)
    flow = ARCHS[name](3, num_layers=2, hidden_dims=(16, 16))
    assert isinstance(flow, pyroflows.Flow)
    data = _toy()
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        s = flow.sample((50,))
        assert s.shape == (50, 3)
        assert torch.isfinite(flow.log_prob(s)).all()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_conditional_variant_depends_on_context(name):
    torch.manual_seed(0)
    flow = ARCHS[name](3, num_layers=2, hidden_dims=(16,), context_dim=2)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = _toy(8)
    c1, c2 = torch.zeros(2), torch.ones(2)
    lp1, lp2 = flow(c1).log_prob(x), flow(c2).log_prob(x)
    assert torch.isfinite(lp1).all() and not torch.allclose(lp1, lp2)
    batch_context = torch.randn(8, 2)
    assert flow(batch_context).sample().shape == (8, 3)
    assert flow.log_prob(x, batch_context).shape == (8,)


def test_defaults_build_and_one_dimension():
    for name in ("nice", "realnvp", "nsf", "maf", "iaf"):
        assert isinstance(getattr(flows, name)(4), pyroflows.Flow)
    with pytest.raises(ValueError, match="input_dim >= 2"):
        flows.realnvp(1)
    for f in (flows.nsf, flows.maf, flows.iaf):  # 1-D: autoregressive forms exist
        assert torch.isfinite(f(1, num_layers=1).log_prob(torch.randn(4, 1))).all()
    with pytest.raises(ValueError, match="num_layers"):
        flows.maf(3, num_layers=0)
    with pytest.raises(ValueError, match="mixing"):
        flows.realnvp(3, mixing="shuffle")
