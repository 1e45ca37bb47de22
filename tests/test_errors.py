"""Clear errors across the public API, and parameters unchanged after any failed call."""

import inspect

import pytest
import torch

from pyroflows import Flow
from pyroflows.train import fit
from pyroflows.transforms.elementwise import elementwise


def flow2d():
    torch.manual_seed(0)
    f = Flow([elementwise(2, kind="affine"), elementwise(2, kind="piecewise_linear")])
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f


def snapshot(flow):
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def unchanged(flow, before):
    return all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())


def rows(n=20):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


BAD_DATA = [
    (lambda: torch.cat([rows(5), torch.tensor([[float("nan"), 0.0]]), rows(3),
                        torch.tensor([[0.0, float("inf")]])]), r"NaN or infinite.*2 row\(s\): 5, 9"),
    (lambda: rows(5)[:, :1].repeat(1, 3), r"wrong width: expected rows of shape \(2,\), got \(3,\)"),
    (lambda: torch.zeros(0, 2), "empty"),
    (lambda: torch.zeros(8), r"1-D shape \(8,\).*reshape"),
    (lambda: torch.zeros(2, 2, 2), r"wrong width"),
    (lambda: [[0.0, "a"]], "numeric"),
]


@pytest.mark.parametrize("make,match", BAD_DATA)
def test_fit_rejects_bad_data_before_touching_parameters(make, match):
    flow = flow2d()
    before = snapshot(flow)
    with pytest.raises(ValueError, match=match):
        fit(flow, make(), epochs=2, batch_size=4, lr=0.1, progress=False)
    assert unchanged(flow, before)


@pytest.mark.parametrize("make,match", BAD_DATA[:3])
def test_fit_rejects_bad_validation_data(make, match):
    flow = flow2d()
    before = snapshot(flow)
    with pytest.raises(ValueError, match="val_data"):
        fit(flow, rows(), val_data=make(), epochs=2, batch_size=4, lr=0.1, progress=False)
    assert unchanged(flow, before)


@pytest.mark.parametrize("kw,match", [
    ({"epochs": -1}, "epochs"), ({"epochs": 2.5}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"patience": 0}, "patience"),
    ({"clip_grad": -1.0}, "clip_grad"), ({"resume": True}, "checkpoint"),
    ({"context": torch.zeros(20, 3)}, "not conditional"), ({"val_context": torch.zeros(3, 3)}, "val_data"),
])
def test_fit_rejects_bad_arguments(kw, match):
    flow = flow2d()
    before = snapshot(flow)
    args = {"epochs": 2, "batch_size": 4, "lr": 0.1, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        fit(flow, rows(), **args)
    assert unchanged(flow, before)


def test_fit_rejects_non_flows_and_non_arrays():
    with pytest.raises(TypeError, match="log_prob"):
        fit(torch.nn.Linear(2, 2), rows(), epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(TypeError, match="numpy"):
        fit(flow2d(), "data.csv", epochs=1, batch_size=4, lr=0.1)


def test_flow_log_prob_names_the_expected_shape():
    flow = flow2d()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        flow.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="not conditional"):
        flow(torch.zeros(3))


def test_make_flow_unknown_name():
    from pyroflows.flows import make_flow

    with pytest.raises(ValueError, match="unknown flow architecture 'nope'; available: .*elementwise"):
        make_flow("nope", 2)


def test_plot_errors():
    pytest.importorskip("matplotlib")
    from pyroflows import plot

    with pytest.raises(ValueError, match="bounds"):
        plot.density_2d(flow2d(), bounds=(1, 0, 0, 1))
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 2\)"):
        plot.density_2d(flow2d(), samples=torch.zeros(4, 3), grid=10)
    with pytest.raises(ValueError, match="2-D points"):
        plot.flow_layers_2d(Flow([elementwise(3, kind="affine")]))
    with pytest.raises(ValueError, match="square"):
        plot.image_grid(torch.zeros(4, 10))
    with pytest.raises(TypeError, match="History"):
        plot.training_curves([1.0, 2.0])


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    import builtins

    from pyroflows import plot

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'pyroflows\[plot\]'"):
        plot.density_2d(flow2d())


# ---- inference API (checked once pyroflows.infer lands) -----------------------------------
def _infer():
    try:
        from pyroflows import infer
    except ImportError:
        pytest.skip("pyroflows.infer not available yet")
    return infer


def test_autoflow_rejects_a_discrete_latent():
    infer = _infer()
    if not hasattr(infer, "AutoFlow"):
        pytest.skip("AutoFlow not available yet")
    import pyro
    import pyro.distributions as dist

    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    with pytest.raises((ValueError, NotImplementedError), match="(?i)discrete"):
        guide = infer.AutoFlow(model)
        guide()


def test_distill_rejects_a_log_density_of_the_wrong_shape():
    infer = _infer()
    if not hasattr(infer, "distill"):
        pytest.skip("distill not available yet")
    flow = flow2d()
    before = snapshot(flow)
    kw = {k: v for k, v in {"num_steps": 2, "num_samples": 8, "lr": 0.01}.items()
          if k in inspect.signature(infer.distill).parameters}
    with pytest.raises(ValueError, match="(?i)shape"):
        infer.distill(flow, lambda z: z.sum(-1, keepdim=True), **kw)
    assert unchanged(flow, before)


def test_conditional_flow_context_errors():
    from pyroflows.transforms.elementwise import conditional_elementwise

    flow = Flow([conditional_elementwise(2, 3, kind="affine")])
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"conditional: call it with a context of shape \(\.\.\., 3\)"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match=r"expected a context of shape \(\.\.\., 3\), got \(4, 2\)"):
        flow.log_prob(x, torch.zeros(4, 2))
    before = snapshot(flow)
    with pytest.raises(ValueError, match="conditional: pass context="):
        fit(flow, x, epochs=1, batch_size=2, lr=0.1, progress=False)
    with pytest.raises(ValueError, match=r"context has the wrong width: expected rows of shape \(3,\), got \(2,\)"):
        fit(flow, x, context=torch.zeros(4, 2), epochs=1, batch_size=2, lr=0.1, progress=False)
    with pytest.raises(ValueError, match=r"context has NaN or infinite values in 1 row\(s\): 2"):
        c = torch.zeros(4, 3)
        c[2, 1] = float("nan")
        fit(flow, x, context=c, epochs=1, batch_size=2, lr=0.1, progress=False)
    assert unchanged(flow, before)
    # and with a correct context it trains
    h = fit(flow, torch.randn(64, 2), context=torch.randn(64, 3), epochs=2, batch_size=16, lr=0.01,
            progress=False)
    assert len(h.train_nll) == 2


# ---- one policy for non-finite losses (pyroflows.train.NonFiniteGuard), in distill too ----
def _gaussian_energy(nan_grad_calls):
    """A standard normal log density whose gradient is NaN (its value finite) on the given calls."""
    calls = []

    def log_density(x):
        calls.append(1)
        lp = -0.5 * (x ** 2).sum(-1)
        if len(calls) in nan_grad_calls:
            lp = lp + 0 * torch.sqrt(0 * x[..., 0])  # value 0, gradient 0 * inf = NaN
        return lp

    return log_density


def test_distill_skips_a_non_finite_step_like_fit():
    from pyroflows.flows import maf
    from pyroflows.infer import distill

    torch.manual_seed(0)
    flow = maf(2, num_layers=1)
    with pytest.warns(RuntimeWarning, match="distill: skipped a step"):
        r = distill(flow, _gaussian_energy({3}), num_steps=20, num_samples=64, lr=1e-2, progress=False,
                    num_eval_samples=256)
    assert r.skipped_steps == 1 and len(r.losses) == 20
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_distill_stops_after_consecutive_non_finite_steps_with_the_last_good_parameters():
    from pyroflows.flows import maf
    from pyroflows.infer import distill

    torch.manual_seed(0)
    flow = maf(2, num_layers=1)
    distill(flow, _gaussian_energy(set()), num_steps=2, num_samples=64, lr=1e-2, progress=False,
            num_eval_samples=64)
    good = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="3 consecutive steps"):
        distill(flow, _gaussian_energy(set(range(1, 100))), num_steps=10, num_samples=64, lr=1e-2,
                progress=False, max_nonfinite=3)
    assert all(torch.equal(v, good[k]) for k, v in flow.state_dict().items())
