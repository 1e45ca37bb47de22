"""The pyroflows command line: fit / sample / score round trip, demo, one-line errors."""

import subprocess
import sys

import pytest
import torch

from hostile import write_hostile

from pyroflows.cli import main
from pyroflows.demo import SECTIONS, DemoContext, SectionResult, run_demo
from pyroflows.io import load_model, read_csv


def write_csv(path, x, header=("a", "b")):
    lines = ([",".join(header)] if header else []) + [",".join(f"{v:.6f}" for v in r) for r in x.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_csv(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([100.0, -5.0])
    return write_csv(tmp_path / "data.csv", x), x


@pytest.fixture
def model_pt(tmp_path, data_csv):
    out = tmp_path / "model.pt"
    assert main(["fit", str(data_csv[0]), "--flow", "elementwise", "--out", str(out), "--epochs", "15",
                 "--quiet"]) == 0
    return out


def test_fit_stores_standardisation_and_round_trips(model_pt, data_csv, tmp_path, capsys):
    _, x = data_csv
    model = load_model(str(model_pt))
    assert torch.allclose(model.mean, x.mean(0)) and torch.allclose(model.std, x.std(0))
    assert model.columns == ["a", "b"]
    # sample: CSV on stdout with the header, in the data's units
    capsys.readouterr()
    assert main(["sample", str(model_pt), "-n", "500", "--seed", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "a,b" and len(out) == 501
    s = torch.tensor([[float(v) for v in line.split(",")] for line in out[1:]])
    assert (s.mean(0) - x.mean(0)).abs().max() < 0.5 and (s.std(0) / x.std(0) - 1).abs().max() < 0.2
    # sample to a file
    f = tmp_path / "s.csv"
    assert main(["sample", str(model_pt), "-n", "7", "--out", str(f)]) == 0
    assert len(f.read_text().splitlines()) == 8


def test_score_flags_outliers(model_pt, data_csv, tmp_path, capsys):
    _, x = data_csv
    probe = torch.cat([x[:20], torch.tensor([[100.0, 5.0], [130.0, -5.0]])])
    f = write_csv(tmp_path / "probe.csv", probe, header=None)
    capsys.readouterr()
    assert main(["score", str(model_pt), str(f), "--quantile", "0.02"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "log_prob,anomaly" and len(lines) == 23
    flags = [int(line.split(",")[1]) for line in lines[1:]]
    lps = [float(line.split(",")[0]) for line in lines[1:]]
    assert flags[-2:] == [1, 1] and sum(flags[:20]) <= 3
    # the log density is in the data's units: it matches the model's own log_prob
    model = load_model(str(model_pt))
    assert torch.allclose(torch.tensor(lps), model.log_prob(probe), atol=1e-4)


@pytest.mark.parametrize("content,match", [
    ("a,b\n1,2\n3\n", r"bad\.csv:3: expected 2 values, got 1"),
    ("1,2\n3,x\n", r"bad\.csv:2: 'x' is not a number"),
    ("1,2\n3,nan\n", r"bad\.csv:2: NaN or infinite"),
    ("a,b\n", r"bad\.csv: no data rows"),
])
def test_malformed_csv_names_file_and_line(tmp_path, capsys, content, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    assert main(["fit", str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("pyroflows: error: ") and __import__("re").search(match, err)


def test_missing_and_unreadable_files(tmp_path, capsys, model_pt):
    assert main(["fit", str(tmp_path / "nope.csv")]) == 1
    assert "nope.csv: no such file" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nope.pt")]) == 1
    assert "nope.pt: no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a model")
    assert main(["score", str(junk), str(junk)]) == 1
    assert "junk.pt: not a pyroflows file" in capsys.readouterr().err
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert main(["score", str(model_pt), str(binary)]) == 1
    assert "bin.csv: not a text CSV file" in capsys.readouterr().err
    assert main(["fit", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_score_wrong_width_and_bad_quantile(tmp_path, capsys, model_pt):
    f = write_csv(tmp_path / "w.csv", torch.zeros(3, 3), header=None)
    assert main(["score", str(model_pt), str(f)]) == 1
    assert "expected 2 columns" in capsys.readouterr().err
    assert main(["score", str(model_pt), str(f), "--quantile", "1.5"]) == 1
    assert "--quantile must be in (0, 1)" in capsys.readouterr().err


def test_unknown_flow_name(data_csv, capsys):
    """--flow choices are the registry's names."""
    with pytest.raises(SystemExit) as e:
        main(["fit", str(data_csv[0]), "--flow", "nope", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "nsf" in err and "elementwise" in err


def test_read_csv_header_detection(tmp_path):
    x, header = read_csv(str(write_csv(tmp_path / "h.csv", torch.ones(2, 2), header=("u", "v"))))
    assert header == ["u", "v"] and x.shape == (2, 2)
    x, header = read_csv(str(write_csv(tmp_path / "n.csv", torch.ones(2, 2), header=None)))
    assert header is None and x.shape == (2, 2)


def test_demo_sections_are_pluggable(tmp_path):
    """run_demo runs any list of sections and writes their rows, text and figures to report.md."""
    def extra(ctx: DemoContext) -> SectionResult:
        (ctx.out / "x.png").write_bytes(b"")
        return SectionResult("Extra section", [{"metric": 1.5}], "some text", ["x.png"])

    run_demo(DemoContext(tmp_path, quick=True), sections=[extra])
    report = (tmp_path / "report.md").read_text()
    assert "## Extra section" in report and "| 1.500 |" in report and "![x.png](x.png)" in report
    assert len(SECTIONS) >= 2


def test_python_m_pyroflows_demo_quick(tmp_path):
    """The README's main job, end to end (quick form), through `python -m pyroflows`."""
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "pyroflows", "demo", "--quick", "--quiet", "--out", str(out)],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "test NLL (flow)" in r.stdout and "test NLL (true density)" in r.stdout
    report = (out / "report.md").read_text()
    assert "1-D" in report and "2-D" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "density_1d.png" in pngs and any(p.startswith("layers_2d") for p in pngs)
    # the fitted 1-D flow is close to the true density (a real fit, not a stub)
    line = next(ln for ln in r.stdout.splitlines() if "1-D" in ln)
    gap = float(line.split("gap ")[1].split(",")[0])
    assert -0.05 < gap < 0.1
    # the SVI-guide and distillation sections ran and were scored
    assert "An SVI guide" in report and "Distillation" in report
    assert "svi_funnel.png" in pngs and "distill_u1.png" in pngs
    line = next(ln for ln in r.stdout.splitlines() if "Distillation" in ln)
    assert float(line.split("abs error ")[1].split(",")[0]) < 0.5  # log Z of U1, a real fit
    khats = [float(ln.split("k-hat ")[1].split(",")[0]) for ln in r.stdout.splitlines() if "SVI guide" in ln]
    assert len(khats) == 2 and all(k == k for k in khats)  # AutoNormal and AutoFlow, not NaN


@pytest.mark.parametrize("name", ["auto", "elementwise"])
def test_saved_model_reloads_to_the_same_density(tmp_path, name):
    """The model file rebuilds the architecture by name and restores every parameter and buffer."""
    from pyroflows.flows import make_flow, resolve_flow_name
    from pyroflows.io import save_model

    torch.manual_seed(0)
    flow = make_flow(name, 2)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow.eval()
    mean, std = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5])
    save_model(tmp_path / "m.pt", flow, flow_name=resolve_flow_name(name, 2), flow_kwargs={}, mean=mean, std=std)
    torch.manual_seed(123)  # a different seed for the rebuilt layers: everything must come from the file
    model = load_model(str(tmp_path / "m.pt"))
    x = torch.randn(7, 2)
    with torch.no_grad():
        expected = flow.log_prob((x - mean) / std) - std.log().sum()
    assert torch.equal(model.log_prob(x), expected)


def test_unwritable_outputs_and_bad_options(tmp_path, capsys, data_csv, model_pt):
    missing_dir = tmp_path / "no" / "such" / "dir"
    assert main(["fit", str(data_csv[0]), "--epochs", "1", "--quiet", "--out", str(missing_dir / "m.pt")]) == 1
    assert "m.pt: cannot write" in capsys.readouterr().err
    assert main(["sample", str(model_pt), "-n", "3", "--out", str(missing_dir / "s.csv")]) == 1
    assert "s.csv: cannot write" in capsys.readouterr().err
    assert main(["fit", str(data_csv[0]), "--val-fraction", "1.5"]) == 1
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["sample", str(model_pt), "-n", "-2"]) == 1
    assert "-n must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["score", "sample"])
@pytest.mark.parametrize("kind", ["model", "raw"])
def test_a_model_file_that_would_run_code_is_refused(tmp_path, capsys, data_csv, command, kind):
    """A crafted model file: refused on one line, its payload never runs, nothing is written."""
    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / "model.pt", marker, kind)
    out = tmp_path / "out.csv"
    args = [command, str(evil)] + ([str(data_csv[0])] if command == "score" else ["-n", "3"])
    assert main(args + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyroflows: error: {evil}: ") and err.count("\n") == 1
    assert "refused" in err or "raw Python pickle" in err
    assert not marker.exists() and not out.exists()


def test_malformed_model_files_one_line_errors(tmp_path, capsys, data_csv, model_pt):
    """Truncated, another architecture, another program's file, a checkpoint: one line each."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_pt.read_bytes()[:300])
    other_arch = tmp_path / "other.pt"
    data = torch.load(model_pt, weights_only=True)
    data["flow"]["kwargs"] = {"num_layers": 3}
    torch.save(data, other_arch)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    ck = tmp_path / "ck.pt"
    from pyroflows.flows import make_flow
    from pyroflows.train import fit

    fit(make_flow("elementwise", 2), torch.randn(10, 2), epochs=1, batch_size=5, progress=False, checkpoint=ck)
    capsys.readouterr()
    for path, match in [(truncated, "truncated or corrupted"), (other_arch, "different flow architecture"),
                        (plain, "not a pyroflows model file"), (ck, "training checkpoint, not a model file"),
                        (data_csv[0], "not a pyroflows file")]:
        out = tmp_path / "scores.csv"
        assert main(["score", str(path), str(data_csv[0]), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pyroflows: error: {path}: ") and match in err and err.count("\n") == 1, err
        assert not out.exists()


def test_hostile_model_file_through_python_m(tmp_path, data_csv):
    """The real process: exit status 1, one line on stderr, no traceback, the payload never ran."""
    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / "model.pt", marker)
    r = subprocess.run([sys.executable, "-m", "pyroflows", "score", str(evil), str(data_csv[0])],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"pyroflows: error: {evil}: refused") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr and not marker.exists()
