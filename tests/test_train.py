"""pyroflows.train.fit: maximum likelihood, validation, early stopping, guards, checkpoints."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pyroflows import Flow
from pyroflows.train import History, fit
from pyroflows.transforms.base import ConditionalBijector
from pyroflows.transforms.elementwise import elementwise

MEAN = torch.tensor([1.0, -2.0])
STD = torch.tensor([2.0, 0.5])
# differential entropy of N(MEAN, diag(STD^2)): the NLL a perfect model reaches
ENTROPY = float(0.5 * 2 * (1 + math.log(2 * math.pi)) + STD.log().sum())


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, 2, generator=g)


def affine_flow(seed=0):
    torch.manual_seed(seed)
    return Flow([elementwise(2, kind="affine")])


def params(flow):
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_reaches_the_entropy():
    flow = affine_flow()
    hist = fit(flow, gaussian_data(2000), epochs=40, batch_size=200, lr=0.05, progress=False, seed=0)
    assert isinstance(hist, History) and len(hist.train_nll) == 40 and hist.val_nll == []
    test = gaussian_data(4000, seed=1)
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    assert hist.train_nll[-1] < hist.train_nll[0] - 0.5
    assert abs(nll - ENTROPY) < 0.05


def test_numpy_data_and_validation_history():
    flow = affine_flow()
    x = gaussian_data(600).numpy()
    hist = fit(flow, x, epochs=5, batch_size=100, lr=0.05, val_data=gaussian_data(200, 1).numpy(),
               progress=False, seed=0)
    assert len(hist.val_nll) == 5 and all(np.isfinite(hist.val_nll))


def test_early_stopping_restores_best_parameters():
    # the validation rows come from another density: the validation NLL bottoms out, then rises
    flow = affine_flow()
    val = gaussian_data(300, 2) * 0.3
    hist = fit(flow, gaussian_data(1000), epochs=60, batch_size=100, lr=0.05, val_data=val,
               patience=3, progress=False, seed=0)
    assert hist.stopped_early and len(hist.val_nll) < 60
    assert hist.best_epoch == int(np.argmin(hist.val_nll))
    assert len(hist.val_nll) == hist.best_epoch + 4
    with torch.no_grad():
        now = float(-flow.log_prob(val).mean())
    assert now == pytest.approx(min(hist.val_nll), abs=1e-5)


def test_seed_makes_training_reproducible():
    a, b = affine_flow(), affine_flow()
    fit(a, gaussian_data(300), epochs=3, batch_size=64, lr=0.01, progress=False, seed=5)
    fit(b, gaussian_data(300), epochs=3, batch_size=64, lr=0.01, progress=False, seed=5)
    assert same(params(a), params(b))


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    ck = tmp_path / "ck.pt"
    x = gaussian_data(300)
    straight = affine_flow()
    h0 = fit(straight, x, epochs=5, batch_size=64, lr=0.02, progress=False, seed=1)
    first = affine_flow()
    fit(first, x, epochs=3, batch_size=64, lr=0.02, progress=False, seed=1, checkpoint=ck)
    assert ck.exists()
    resumed = affine_flow(seed=123)  # different initial parameters: they come from the checkpoint
    h = fit(resumed, x, epochs=5, batch_size=64, lr=0.02, progress=False, seed=1, checkpoint=ck, resume=True)
    assert h.resumed_from == 3 and len(h.train_nll) == 5
    assert h.train_nll == h0.train_nll  # exact: same batches, same optimizer state
    assert same(params(straight), params(resumed))


def test_resume_without_file_starts_fresh(tmp_path):
    h = fit(affine_flow(), gaussian_data(100), epochs=2, batch_size=50, lr=0.01, progress=False,
            checkpoint=tmp_path / "none.pt", resume=True)
    assert h.resumed_from == 0 and len(h.train_nll) == 2


class Exploding(nn.Module):
    """A 1-D model whose log density is NaN once its parameter passes 2 (log of a negative)."""

    event_shape = (1,)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def log_prob(self, x):
        return -0.5 * (x[..., 0] - 10 * self.w) ** 2 + torch.log(2.0 - self.w)


def test_non_finite_step_is_skipped_restored_and_counted():
    """One policy (NonFiniteGuard): a step with a NaN loss is skipped, the parameters go back to
    the last finite ones, a warning is issued and the skip is counted; training goes on."""
    model = Exploding()
    x = torch.full((64, 1), 30.0)
    with pytest.warns(RuntimeWarning, match="skipped a step with a non-finite loss"):
        hist = fit(model, x, epochs=50, batch_size=16, lr=0.9, clip_grad=None, progress=False)
    assert hist.skipped_steps >= 1 and len(hist.train_nll) == 50
    assert all(math.isfinite(v) for v in hist.train_nll)
    w = float(model.w.detach())
    assert math.isfinite(w) and w < 2.0
    assert math.isfinite(float(model.log_prob(x).mean().detach()))


class AlwaysNaN(Exploding):
    """Its log density is NaN at every x > 1, whatever the parameter."""

    def log_prob(self, x):
        return -0.5 * (x[..., 0] - self.w) ** 2 + torch.log(1.0 - x[..., 0])


def test_non_finite_steps_in_a_row_stop_with_the_last_good_parameters():
    model = AlwaysNaN()
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="non-finite loss or gradient in 3 "
                                                                               "consecutive steps"):
        fit(model, torch.full((64, 1), 2.0), epochs=5, batch_size=16, lr=0.1, progress=False, max_nonfinite=3)
    assert float(model.w.detach()) == 0.0  # never moved: no step had a finite loss


def test_gradient_clipping_bounds_the_step():
    # clipping to a tiny norm changes the trajectory (Adam rescales, but the moments differ)
    a, b = affine_flow(), affine_flow()
    x = gaussian_data(200) * 50
    fit(a, x, epochs=2, batch_size=50, lr=0.01, clip_grad=1e-3, progress=False, seed=0)
    fit(b, x, epochs=2, batch_size=50, lr=0.01, clip_grad=None, progress=False, seed=0)
    assert all(torch.isfinite(v).all() for v in params(a).values())
    assert not same(params(a), params(b))


def test_progress_bar_is_quiet_off_a_terminal(capsys):
    fit(affine_flow(), gaussian_data(100), epochs=2, batch_size=50, lr=0.01, progress=None)  # auto
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_device_argument():
    flow = affine_flow()
    fit(flow, gaussian_data(100), epochs=1, batch_size=50, lr=0.01, progress=False, device="cpu")
    assert next(flow.parameters()).device.type == "cpu"


def test_zero_epochs_leaves_parameters():
    flow = affine_flow()
    before = params(flow)
    h = fit(flow, gaussian_data(10), epochs=0, batch_size=5, lr=0.01, progress=False)
    assert h.train_nll == [] and same(before, params(flow))


# ---- conditional flows: fit(..., context=...) ------------------------------------------
class ConditionalAffine(ConditionalBijector):
    """y = x * exp(s(c)) + t(c) with (t, s) linear in the context (a test-only layer)."""

    def __init__(self, dim, context_dim):
        super().__init__()
        self.event_shape, self.context_dim = (dim,), context_dim
        self.net = nn.Linear(context_dim, 2 * dim)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def _ts(self, context):
        t, s = self.net(context).chunk(2, -1)
        return t, s

    def _call_and_ladj(self, x, context):
        t, s = self._ts(context)
        return x * s.exp() + t, s.sum(-1).expand(x.shape[:-1])

    def _inverse_and_ladj(self, y, context):
        t, s = self._ts(context)
        return (y - t) * (-s).exp(), s.sum(-1).expand(y.shape[:-1])


def conditional_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 1, generator=g)
    return 3 * c + 0.5 * torch.randn(n, 1, generator=g), c


def test_fit_conditional_flow_with_context():
    torch.manual_seed(0)
    flow = Flow([ConditionalAffine(1, 1)])
    x, c = conditional_data(2000)
    xv, cv = conditional_data(500, seed=1)
    hist = fit(flow, x, context=c, val_data=xv, val_context=cv, epochs=60, batch_size=200, lr=0.05,
               progress=False, seed=0)
    entropy = 0.5 * (1 + math.log(2 * math.pi)) + math.log(0.5)  # of the noise given the context
    assert abs(hist.val_nll[hist.best_epoch] - entropy) < 0.05


@pytest.mark.parametrize("kw,match", [
    ({}, "conditional: pass context="),
    ({"context": torch.zeros(50, 2)}, r"context has the wrong width: expected rows of shape \(1,\)"),
    ({"context": torch.zeros(49, 1)}, "context has 49 rows but the data have 50"),
    ({"context": torch.zeros(50, 1), "val_data": torch.zeros(5, 1)}, "val_context"),
])
def test_conditional_context_errors_leave_parameters(kw, match):
    flow = Flow([ConditionalAffine(1, 1)])
    before = params(flow)
    with pytest.raises(ValueError, match=match):
        fit(flow, torch.zeros(50, 1), epochs=1, batch_size=10, lr=0.1, progress=False, **kw)
    assert same(before, params(flow))


def _bad_checkpoints(tmp_path):
    """(file, expected message) pairs: every way a checkpoint can be wrong."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    fit(Flow([elementwise(3, kind="affine")]), torch.zeros(10, 3), epochs=1, batch_size=5, lr=0.01,
        progress=False, checkpoint=other)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(other.read_bytes()[:200])
    plain = tmp_path / "plain.pt"
    torch.save({"flow": affine_flow().state_dict()}, plain)  # another program's file: no format tag
    return [(junk, "not a pyroflows file"), (other, "different flow architecture"),
            (truncated, "truncated or corrupted"), (plain, "not a pyroflows training checkpoint")]


def test_resume_from_a_bad_checkpoint_leaves_parameters_and_file(tmp_path):
    for path, match in _bad_checkpoints(tmp_path):
        flow = affine_flow()
        before, content = params(flow), path.read_bytes()
        with pytest.raises(ValueError, match=match) as e:
            fit(flow, gaussian_data(10), epochs=2, batch_size=5, lr=0.01, progress=False, checkpoint=path,
                resume=True)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
        assert same(before, params(flow)) and path.read_bytes() == content  # nothing changed or written


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from hostile import write_hostile

    marker = tmp_path / "ran"
    ck = write_hostile(tmp_path / "ck.pt", marker, "checkpoint")
    content = ck.read_bytes()
    flow = affine_flow()
    before = params(flow)
    with pytest.raises(ValueError, match="refused"):
        fit(flow, gaussian_data(10), epochs=2, batch_size=5, lr=0.01, progress=False, checkpoint=ck, resume=True)
    assert not marker.exists()  # the payload never ran
    assert same(before, params(flow)) and ck.read_bytes() == content
