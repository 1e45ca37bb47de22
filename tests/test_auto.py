"""pyroflows.auto.fit_auto: the size-aware default for tables, never worse than its Gaussian stage."""

import math

import pytest
import torch

from pyroflows.auto import (
    SHRINKAGE_GRID,
    auto_flow,
    choose_config,
    choose_shrinkage,
    fit_auto,
    shrunk_covariance,
)


def _gaussian(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 5
    return torch.distributions.MultivariateNormal(mean, cov)


def test_gaussian_sample_test_ll_within_noise_of_the_truth():
    true = _gaussian()
    torch.manual_seed(1)
    train, test = true.sample((200,)), true.sample((4000,))
    flow, report = fit_auto(train, seed=0, progress=False)
    with torch.no_grad():
        diff = flow.log_prob(test.float()).double() - true.log_prob(test)
    se = float(diff.std() / math.sqrt(len(diff)))
    # a Gaussian fitted to 200 rows in 3-D loses ~ (3 + 6) / (2 * 200) = 0.02 nats/row in expectation
    assert float(diff.mean()) > -0.06 - 3 * se, report.summary()
    assert float(diff.mean()) < 3 * se, report.summary()  # it cannot beat the truth beyond noise


def test_fallback_to_the_gaussian_stage_when_the_flow_layers_do_not_help(capsys):
    true = _gaussian(d=4, seed=2)
    torch.manual_seed(0)
    x = true.sample((200,))
    # flow layers that cannot move (a vanishing step size) cannot beat the Gaussian stage
    flow, report = fit_auto(x, seed=0, progress=False, config={"epochs": 3, "lr": 1e-9})
    assert report.chosen == "gaussian" and report.flow_kwargs == {"num_layers": 0}
    assert "did not beat the Gaussian stage" in report.summary()
    assert report.gaussian_val_ll is not None and report.flow_val_ll is not None
    assert len(flow.transforms) == 1  # the Triangular Gaussian stage alone
    # the returned model is a Gaussian fitted to all rows: mean and (shrunk) covariance of x
    cov, _ = shrunk_covariance(x, alpha=report.shrinkage)
    ref = torch.distributions.MultivariateNormal(x.mean(0), cov)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(x.float()).double(), ref.log_prob(x), atol=1e-3)


def test_flow_layers_kept_on_non_gaussian_data_and_rebuild_from_the_report():
    torch.manual_seed(0)
    z = torch.randn(1000, 2)
    x = torch.stack([z[:, 0], z[:, 1] + 0.9 * z[:, 0] ** 2 - 1.0], -1)  # a banana: not Gaussian
    train, test = x[:500], x[500:]
    # one component: the flow layers over the Gaussian stage (a mixture stage is tested below)
    flow, report = fit_auto(train, seed=0, progress=False, config={"epochs": 60, "components": 1})
    assert report.chosen == "flow" and report.refit, report.summary()
    assert report.flow_val_ll > report.gaussian_val_ll
    gauss, _ = fit_auto(train, seed=0, progress=False, config={"num_layers": 0, "components": 1})
    with torch.no_grad():
        diff = flow.log_prob(test) - gauss.log_prob(test)
    assert float(diff.mean()) > 0.1, float(diff.mean())
    rebuilt = auto_flow(2, **report.flow_kwargs)
    rebuilt.load_state_dict(flow.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt.log_prob(test), flow.log_prob(test), atol=1e-5)


def test_choose_config_shrinks_with_the_data():
    small, large = choose_config(60, 10), choose_config(5000, 10)
    assert small["num_layers"] < large["num_layers"]
    assert small["hidden_dims"][0] < large["hidden_dims"][0]
    assert small["weight_decay"] > large["weight_decay"]


def test_shrinkage_keeps_the_covariance_invertible_with_fewer_rows_than_columns():
    torch.manual_seed(0)
    x = torch.randn(15, 30, dtype=torch.float64)
    alpha = choose_shrinkage(x)
    assert alpha in SHRINKAGE_GRID and alpha > 0
    cov, _ = shrunk_covariance(x, alpha)
    assert torch.linalg.eigvalsh(cov).min() > 0
    # strongly correlated columns and many rows: little shrinkage
    base = torch.randn(2000, 1, dtype=torch.float64)
    y = torch.cat([base, base + 0.1 * torch.randn(2000, 1, dtype=torch.float64)], -1)
    assert choose_shrinkage(y) <= 0.01


@pytest.mark.parametrize("bad, match", [
    (torch.randn(10), "shape"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 1.0]]), "NaN"),
    (torch.randn(1, 3), "at least 2 rows"),
])
def test_bad_data_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_auto(bad, progress=False)


def test_bad_val_fraction_raises():
    with pytest.raises(ValueError, match="val_fraction"):
        fit_auto(torch.randn(50, 2), val_fraction=1.5, progress=False)


def test_too_few_validation_rows_skip_the_flow_layers():
    flow, report = fit_auto(torch.randn(20, 3), progress=False)
    assert report.chosen == "gaussian" and "validation rows" in report.reason
    assert len(flow.transforms) == 1
    _, report = fit_auto(torch.randn(50, 3), progress=False, config={"num_layers": 0})
    assert report.chosen == "gaussian" and "num_layers=0" in report.reason


def test_cli_fit_auto_and_score_report_what_they_did(tmp_path, capsys):
    from pyroflows.cli import load_model, main

    x = _gaussian(d=3, seed=4).sample((120,)).float()
    data = tmp_path / "d.csv"
    data.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in x.tolist()) + "\n")
    model = tmp_path / "m.pt"
    assert main(["fit", str(data), "--out", str(model), "--epochs", "30", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("auto: ") and "validation log-likelihood" in err
    loaded = load_model(str(model))  # rebuilt from the saved architecture keywords
    assert torch.allclose(loaded.log_prob(x), loaded.train_log_prob, atol=1e-4)
    assert main(["score", str(model), str(data), "--quantile", "0.05"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "log_prob,anomaly" and len(lines) == 121
    assert "0.05 quantile of the 120 training rows' log densities" in err
    assert 3 <= sum(int(line.split(",")[1]) for line in lines[1:]) <= 9


def _clusters(n, seed=0):
    """Two tight, elongated clusters in 3-D: one Gaussian describes them badly."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1, 0.1], dtype=torch.float64)
    side = (torch.rand(n, generator=g) < 0.4).double()[:, None]
    return z + side * torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)


def test_clustered_rows_get_a_mixture_stage_that_beats_the_gaussian_and_rebuilds():
    train, test = _clusters(300), _clusters(2000, seed=1)
    flow, report = fit_auto(train, seed=0, progress=False, config={"epochs": 20})
    assert report.components >= 2, report.summary()
    assert "Gaussian-mixture stage" in report.summary()
    gauss, _ = fit_auto(train, seed=0, progress=False, config={"num_layers": 0, "components": 1})
    with torch.no_grad():
        gain = flow.log_prob(test.float()) - gauss.log_prob(test.float())
    assert float(gain.mean()) > 1.0, float(gain.mean())  # two clusters 10 sds apart across their width
    rebuilt = auto_flow(3, **report.flow_kwargs)
    rebuilt.load_state_dict(flow.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt.log_prob(test.float()), flow.log_prob(test.float()), atol=1e-4)


def test_flow_layers_over_a_mixture_stage_start_at_the_stage():
    """nsf mixes coordinates between its couplings: the mixture is placed in the base's frame,
    so before training the flow is exactly its stage."""
    from pyroflows.auto import AutoReport, _with_stage

    x = _clusters(200)
    arch = {"num_layers": 3, "hidden_dims": (8,), "count_bins": 4, "bound": 5.0}
    report = AutoReport("gaussian", "", 200, 3, 200, 0)
    with_layers = _with_stage(3, arch, x, torch.float32, 0, report, 2)
    alone = _with_stage(3, {"num_layers": 0}, x, torch.float32, 0, report, 2)
    assert len(with_layers.transforms) > 2  # couplings and the mixing between them
    with torch.no_grad():
        ll = alone.log_prob(x.float())
        assert torch.allclose(with_layers.log_prob(x.float()), ll, atol=1e-4 * ll.abs().max())


def test_cli_fit_auto_says_when_it_fitted_a_mixture(tmp_path, capsys):
    from pyroflows.cli import load_model, main

    x = _clusters(150).float()
    data = tmp_path / "c.csv"
    data.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in x.tolist()) + "\n")
    model = tmp_path / "m.pt"
    assert main(["fit", str(data), "--out", str(model), "--epochs", "10", "--quiet"]) == 0
    assert "Gaussian-mixture stage (" in capsys.readouterr().err
    loaded = load_model(str(model))
    assert torch.allclose(loaded.log_prob(x), loaded.train_log_prob, atol=1e-4)
