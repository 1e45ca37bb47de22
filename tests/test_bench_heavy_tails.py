"""benchmarks/heavy_tails.py: its reference moments are right, and a toy-budget run prints a table."""

import pyro
import pyro.distributions as dist
import torch
from scripts import load_script


def test_cauchy_location_moments_match_importance_sampling_from_the_prior():
    h = load_script("benchmarks/heavy_tails.py")
    mean, sd = h.cauchy_location_moments()
    torch.manual_seed(0)
    mu = dist.Normal(0.0, h.PRIOR_SD).sample((400_000,)).double()
    w = torch.softmax(dist.Cauchy(mu[:, None], 1.0).log_prob(h.Y.double()).sum(-1), 0)
    is_mean = (w * mu).sum()
    is_sd = (w * (mu - is_mean) ** 2).sum().sqrt()
    assert abs(float(mean) - float(is_mean)) < 0.02
    assert abs(float(sd) / float(is_sd) - 1) < 0.03


def test_student_t_moments_match_draws_of_the_model():
    h = load_script("benchmarks/heavy_tails.py")
    mean, sd = h.student_t_moments()
    torch.manual_seed(0)
    x = pyro.poutine.trace(pyro.plate("n", 200_000)(h.student_t)).get_trace().nodes["x"]["value"]
    assert x.shape == (200_000, 5)
    assert (x.mean(0) - mean).abs().max() < 0.03
    # the median absolute deviation is stable even with 3 degrees of freedom: compare with scipy's t
    from scipy import stats
    scale = sd / (3.0 ** 0.5)  # sd = sqrt(df / (df - 2)) * scale
    mad = (x - x.median(0).values).abs().median(0).values
    assert torch.allclose(mad, scale * float(stats.t(3).ppf(0.75)), rtol=0.02)


def test_a_tiny_run_prints_every_guide(capsys):
    h = load_script("benchmarks/heavy_tails.py")
    h.main(["--steps", "3", "--samples", "50", "--problems", "cauchy_location"])
    out = capsys.readouterr().out
    for name in ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoFlow", "AutoFlow (Gaussian base)"):
        assert f"| {name} |" in out
