"""pyroflows.plot: every picture renders to a PNG."""

import pytest
import torch

from pyroflows import Flow
from pyroflows.data import EightGaussians
from pyroflows.train import History
from pyroflows.transforms.elementwise import elementwise

pytest.importorskip("matplotlib")
from pyroflows import plot


def flow2d():
    torch.manual_seed(0)
    return Flow([elementwise(2, kind="piecewise_linear"), elementwise(2, kind="affine"),
                 elementwise(2, kind="piecewise_linear")])


def saved(fig, tmp_path, name):
    path = tmp_path / name
    fig.savefig(path)
    plot.close(fig)
    return path.stat().st_size > 1000


def test_density_2d_from_flow_density_and_callable(tmp_path):
    d = EightGaussians()
    assert saved(plot.density_2d(flow2d(), samples=d.sample(100, seed=0), grid=30), tmp_path, "a.png")
    assert saved(plot.density_2d(d.log_prob, grid=30, title="true"), tmp_path, "b.png")
    assert saved(plot.compare_2d(d.log_prob, flow2d(), grid=30), tmp_path, "c.png")


def test_flow_layers_2d_one_panel_per_layer(tmp_path):
    fig = plot.flow_layers_2d(flow2d(), grid=20)
    assert len(fig.axes) == 4  # base + 3 layers
    assert saved(fig, tmp_path, "layers.png")


def test_density_1d_and_training_curves(tmp_path):
    torch.manual_seed(0)
    flow = Flow([elementwise(1, kind="affine")])
    assert saved(plot.density_1d(flow, data=torch.randn(200, 1), true_log_prob=lambda x: -0.5 * x[:, 0] ** 2),
                 tmp_path, "d.png")
    h = History(train_nll=[3.0, 2.0, 1.5], val_nll=[3.1, 2.2, 2.4], best_epoch=1)
    assert saved(plot.training_curves(h), tmp_path, "h.png")


@pytest.mark.parametrize("shape", [(6, 64), (6, 8, 8), (6, 1, 8, 8), (6, 3, 8, 8)])
def test_image_grid(tmp_path, shape):
    assert saved(plot.image_grid(torch.rand(shape)), tmp_path, "g.png")
