"""Reverse-KL distillation: fits, estimates log Z, guards its inputs."""

import math

import pytest
import torch

import pyroflows
from pyroflows.infer import distill, distill_flow, importance_diagnostics
from pyroflows.transforms import elementwise


def gauss_flow(dim=2):
    return pyroflows.Flow([elementwise(dim, kind="affine")])


def shifted_gaussian(x):
    """Unnormalised N((1, -2), diag(0.5^2, 2^2)) times exp(3): log Z = 3 + log(2 pi * 0.5 * 2)."""
    z = (x - torch.tensor([1.0, -2.0])) / torch.tensor([0.5, 2.0])
    return 3.0 - 0.5 * (z**2).sum(-1)


LOG_Z = 3.0 + math.log(2 * math.pi * 0.5 * 2.0)


def test_distill_fits_a_gaussian_and_recovers_log_z():
    torch.manual_seed(0)
    res = distill(gauss_flow(), shifted_gaussian, num_steps=300, num_samples=64, lr=0.05,
                  num_eval_samples=2000, progress=False)
    assert len(res.losses) == 300 and res.losses[-1] < res.losses[0]
    assert abs(res.log_z - LOG_Z) < 0.05
    assert res.ess > 0.9 and res.khat < 0.5
    assert 0 <= res.kl < 0.05


def test_annealing_schedule_rises_to_one():
    torch.manual_seed(0)
    res = distill(gauss_flow(), shifted_gaussian, num_steps=20, num_samples=8, lr=0.01,
                  anneal_steps=10, beta0=0.1, num_eval_samples=100, progress=False)
    assert res.betas[0] == pytest.approx(0.1) and res.betas[5] == pytest.approx(0.55)
    assert res.betas[10:] == [1.0] * 10


def test_forward_kl_term_uses_target_samples():
    torch.manual_seed(0)
    samples = torch.tensor([1.0, -2.0]) + torch.tensor([0.5, 2.0]) * torch.randn(500, 2)
    flow = gauss_flow()
    res = distill(flow, shifted_gaussian, num_steps=200, num_samples=32, lr=0.05, target_samples=samples,
                  forward_kl_weight=1.0, num_eval_samples=1000, progress=False)
    assert abs(res.log_z - LOG_Z) < 0.1
    with pytest.raises(ValueError, match="target_samples"):
        distill(flow, shifted_gaussian, num_steps=1, target_samples=torch.zeros(5, 3), progress=False)


def test_bad_log_density_is_a_clear_error():
    flow = gauss_flow()
    with pytest.raises(ValueError, match="shape"):
        distill(flow, lambda x: x, num_steps=1, num_samples=4, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        distill(flow, lambda x: torch.where(x[:, 0] > 0, -torch.inf, 0.0 * x[:, 0]), num_steps=2,
                num_samples=64, progress=False)


def test_distill_flow_student_matches_teacher():
    torch.manual_seed(0)
    teacher = gauss_flow()
    with torch.no_grad():
        teacher.transforms[0].params[:, 0] = torch.tensor([2.0, -1.0])
    before = teacher.transforms[0].params.detach().clone()
    student = gauss_flow()
    res = distill_flow(teacher, student, num_steps=300, num_samples=64, lr=0.05, num_eval_samples=1000,
                       progress=False)
    assert torch.equal(teacher.transforms[0].params, before)  # the teacher is frozen
    assert teacher.transforms[0].params.requires_grad  # ...and given back trainable
    assert abs(res.log_z) < 0.02 and -res.elbo < 0.02  # KL(student || teacher)
    assert torch.allclose(student.transforms[0].params[:, 0], torch.tensor([2.0, -1.0]), atol=0.1)


def test_importance_diagnostics_known_weights():
    d = importance_diagnostics(torch.zeros(100))
    assert d.ess == pytest.approx(1.0) and abs(d.log_evidence) < 1e-9 and d.log_evidence_se < 1e-6
    assert d.khat == 0.0  # no tail at all
    one_heavy = torch.full((100,), -50.0)
    one_heavy[0] = 0.0
    d = importance_diagnostics(one_heavy)
    assert d.ess == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        importance_diagnostics(torch.tensor([0.0, float("nan")]))


def test_comparison_table_marks_missing_numbers():
    from pyroflows.infer.compare import Row, markdown_table, moment_errors

    table = markdown_table([Row("A", 0.31, 0.5, 0.1, 0.2, 1.0), Row("B", note="failed")], "t")
    assert "| A | 0.31 | 50.0% | 0.100 | 0.200 | 1.0 |  |" in table
    assert "| B | - | - | - | - | - | failed |" in table
    draws = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # means (1, 2), sds (1.414, 1.414)
    mean_err, sd_err = moment_errors(draws, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
    assert mean_err == pytest.approx(0.5) and sd_err == pytest.approx(1 - 2**0.5 / 2, rel=1e-5)


def test_distill_flow_maf_teacher_iaf_student():
    """The Parallel-WaveNet recipe with the named architectures: MAF teacher, IAF student."""
    from pyroflows import flows
    from pyroflows.train import fit

    torch.manual_seed(0)
    teacher = flows.maf(2, num_layers=2, hidden_dims=(16, 16))
    data = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    fit(teacher, data, epochs=20, batch_size=128, lr=1e-2, progress=False, seed=0)
    student = flows.iaf(2, num_layers=2, hidden_dims=(16, 16))

    def kl():  # KL(student || teacher), Monte Carlo
        with torch.no_grad():
            x = student.sample((2000,))
            return float((student.log_prob(x) - teacher.log_prob(x)).mean())

    kl0 = kl()
    res = distill_flow(teacher, student, num_steps=150, num_samples=128, lr=1e-2, num_eval_samples=1000,
                       progress=False)
    assert kl0 > 0.5  # the student starts far from the teacher (it starts at N(0, I))
    assert kl() < 0.25 * kl0 and -res.elbo < 0.25 * kl0


def test_cosine_lr_schedule_decays_and_is_restored():
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    flow = gauss_flow()
    opt = Recording(flow.parameters(), lr=0.01)
    distill(flow, shifted_gaussian, num_steps=11, num_samples=8, optimizer=opt, lr_schedule="cosine",
            num_eval_samples=16, progress=False)
    assert seen[0] == pytest.approx(0.01) and seen[5] == pytest.approx(0.01 * (0.01 + 0.99 * 0.5 * (1 + math.cos(
        math.pi * 5 / 11))))
    assert all(a > b for a, b in zip(seen, seen[1:])) and seen[-1] < 0.001
    assert opt.param_groups[0]["lr"] == 0.01  # given back as it came
    with pytest.raises(ValueError, match="lr_schedule"):
        distill(flow, shifted_gaussian, num_steps=1, lr_schedule="linear", progress=False)


def bimodal(x):
    """Equal mixture of N(-2, 0.5^2) and N(2, 0.5^2) in x_0 (sd 2.06), times N(0, 1) in x_1."""
    m = torch.tensor([-2.0, 2.0])
    return torch.logsumexp(-0.5 * ((x[:, :1] - m) / 0.5) ** 2, -1) - 0.5 * x[:, 1] ** 2


def test_importance_weighted_forward_kl_covers_both_modes():
    """A Gaussian q fitted by reverse KL is narrower than the target (mode-seeking); a dominant
    importance-weighted forward-KL term moves it to the moment-matched width (sd 2.06)."""
    sds = {}
    for weight in (0.0, 100.0):
        torch.manual_seed(0)
        flow = gauss_flow()
        distill(flow, bimodal, num_steps=300, num_samples=128, lr=0.03, is_forward_kl_weight=weight,
                num_eval_samples=64, progress=False)
        sds[weight] = float(flow.sample((4000,))[:, 0].std())
    assert sds[0.0] < 1.8 and abs(sds[100.0] - 2.06) < 0.15
    with pytest.raises(ValueError, match="is_forward_kl_weight"):
        distill(gauss_flow(), bimodal, num_steps=1, is_forward_kl_weight=-1.0, progress=False)


def test_distill_flow_warm_start_lowers_kl_and_checks_its_inputs():
    from pyroflows import flows

    torch.manual_seed(0)
    teacher = gauss_flow()
    with torch.no_grad():
        teacher.transforms[0].params[:, 0] = torch.tensor([2.0, -1.0])
        teacher.transforms[0].params[:, 1] = torch.tensor([0.5, -0.5])
    kls = {}
    for n in (0, 1000):
        torch.manual_seed(0)
        student = flows.iaf(2, num_layers=1, hidden_dims=(8,))
        res = distill_flow(teacher, student, num_steps=0, warm_start_samples=n, warm_start_epochs=10,
                           num_samples=64, lr=3e-2, num_eval_samples=1000, progress=False)
        kls[n] = -res.elbo
        assert len(res.warm_start_nll) == (10 if n else 0)
    assert kls[0] > 1.0 and kls[1000] < 0.1 * kls[0]  # maximum likelihood alone brings the student close
    with pytest.raises(ValueError, match="event shape"):
        distill_flow(teacher, gauss_flow(3), num_steps=1, progress=False)
    with pytest.raises(ValueError, match="warm_start_samples"):
        distill_flow(teacher, gauss_flow(), num_steps=1, warm_start_samples=-5, progress=False)
    with pytest.raises(TypeError, match="student"):
        distill_flow(teacher, lambda x: x, num_steps=1, progress=False)
