"""pyroflows.io: model files and checkpoints hold plain data and are read without running code."""

import pickle

import pytest
import torch
from hostile import write_hostile

from pyroflows import __version__
from pyroflows.flows import make_flow
from pyroflows.io import FileFormatError, load_checkpoint, load_model, save_checkpoint, save_model
from pyroflows.train import fit


def perturbed(name, dim, seed=0, **kw):
    torch.manual_seed(seed)
    flow = make_flow(name, dim, **kw)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


@pytest.fixture
def model_file(tmp_path):
    flow = perturbed("nsf", 2, num_layers=2)
    path = tmp_path / "model.pt"
    save_model(path, flow, flow_name="nsf", flow_kwargs={"num_layers": 2}, mean=torch.tensor([1.0, -1.0]),
               std=torch.tensor([2.0, 0.5]), columns=["a", "b"])
    return path, flow


@pytest.mark.parametrize("kind", ["model", "checkpoint", "raw"])
def test_the_hostile_payload_is_live(tmp_path, kind):
    """Without the safe reader these files do run code: the refusal tests below are not vacuous."""
    marker = tmp_path / "ran"
    path = write_hostile(tmp_path / "evil.pt", marker, kind)
    if kind == "raw":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind,match", [("model", r"refused: the file imports '\w+'"),
                                        ("raw", "a raw Python pickle")])
def test_load_model_refuses_a_file_that_would_run_code(tmp_path, kind, match):
    marker = tmp_path / "ran"
    path = write_hostile(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(FileFormatError, match=match) as e:
        load_model(path)
    assert not marker.exists()
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_load_checkpoint_refuses_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = write_hostile(tmp_path / "evil.pt", marker, "checkpoint")
    with pytest.raises(FileFormatError, match="refused"):
        load_checkpoint(path, make_flow("elementwise", 1))
    assert not marker.exists()


def test_genuine_model_round_trips_bitwise(model_file):
    path, flow = model_file
    raw = torch.load(path, weights_only=True)  # plain data: the safe reader opens it
    assert raw["format"] == "pyroflows-model" and raw["pyroflows_version"] == __version__
    assert raw["flow"] == {"name": "nsf", "input_dim": 2, "kwargs": {"num_layers": 2}}
    torch.manual_seed(123)  # the rebuilt layers start elsewhere: every value must come from the file
    model = load_model(path)
    x = torch.randn(50, 2)
    with torch.no_grad():
        assert torch.equal(model.flow.log_prob(x), flow.log_prob(x))
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in model.flow.state_dict().items())
    assert model.flow_name == "nsf" and model.flow_kwargs == {"num_layers": 2} and model.columns == ["a", "b"]
    assert torch.equal(model.std, torch.tensor([2.0, 0.5]))


def test_format_1_files_are_migrated(tmp_path):
    flow = perturbed("elementwise", 2)
    path = tmp_path / "old.pt"
    torch.save({"format": "pyroflows-model-1", "flow_name": "elementwise", "flow_kwargs": {}, "input_dim": 2,
                "state_dict": flow.state_dict(), "mean": torch.zeros(2), "std": torch.ones(2), "columns": None,
                "train_log_prob": None, "history": None}, path)
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(load_model(path).log_prob(x), flow.log_prob(x))


def edit(path, out, change):
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, out)
    return out


@pytest.mark.parametrize("make,match", [
    (lambda p, t: t.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]) and t, "truncated or corrupted"),
    (lambda p, t: t.write_text("a,b\n1,2\n") and t, r"not a pyroflows file \(not a torch\.save archive\)"),
    (lambda p, t: t.write_bytes(b"") or t, "empty file"),
    (lambda p, t: torch.save({"weights": torch.ones(3)}, t) or t, "not a pyroflows model file .no pyroflows format tag"),
    (lambda p, t: torch.save(torch.ones(3), t) or t, "not a pyroflows model file"),
    (lambda p, t: edit(p, t, lambda d: d.pop("state_dict")), "missing key 'state_dict'"),
    (lambda p, t: edit(p, t, lambda d: d["flow"].update(name="nope")), "names the architecture 'nope'"),
    (lambda p, t: edit(p, t, lambda d: d["flow"].update(kwargs={"num_layers": 3})), "different flow architecture"),
    (lambda p, t: edit(p, t, lambda d: d["flow"].update(kwargs={"bogus": 1})), "cannot rebuild 'nsf'"),
    (lambda p, t: edit(p, t, lambda d: d.update(format_version=99)), "format 99.*upgrade pyroflows"),
    (lambda p, t: edit(p, t, lambda d: d.update(format="pyroflows-checkpoint")), "a pyroflows training checkpoint, not"),
    (lambda p, t: edit(p, t, lambda d: d["standardization"].update(std=-d["standardization"]["std"])), "std <= 0"),
    (lambda p, t: edit(p, t, lambda d: d.update(columns=["a"])), "'columns' must be 2 strings"),
])
def test_malformed_model_files_get_one_line_errors(model_file, tmp_path, make, match):
    path, _ = model_file
    bad = make(path, tmp_path / "bad.pt")
    with pytest.raises(FileFormatError, match=match) as e:
        load_model(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)


def test_save_model_writes_nothing_for_non_plain_arguments(tmp_path):
    from pyroflows.transforms.transformers import make_transformer

    path = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="only tensors, numbers, strings, lists and dicts"):
        save_model(path, make_flow("maf", 2), flow_name="maf", flow_kwargs={"kind": make_transformer("affine", 8, 5.0)})
    assert not path.exists() and not (tmp_path / "m.pt.tmp").exists()


def test_checkpoint_of_another_architecture_and_a_model_file(tmp_path, model_file):
    ck = tmp_path / "ck.pt"
    fit(make_flow("elementwise", 3), torch.randn(20, 3), epochs=1, batch_size=10, progress=False, checkpoint=ck)
    assert torch.load(ck, weights_only=True)["format"] == "pyroflows-checkpoint"
    with pytest.raises(FileFormatError, match="different flow architecture"):
        load_checkpoint(ck, make_flow("elementwise", 2))
    with pytest.raises(FileFormatError, match="a pyroflows model file, not a training checkpoint"):
        load_checkpoint(model_file[0], make_flow("elementwise", 2))
    save_checkpoint(tmp_path / "partial.pt", {"flow": {}})
    with pytest.raises(FileFormatError, match="missing key 'optimizer'"):
        load_checkpoint(tmp_path / "partial.pt", make_flow("elementwise", 2))


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(format=["pyroflows-model"]), "format tag"),
    (lambda d: d.update(flow="nsf"), "'flow' must be a dict"),
    (lambda d: d["flow"].update(input_dim="2"), "'input_dim' must be a int or list"),
    (lambda d: d.update(state_dict={"x": 1}), "dict of tensors"),
    (lambda d: d.update(train_log_prob=torch.zeros(2, 2)), "must be 1-D"),
])
def test_wrong_types_inside_a_model_file(model_file, tmp_path, change, match):
    bad = edit(model_file[0], tmp_path / "bad.pt", change)
    with pytest.raises(FileFormatError, match=match):
        load_model(bad)


@pytest.mark.parametrize("change,match", [
    (lambda d: d["optimizer"].update(param_groups=[{"params": 3}]), "not an optimizer state dict"),
    (lambda d: d["history"].update(train_nll=["x"]), "lists of numbers"),
    (lambda d: d.update(generator=torch.zeros(3)), "uint8"),
    (lambda d: d.update(best="low"), "'best' must be a float or int"),
])
def test_wrong_types_inside_a_checkpoint(tmp_path, change, match):
    ck = tmp_path / "ck.pt"
    fit(make_flow("elementwise", 2), torch.randn(20, 2), epochs=1, batch_size=10, progress=False, checkpoint=ck)
    bad = edit(ck, tmp_path / "bad.pt", change)
    with pytest.raises(FileFormatError, match=match):
        load_checkpoint(bad, make_flow("elementwise", 2))


def test_an_old_full_pickle_checkpoint_is_refused_saying_why(tmp_path):
    """Checkpoints of the first release pickled a History object: refused, not unpickled."""
    from pyroflows.train import History

    flow = make_flow("elementwise", 2)
    old = tmp_path / "old.pt"
    torch.save({"flow": flow.state_dict(), "optimizer": {}, "history": History(), "best": 1.0, "best_state": None,
                "since_best": 0, "generator": torch.Generator().get_state()}, old)
    with pytest.raises(FileFormatError, match=r"refused: the file imports 'pyroflows\.train\.History': loading it "
                                              r"would unpickle Python objects, which can run code"):
        load_checkpoint(old, flow)
