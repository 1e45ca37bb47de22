"""Progress bars: on a terminal only by default (``progress=None``), forced by True, never with False."""

import pytest
import torch

from pyroflows import flows
from pyroflows.infer import distill
from pyroflows.progress import progress_bar
from pyroflows.train import fit


def _run_fit(progress):
    torch.manual_seed(0)
    fit(flows.maf(2, num_layers=1), torch.randn(64, 2), epochs=2, batch_size=32, lr=1e-3, progress=progress)


def _run_distill(progress):
    torch.manual_seed(0)
    distill(flows.maf(2, num_layers=1), lambda z: -0.5 * (z * z).sum(-1), num_steps=3, num_samples=8,
            num_eval_samples=64, progress=progress)


@pytest.mark.parametrize("run", [_run_fit, _run_distill])
def test_bar_only_where_asked(run, capsys):
    # pytest's captured stderr is not a terminal: auto mode prints nothing there
    run(None)
    assert capsys.readouterr().err == ""
    run(False)
    assert capsys.readouterr().err == ""
    run(True)
    assert "|" in capsys.readouterr().err  # a tqdm bar was drawn


def test_progress_rejects_other_values():
    with pytest.raises(TypeError, match="progress must be None"):
        progress_bar(range(3), "yes")
