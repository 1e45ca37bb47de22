"""benchmarks/eight_schools_neck.py: the reference is in the guide's coordinates, and a toy run prints
every variant."""

import torch
from scripts import load_script


def test_reference_is_mapped_to_mu_log_tau_theta():
    neck = load_script("benchmarks/eight_schools_neck.py")
    ref = neck.reference_unconstrained()
    assert ref.shape == (4000, 10)
    # log tau: the posterior median of tau is about 2.7-3 (non-centred NUTS), so log tau's is about 1
    assert 0.7 < float(ref[:, neck.LOG_TAU].median()) < 1.3
    assert torch.isfinite(ref).all()


def test_a_tiny_run_prints_every_variant(capsys):
    neck = load_script("benchmarks/eight_schools_neck.py")
    neck.main(["--steps", "2", "--samples", "50", "--big-samples", "60", "--draws", "500"])
    out = capsys.readouterr().out
    assert "| NUTS reference (non-centred) | - | - | - | - | 19.9% |" in out
    for variant in neck.VARIANTS:
        assert f"| {variant} | 0 |" in out
