"""Worked problems of Prince, "Understanding Deep Learning", chapter 16 (Normalizing flows).

Each answer is written out by hand here and compared with what the library computes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import TransformedDistribution, Uniform
from torch.distributions.transforms import PowerTransform

import pyroflows.transforms as T
from pyroflows.transforms.transformers import MIN_BIN_SIZE
from pyroflows import Flow

f64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=f64)


# --- problem 16.4: inverse and determinant of two linear flows ----------------------

OMEGA1 = _t([[2, 0, 0, 0], [0, -5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]])
OMEGA1_INV = _t([[1 / 2, 0, 0, 0], [0, -1 / 5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1 / 2]])
OMEGA1_ABS_DET = 20.0  # |2 * (-5) * 1 * 2|

OMEGA2 = _t([[1, 0, 0, 0], [2, 4, 0, 0], [1, -1, 2, 0], [4, -2, -2, 1]])
# forward substitution, row by row
OMEGA2_INV = _t([[1, 0, 0, 0], [-1 / 2, 1 / 4, 0, 0], [-3 / 4, 1 / 8, 1 / 2, 0], [-13 / 2, 3 / 4, 1, 1]])
OMEGA2_ABS_DET = 8.0  # product of the diagonal, 1 * 4 * 2 * 1

PROBLEM_16_4 = [
    pytest.param(T.Dense, OMEGA1, OMEGA1_INV, OMEGA1_ABS_DET, id="dense-omega1"),
    pytest.param(T.LU, OMEGA1, OMEGA1_INV, OMEGA1_ABS_DET, id="lu-omega1"),
    pytest.param(T.Dense, OMEGA2, OMEGA2_INV, OMEGA2_ABS_DET, id="dense-omega2"),
    pytest.param(T.LU, OMEGA2, OMEGA2_INV, OMEGA2_ABS_DET, id="lu-omega2"),
    pytest.param(T.Triangular, OMEGA2, OMEGA2_INV, OMEGA2_ABS_DET, id="triangular-omega2"),
]


def test_16_4_hand_computed_answers_are_right():
    eye = torch.eye(4, dtype=f64)
    assert torch.equal(OMEGA1 @ OMEGA1_INV, eye) and torch.equal(OMEGA2 @ OMEGA2_INV, eye)


@pytest.mark.parametrize("cls,omega,omega_inv,abs_det", PROBLEM_16_4)
def test_16_4_linear_flow_inverse_and_determinant(cls, omega, omega_inv, abs_det):
    layer = cls.from_matrix(omega)
    assert torch.allclose(layer.matrix(), omega, atol=1e-12)
    x = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=f64)
    # the forward Jacobian is the matrix itself
    assert torch.allclose(jacobian(layer._call, x), omega, atol=1e-12)
    # the inverse: rows e_i map to the columns of Omega^{-1}
    eye = torch.eye(4, dtype=f64)
    assert torch.allclose(layer.inv(eye).T, omega_inv, atol=1e-12)
    assert torch.allclose(jacobian(layer._inverse, x), omega_inv, atol=1e-12)
    # log|det|: forward and inverse
    y = layer(x)
    assert math.isclose(layer.log_abs_det_jacobian(x, y).item(), math.log(abs_det), abs_tol=1e-12)
    assert math.isclose(layer.inv.log_abs_det_jacobian(y, x).item(), -math.log(abs_det), abs_tol=1e-12)


def test_16_4_omega1_needs_a_sign_so_triangular_rejects_it():
    with pytest.raises(ValueError, match="positive diagonal"):
        T.Triangular.from_matrix(OMEGA1)
    assert T.LU.from_matrix(OMEGA1).diag_sign.tolist() == [1.0, -1.0, 1.0, 1.0]


# --- problem 16.7: leaky ReLU -------------------------------------------------------

def test_16_7_leaky_relu_inverse_and_jacobian():
    alpha = 0.2
    layer = T.leaky_relu(negative_slope=alpha)  # a fixed slope, as Pyro's
    x = _t([-2.0, -0.5, 0.3, 1.5, -4.0])
    # f(x) = x for x >= 0, alpha x otherwise; f^{-1}(y) = y for y >= 0, y / alpha otherwise
    y = layer(x)
    assert torch.allclose(y, _t([-0.4, -0.1, 0.3, 1.5, -0.8]))
    assert torch.allclose(layer.inv(y), x)
    # the Jacobian is diagonal with entries 1 (x >= 0) or alpha (x < 0)
    diag = _t([alpha, alpha, 1.0, 1.0, alpha])
    assert torch.allclose(jacobian(layer._call, x), torch.diag(diag), atol=1e-12)
    assert torch.allclose(jacobian(layer._inverse, y), torch.diag(1 / diag), atol=1e-12)
    # elementwise on any shape (event_dim 0, as Pyro's): the log-det of the vector map is the sum
    assert math.isclose(layer.log_abs_det_jacobian(x, y).sum().item(), 3 * math.log(alpha), abs_tol=1e-12)


# --- problem 16.8: piecewise-linear flow --------------------------------------------

def test_16_8_piecewise_linear_jacobian_is_k_times_bin_mass():
    K = 4
    q = _t([0.1, 0.2, 0.3, 0.4])  # bin masses, q = m + (1 - K m) softmax(theta)
    layer = T.piecewise_linear(1, count_bins=K).double()
    with torch.no_grad():
        layer.params.copy_(((q - MIN_BIN_SIZE) / (1 - K * MIN_BIN_SIZE)).log().unsqueeze(0))
    h = _t([0.05, 0.30, 0.55, 0.90])  # one point in each bin b = 0, 1, 2, 3
    # h' = sum_{k<b} q_k + (K h - b) q_b
    expected = _t([0.0 + 0.2 * 0.1,
                   0.1 + 0.2 * 0.2,
                   0.3 + 0.2 * 0.3,
                   0.6 + 0.6 * 0.4])
    for b in range(K):
        x = h[b:b + 1]
        y = layer(x)
        assert torch.allclose(y, expected[b:b + 1])
        assert torch.allclose(layer.inv(y), x)
        dy_dx = jacobian(layer._call, x)
        assert torch.allclose(dy_dx, K * q[b].reshape(1, 1))  # autograd agrees with the closed form
        assert torch.allclose(layer.log_abs_det_jacobian(x, y), torch.log(K * q[b]))


# --- problems 16.1 and 16.2: densities of pushed-forward variables ------------------

def test_16_1_uniform_squared_has_density_one_over_two_sqrt_x():
    x = torch.linspace(0.01, 0.99, 50, dtype=f64)
    dist = TransformedDistribution(Uniform(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64)),
                                   PowerTransform(torch.tensor(2.0, dtype=f64)))
    assert torch.allclose(dist.log_prob(x), -torch.log(2 * torch.sqrt(x)), atol=1e-12)


def test_16_2_normal_through_sigmoid_has_logit_normal_density():
    x = torch.linspace(0.01, 0.99, 50, dtype=f64).unsqueeze(-1)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    expected = normal.log_prob(torch.log(x / (1 - x))) - torch.log(x * (1 - x))
    flow = Flow([T.sigmoid(1)]).double()
    assert torch.allclose(flow.log_prob(x), expected.squeeze(-1), atol=1e-10)
