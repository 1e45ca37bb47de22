"""Reverse-KL distillation benchmarks; writes docs/bench_distill.md.

1. ``distill`` on 2-D targets with known normalisers: the energies U1-U4 of
   Rezende & Mohamed on the box [-4, 4]^2 (log Z by quadrature) and an
   8-component Gaussian mixture on a ring (exact log Z): error of the
   importance-sampled log Z (goal: < 0.05), ESS, k-hat; for the mixture, the
   share of flow samples nearest each mode (goal: every mode covered), with
   annealing alone and with annealing plus a forward-KL term on 200 samples.
2. ``distill_flow``: a MAF teacher fitted by maximum likelihood to the digits
   data (8x8 scikit-learn digits, dequantised and standardised, 64-D), distilled
   into an IAF student: the old recipe, the maximum-likelihood warm start on
   teacher draws, and a long reverse-KL run with cosine lr decay; KL between them
   both ways, ESS, k-hat, and the sampling speed-up (same draws, one thread).
   The teacher is early-stopped on 20% held-out rows by default: fitted to all
   rows for 285 epochs it memorises the dequantisation noise.

    python benchmarks/distill.py                # about an hour on 2 shared cores
    python benchmarks/distill.py --part 2d      # only the 2-D table (--part kd: only part 2)
    python benchmarks/distill.py --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import energies  # noqa: E402

from pyroflows import flows  # noqa: E402
from pyroflows.infer import distill, distill_flow  # noqa: E402
from pyroflows.train import fit  # noqa: E402

# -- 8-component mixture --------------------------------------------------------------------
RADIUS, SD, LOG_C = 4.0, 0.5, 2.0
MODES = torch.stack([RADIUS * torch.tensor([math.cos(a), math.sin(a)])
                     for a in torch.arange(8) * 2 * math.pi / 8])


def mixture_log_density(x):
    """LOG_C + log of the equal-weight mixture of N(m_k, SD^2 I) (so log Z = LOG_C exactly)."""
    d2 = ((x.unsqueeze(-2) - MODES) ** 2).sum(-1)
    log_n = -0.5 * d2 / SD**2 - math.log(2 * math.pi * SD**2)
    return LOG_C + torch.logsumexp(log_n, -1) - math.log(8)


def mixture_samples(n):
    k = torch.randint(8, (n,))
    return MODES[k] + SD * torch.randn(n, 2)


def mode_shares(flow, n=20000):
    x = flow.sample((n,))
    nearest = ((x.unsqueeze(-2) - MODES) ** 2).sum(-1).argmin(-1)
    return torch.bincount(nearest, minlength=8).double() / n


def plain_flow(dim):
    return flows.nsf(dim)


FLOW_NAME = "`pyroflows.flows.nsf(2)` (4 rational-quadratic spline couplings, 8 bins, hidden 64x64)"


# -- MAF teacher, IAF student ----------------------------------------------------------------
def make_maf(dim, layers=4):
    return flows.maf(dim, num_layers=layers, hidden_dims=(2 * dim, 2 * dim))


def make_iaf(dim, layers=4):
    return flows.iaf(dim, num_layers=layers, hidden_dims=(2 * dim, 2 * dim))


def digits_data(generator=None):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32)
    x = x + torch.rand(x.shape, generator=generator)  # dequantise
    return (x - x.mean(0)) / x.std(0)


def fit_mle(flow, data, epochs, lr=1e-3, batch=256, val_data=None, patience=None):
    """The teacher's maximum-likelihood fit (:func:`pyroflows.train.fit`; with ``val_data``, early
    stopping and the best validation epoch kept); returns the train NLL."""
    fit(flow, data, epochs=epochs, batch_size=batch, lr=lr, progress=False, seed=0, val_data=val_data,
        patience=patience)
    with torch.no_grad():
        return float(-flow.log_prob(data).mean())


def time_sampling(flow, n=5000, repeats=3):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        flow.sample((n,))
        best = min(best, time.perf_counter() - t0)
    return best


def distill_2d(steps, is_weight, lines):
    """The 2-D table: every target with the same settings (generic, nothing per target)."""
    anneal = steps // 2
    kw = {"lr": 3e-3, "lr_schedule": "cosine", "is_forward_kl_weight": is_weight}
    lines += ["## 2-D targets with known normalisers", "",
              f"Flow: {FLOW_NAME}; the energies' flow ends with a sigmoid and an affine map onto the box. "
              f"`distill(..., num_steps={steps}, num_samples=256, lr=3e-3, lr_schedule='cosine', "
              f"anneal_steps={anneal}, beta0=0.01, is_forward_kl_weight={is_weight})` for every energy, "
              f"and for the mixture as labelled (`is_forward_kl_weight=0` for `anneal` and `forward KL`); "
              f"log Z, ESS and k-hat from 4096 fresh draws; one seed (0).", "",
              "| target | exact log Z | distilled log Z | abs error | ESS | k-hat | wall s |", "|---|---|---|---|---|---|---|"]
    for name, (_, res, exact, secs) in energies.run(num_steps=steps, anneal_steps=anneal, progress=False,
                                                    **kw).items():
        lines.append(f"| {name} on [-4,4]^2 | {exact:.4f} | {res.log_z:.4f} +- {res.log_z_se:.4f} | "
                     f"{abs(res.log_z - exact):.4f} | {100 * res.ess:.1f}% | {res.khat:.2f} | {secs:.0f} |")
        print(lines[-1], flush=True)
    shares = {}
    runs = [("anneal", {"is_forward_kl_weight": 0.0}),
            (f"anneal + IS forward KL (weight {is_weight})", {}),
            ("anneal + forward KL (200 samples)", {"target_samples": 200, "is_forward_kl_weight": 0.0})]
    for label, extra in runs if is_weight > 0 else runs[::2]:
        torch.manual_seed(0)
        if "target_samples" in extra:
            extra = {**extra, "target_samples": mixture_samples(200), "forward_kl_weight": 1.0}
        flow = plain_flow(2)
        t0 = time.perf_counter()
        res = distill(flow, mixture_log_density, num_steps=steps, num_samples=256, anneal_steps=anneal,
                      progress=False, **{**kw, **extra})
        secs = time.perf_counter() - t0
        shares[label] = mode_shares(flow)
        lines.append(f"| 8-mode mixture, {label} | {LOG_C:.4f} | {res.log_z:.4f} +- {res.log_z_se:.4f} | "
                     f"{abs(res.log_z - LOG_C):.4f} | {100 * res.ess:.1f}% | {res.khat:.2f} | {secs:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "Share of 20000 flow samples nearest each of the 8 modes (1/8 = 12.5% each is exact):", "",
              "| run | " + " | ".join(f"mode {k}" for k in range(8)) + " | min |", "|---" * 10 + "|"]
    for label, s in shares.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}%" for v in s) + f" | {100 * s.min():.1f}% |")


def distill_defaults(lines):
    """Issue 12: ``distill(flow, log_density)`` with no argument but the progress switch, on U1-U4
    and the 8-mode mixture: log Z error, ESS, k-hat and the mass of every mode."""
    lines += ["## `distill` with its defaults, per mode", "",
              "`distill(flow, log_density)` and nothing else (3000 steps, 256 draws, lr 3e-3 cosine, "
              "annealing over the first half, importance-weighted forward-KL weight 1); the flow is "
              "`nsf(2)` with its defaults (then a sigmoid and an affine map onto the box for U1-U4); seed 0. "
              "Mode masses: for U1-U4, whose exp(-U) is a sum of components (U1: left/right crescent; U2: "
              "one band; U3, U4: the two branches), the exact share of each component (quadrature) against "
              "the flow's (mean responsibility over 20000 draws); for the mixture, the share of draws "
              "nearest each mean (exact 12.5%).", "",
              "| target | exact log Z | abs error | ESS | k-hat | mode masses, flow (exact) | wall s |",
              "|---|---|---|---|---|---|---|"]
    targets = [(name, energies.box_flow("nsf"), lambda z, e=e: -e(z)) for name, e in energies.ENERGIES.items()]
    targets.append(("8-mode mixture", plain_flow(2), mixture_log_density))
    for name, flow, log_density in targets:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = distill(flow, log_density, progress=False)
        secs = time.perf_counter() - t0
        if name in energies.ENERGIES:
            exact_z = energies.grid_log_z(log_density)
            exact, share = energies.mode_masses(name, flow)
            masses = " / ".join(f"{100 * f:.1f}% ({100 * e:.1f}%)" for f, e in zip(share, exact))
        else:
            exact_z, share = LOG_C, mode_shares(flow)
            masses = " / ".join(f"{100 * f:.1f}%" for f in share) + f" (min {100 * share.min():.1f}%)"
        lines.append(f"| {name} | {exact_z:.4f} | {abs(res.log_z - exact_z):.4f} | {100 * res.ess:.1f}% | "
                     f"{res.khat:.2f} | {masses} | {secs:.0f} |")
        print(lines[-1], flush=True)


def kl_both_ways(teacher, student, n=4000):
    """Monte Carlo KL(student || teacher) on student draws and KL(teacher || student) on teacher draws;
    the latter as text, with the count of teacher draws the student cannot score (its sequential
    inverse overflows in float32) when there are any."""
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)  # let NaN through, count it
    try:
        with torch.no_grad():
            x = student.sample((n,))
            reverse = float((student.log_prob(x) - teacher.log_prob(x)).mean())
            x = teacher.sample((n,))
            ratio = teacher.log_prob(x) - student.log_prob(x)
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
    bad = int((~torch.isfinite(ratio)).sum())
    forward = f"{float(ratio.mean()):.3f}" if bad == 0 else f"inf ({bad} of {n} draws unscorable)"
    return reverse, forward


def distill_digits(teacher_epochs, kd_steps, warm_samples, warm_epochs, holdout, long_steps, lines):
    """MAF teacher on digits, IAF students without and with the warm start."""
    torch.manual_seed(0)
    data = digits_data()
    dim = data.shape[1]
    teacher = make_maf(dim)
    val, how = None, "all 1797 rows"
    if holdout > 0:
        perm = torch.randperm(len(data))
        n_val = int(holdout * len(data))
        data, val = data[perm[n_val:]], data[perm[:n_val]]
        how = f"{len(data)} rows, {n_val} held out for early stopping (patience 20, best epoch kept)"
    t0 = time.perf_counter()
    nll = fit_mle(teacher, data, teacher_epochs, val_data=val, patience=20 if holdout > 0 else None)
    fit_secs = time.perf_counter() - t0
    with torch.no_grad():  # the same images, dequantised afresh: a held-out check of the teacher
        # (own generator: fit(seed=0) resets the global one, which would replay the training noise)
        fresh_nll = float(-teacher.log_prob(digits_data(torch.Generator().manual_seed(1))).mean())
        val_note = "" if val is None else f", held-out rows {float(-teacher.log_prob(val).mean()):.2f} nats"
    mle_steps = teacher_epochs * math.ceil(len(data) / 256)
    runs = [("reverse KL only (constant lr, the old recipe)", {}),
            (f"warm start ({warm_samples} teacher draws, {warm_epochs} epochs ML) + reverse KL, cosine lr",
             {"warm_start_samples": warm_samples, "warm_start_epochs": warm_epochs, "lr_schedule": "cosine"}),
            (f"reverse KL only, {long_steps} steps, cosine lr", {"num_steps": long_steps, "lr_schedule": "cosine"})]
    lines += ["", "## Teacher -> student (`distill_flow`), digits 64-D", "",
              f"Teacher `flows.maf(64, num_layers=4, hidden_dims=(128, 128))` fitted by `pyroflows.train.fit` on {how} "
              f"(at most {teacher_epochs} epochs = {mle_steps} steps of 256, lr 1e-3): {fit_secs:.0f} s, train NLL "
              f"{nll:.2f} nats{val_note}, all images with fresh dequantisation noise {fresh_nll:.2f} nats. "
              f"Students `flows.iaf` of the same size; reverse stage {kd_steps} steps (unless said) x 256 "
              f"student draws, lr 1e-3. KLs by Monte Carlo on 4000 draws; ESS and k-hat: the student as "
              f"importance proposal for the teacher (4096 draws).", "",
              "| student | KL(student \\|\\| teacher) | KL(teacher \\|\\| student) | ESS | k-hat | wall s |",
              "|---|---|---|---|---|---|"]
    student = None
    for label, kw in runs:
        torch.manual_seed(1)
        student = make_iaf(dim)
        t0 = time.perf_counter()
        res = distill_flow(teacher, student, num_samples=256, lr=1e-3, progress=False, **{"num_steps": kd_steps, **kw})
        secs = time.perf_counter() - t0
        reverse, forward = kl_both_ways(teacher, student)
        lines.append(f"| {label} | {reverse:.3f} | {forward} | {100 * res.ess:.1f}% | {res.khat:.2f} | "
                     f"{secs:.0f} |")
        print(lines[-1], flush=True)
    t_teacher, t_student = time_sampling(teacher), time_sampling(student)
    lines += ["", "| sampling 5000 draws, 1 thread (best of 3) | ms |", "|---|---|",
              f"| teacher (MAF: {dim} sequential passes per layer) | {1000 * t_teacher:.1f} |",
              f"| student (IAF: one pass per layer) | {1000 * t_student:.1f} |",
              f"| speed-up | {t_teacher / t_student:.1f}x |"]
    print("\n".join(lines[-5:]), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", choices=("all", "2d", "defaults", "kd"), default="all")
    p.add_argument("--steps", type=int, default=3000, help="distill steps per 2-D target (annealing: half)")
    p.add_argument("--is-weight", type=float, default=0.0, help="is_forward_kl_weight for the 2-D targets")
    p.add_argument("--teacher-epochs", type=int, default=285, help="teacher MLE epochs (285 x 8 steps ~ 2000 steps)")
    p.add_argument("--kd-steps", type=int, default=1500, help="distill_flow reverse-KL steps")
    p.add_argument("--warm-samples", type=int, default=20000, help="teacher draws for the warm start")
    p.add_argument("--warm-epochs", type=int, default=10, help="warm-start epochs")
    p.add_argument("--teacher-holdout", type=float, default=0.2,
                   help="fraction of the digits held out to early-stop the teacher (0: fit all rows, no stopping; "
                        "that teacher memorises the dequantisation noise)")
    p.add_argument("--kd-long-steps", type=int, default=6000, help="steps of the long reverse-KL-only student")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_distill.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    q = args.quick
    t_start = time.perf_counter()
    cmd = "python benchmarks/distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Reverse-KL distillation", "",
             f"Generated {time.strftime('%Y-%m-%d', time.gmtime())} by `{cmd.strip()}` (1 thread, 2 shared cores).", ""]
    if args.part in ("all", "2d"):
        distill_2d(300 if q else args.steps, args.is_weight, lines)
    if args.part in ("all", "defaults"):
        distill_defaults(lines)
    if args.part in ("all", "kd"):
        distill_digits(20 if q else args.teacher_epochs, 100 if q else args.kd_steps,
                       2000 if q else args.warm_samples, 2 if q else args.warm_epochs, args.teacher_holdout,
                       200 if q else args.kd_long_steps, lines)
    lines += ["", f"Total {time.perf_counter() - t_start:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
