"""Worked problems of Prince, "Understanding Deep Learning", chapter 16 (Normalizing flows).

Each answer is written out by hand here and compared with what the library computes.
"""

from __future__ import annotations

import math

import pyro.distributions as pdist
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import MultivariateNormal, constraints

import pyroflows.transforms as T
from pyroflows import Flow
from pyroflows.infer import distill
from pyroflows.transforms.transformers import MIN_BIN_SIZE, Affine, Transformer

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
    # the book's leaky ReLU: f(z) = 0.1 z for z < 0, z for z >= 0 (a fixed slope, as Pyro's)
    alpha = 0.1
    layer = T.leaky_relu(negative_slope=alpha)
    z = _t([-2.0, -0.5, 0.3, 1.5, -4.0])
    # f^{-1}(x) = x for x >= 0, x / 0.1 = 10 x otherwise
    x = layer(z)
    assert torch.allclose(x, _t([-0.2, -0.05, 0.3, 1.5, -0.4]))
    assert torch.allclose(layer.inv(x), z)
    # the Jacobian of f is diagonal with entries 1 (z >= 0) or 0.1 (z < 0); that of f^{-1}
    # has 1 or 10, so |d f^{-1} / d x| = prod_d (1 or 10) = 10^(number of negative entries)
    diag = _t([alpha, alpha, 1.0, 1.0, alpha])
    assert torch.allclose(jacobian(lambda v: layer(v), z), torch.diag(diag), atol=1e-12)
    assert torch.allclose(jacobian(lambda v: layer.inv(v), x), torch.diag(1 / diag), atol=1e-12)
    # elementwise on any shape (event_dim 0, as Pyro's): the log-det of the vector map is the sum
    assert math.isclose(layer.log_abs_det_jacobian(z, x).sum().item(), 3 * math.log(0.1), abs_tol=1e-12)
    assert math.isclose(layer.inv.log_abs_det_jacobian(x, z).sum().item(), math.log(10 ** 3), abs_tol=1e-12)


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

class _Square(Transformer):
    """The problem's f(z) = z^2 on [0, 1], written as a transformer (pure functions returning
    the output and log f'): pyroflows has no squaring layer (its splines keep a minimum slope,
    so none is exactly z^2, whose slope is 0 at z = 0)."""

    num_params = 0

    def forward(self, z, params):
        return z * z, torch.log(2 * z)

    def inverse(self, x, params):
        z = torch.sqrt(x)
        return z, torch.log(2 * z)


def test_16_1_uniform_squared_has_density_one_over_two_sqrt_x():
    # z ~ U[0, 1], x = f(z) = z^2.  f^{-1}(x) = sqrt(x), |df/dz| = 2z = 2 sqrt(x), so
    # Pr(x) = Pr(z) |df/dz|^{-1} = 1 / (2 sqrt(x)) on (0, 1]  (it integrates to [sqrt x]_0^1 = 1)
    layer = T.Elementwise(_Square(), 1, domain=constraints.independent(constraints.unit_interval, 1))
    flow = Flow([layer]).double()  # a unit-interval first layer gets the uniform base
    x = torch.linspace(0.01, 0.99, 50, dtype=f64).unsqueeze(-1)
    assert torch.allclose(flow.log_prob(x), -torch.log(2 * torch.sqrt(x)).squeeze(-1), atol=1e-12)
    # and sampling runs the same layer forward: the CDF of x is P(z^2 <= x) = sqrt(x)
    torch.manual_seed(0)
    s = flow.sample((20000,)).squeeze(-1)
    for q in (0.1, 0.25, 0.5, 0.8):
        p = (s <= q).double().mean().item()
        assert abs(p - math.sqrt(q)) < 5 * math.sqrt(math.sqrt(q) * (1 - math.sqrt(q)) / 20000)


def test_16_2_normal_through_sigmoid_has_logit_normal_density():
    x = torch.linspace(0.01, 0.99, 50, dtype=f64).unsqueeze(-1)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    expected = normal.log_prob(torch.log(x / (1 - x))) - torch.log(x * (1 - x))
    flow = Flow([T.sigmoid(1)]).double()
    assert torch.allclose(flow.log_prob(x), expected.squeeze(-1), atol=1e-10)


# --- problem 16.3 (eqs. 16.4-16.8): the Jacobian of the inverse mapping ---------------

def _perturbed(layers, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layers


def test_16_3_inverse_jacobian_is_the_reversed_product_of_layer_inverses():
    # z = f^{-1}(x) = f_1^{-1}(f_2^{-1}(... f_K^{-1}(x))) (eq. 16.5), so by the chain rule
    #   d f^{-1}/dx = d f_1^{-1}/d h_1 . d f_2^{-1}/d h_2 ... d f_K^{-1}/d x      (h_k = output of f_k)
    # and |d f^{-1}/dx| = prod_k |d f_k^{-1}/d h_k| = prod_k |d f_k / d h_{k-1}|^{-1}, the reciprocal of
    # eq. 16.7; log Pr(x) = log Pr(z) + sum_k log |d f_k^{-1}/d h_k| (eq. 16.8 sums its negative).
    torch.manual_seed(0)
    layers = [T.lu(3).double(), T.spline_coupling(3).double(), T.elementwise(3, kind="rq_spline").double(),
              T.masked_autoregressive(3).double()]
    _perturbed(layers)
    flow = Flow(layers).double()
    x = _t([0.4, -1.1, 0.7])

    hs = [x]  # h_K = x, then h_{K-1}, ..., h_0 = z
    for layer in reversed(layers):
        hs.append(layer.inv(hs[-1]))
    z = hs[-1]

    def full_inverse(v):
        for layer in reversed(layers):
            v = layer.inv(v)
        return v

    product = torch.eye(3, dtype=f64)
    for layer, h in zip(reversed(layers), hs[:-1]):  # K^{-1} at x first: it is the rightmost factor
        product = jacobian(lambda v, f=layer: f.inv(v), h) @ product
    J = jacobian(full_inverse, x)
    assert torch.allclose(J, product, atol=1e-10)
    # ... and it is the inverse of the forward Jacobian (eq. 16.6)
    assert torch.allclose(J @ jacobian(lambda v: _forward(layers, v), z),
                          torch.eye(3, dtype=f64), atol=1e-10)
    log_abs_det = torch.linalg.slogdet(J)[1]
    layer_sum = sum(layer.inv.log_abs_det_jacobian(h, layer.inv(h)) for layer, h in zip(reversed(layers), hs[:-1]))
    assert torch.allclose(log_abs_det, layer_sum, atol=1e-10)
    normal = torch.distributions.Normal(torch.zeros(3, dtype=f64), 1.0)
    assert torch.allclose(flow.log_prob(x), normal.log_prob(z).sum() + log_abs_det, atol=1e-10)


def _forward(layers, v):
    for layer in layers:
        v = layer(v)
    return v


# --- problems 16.5 and 16.6: an affine map of a random variable ----------------------

A = _t([[2.0, 0.5, 0.0], [-1.0, 1.0, 0.3], [0.0, 0.2, 0.7]])
B = _t([1.0, -2.0, 0.5])
MU = _t([0.3, -0.4, 1.2])
SIGMA = _t([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 0.8]])


def test_16_5_affine_map_moves_mean_and_covariance():
    # x = A z + b.  E[x] = E[A z + b] = A E[z] + b = A mu + b (linearity of expectation), and
    # Cov[x] = E[(x - E x)(x - E x)^T] = E[A (z - mu)(z - mu)^T A^T] = A Sigma A^T.
    # Linearity holds for any distribution of z, the empirical one of a sample included, so the
    # identities are exact for sample moments (checked first, on a non-Gaussian z) ...
    torch.manual_seed(0)
    layer = T.Dense.from_matrix(A, bias=B)
    z = torch.distributions.Exponential(torch.tensor(1.0, dtype=f64)).sample((5000, 3)) @ SIGMA
    x = layer(z)
    assert torch.allclose(x.mean(0), A @ z.mean(0) + B, atol=1e-12)
    assert torch.allclose(torch.cov(x.T), A @ torch.cov(z.T) @ A.T, atol=1e-10)
    # ... and the flow's samples from z ~ N(mu, Sigma) have mean A mu + b and covariance A Sigma A^T
    # (within 5 standard errors; n = 40000)
    flow = Flow([layer], base=pdist.MultivariateNormal(MU, SIGMA))
    n = 40000
    xs = flow.sample((n,))
    cov = A @ SIGMA @ A.T
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((xs.mean(0) - (A @ MU + B)).abs() <= 5 * se_mean).all()
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov ** 2) / n).sqrt()
    assert ((torch.cov(xs.T) - cov).abs() <= 5 * se_cov).all()


def test_16_6_affine_map_of_a_normal_is_normal():
    # Pr(x) = Pr(z) |A|^{-1} with z = A^{-1}(x - b).  Writing out Norm_z[mu, Sigma]:
    #   (z - mu)^T Sigma^{-1} (z - mu) = (x - A mu - b)^T A^{-T} Sigma^{-1} A^{-1} (x - A mu - b)
    #                                  = (x - A mu - b)^T (A Sigma A^T)^{-1} (x - A mu - b),
    #   |2 pi Sigma|^{1/2} |A| = |2 pi A Sigma A^T|^{1/2},
    # so Pr(x) = Norm_x[A mu + b, A Sigma A^T].
    flow = Flow([T.Dense.from_matrix(A, bias=B)], base=pdist.MultivariateNormal(MU, SIGMA))
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(200, 3, generator=g, dtype=f64)
    expected = MultivariateNormal(A @ MU + B, A @ SIGMA @ A.T).log_prob(x)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-10)


# --- problem 16.9: a conical combination of square roots in equal bins ----------------

PHI = _t([0.1, 0.2, 0.5, 0.1, 0.1])  # K = 5, positive, sums to one


class _SqrtBins(Transformer):
    """The problem's map, in 0-based bins b = floor(K h):
    f(h) = sum_{k<b} sqrt(phi_k) + sqrt((K h - b) phi_b), continuous at the bin edges."""

    num_params = 0

    def __init__(self, phi):
        self.phi = phi
        self.knots = torch.cat([torch.zeros(1, dtype=phi.dtype), phi.sqrt().cumsum(0)])

    def _bin(self, h):
        return (len(self.phi) * h).floor().clamp(0, len(self.phi) - 1).long()

    def forward(self, h, params):
        K, b = len(self.phi), self._bin(h)
        frac = K * h - b
        y = self.knots[b] + torch.sqrt(frac * self.phi[b])
        return y, torch.log(K * self.phi[b].sqrt() / (2 * frac.sqrt()))

    def inverse(self, y, params):
        K = len(self.phi)
        b = (torch.searchsorted(self.knots, y.contiguous(), right=True) - 1).clamp(0, K - 1)
        frac = (y - self.knots[b]) ** 2 / self.phi[b]
        h = (b + frac) / K
        return h, torch.log(K * self.phi[b].sqrt() / (2 * frac.sqrt()))


def test_16_9_square_root_bins_and_their_inverse():
    # Worked by hand (K = 5, phi = 0.1, 0.2, 0.5, 0.1, 0.1): at the bin edges h = k/5,
    #   f = 0, .31623, .76344, 1.47055, 1.78678, 2.10300  (running sums of sqrt(phi_k));
    # inside bin b, f rises like a square root: f(0.5) = f(0.4) + sqrt(0.5 * 0.5) = 1.26344.
    # The slope K sqrt(phi_b) / (2 sqrt(K h - b)) is infinite at every bin's left edge and
    # K sqrt(phi_b) / 2 at its right edge, so f is continuous and increasing but not smooth.
    # The inverse, bin by bin, is a quadratic: h = (b + (h' - f(b/K))^2 / phi_b) / K, with slope 0
    # at each knot.  The range is [0, sum_k sqrt(phi_k)] = [0, 2.103], not [0, 1]: the sqrt(phi_k)
    # do not sum to one, so as a flow on [0, 1] the map must be divided by 2.103.
    layer = T.Elementwise(_SqrtBins(PHI), 1, domain=constraints.independent(constraints.unit_interval, 1))
    layer = layer.double()
    edges = _t([0.0, 0.2, 0.4, 0.6, 0.8, 1.0 - 1e-15]).unsqueeze(-1)
    hand = _t([0.0, 0.316228, 0.763441, 1.470548, 1.786776, 2.103003])
    assert torch.allclose(layer(edges).squeeze(-1), hand, atol=1e-6)
    assert math.isclose(layer(_t([[0.5]])).item(), 1.263441, abs_tol=1e-6)
    # the inverse is the hand-derived piecewise quadratic
    h = torch.linspace(0.01, 0.99, 97, dtype=f64).unsqueeze(-1)
    y = layer(h)
    b = (5 * h).floor()
    knots = _t([0.0, 0.316228, 0.763441, 1.470548, 1.786776])
    quadratic = (b + (y - knots[b.long()]) ** 2 / PHI[b.long()]) / 5
    assert torch.allclose(layer.inv(y), h, atol=1e-12)
    assert torch.allclose(quadratic, h, atol=1e-5)
    # increasing, and concave inside each bin (a square root), log-det = log f'(h) (autograd)
    assert (y[1:] > y[:-1]).all()
    for x in h[::7]:
        d = jacobian(lambda v: layer(v), x).squeeze()
        assert math.isclose(layer.log_abs_det_jacobian(x, layer(x)).item(), math.log(d.item()), rel_tol=1e-9)


# --- problem 16.10 and the iRevNet correction (eqs. 16.18-16.19) ----------------------

class _Elementwise(torch.nn.Module):
    """f(h) = a * tanh(h) + c, one (a, c) per dimension: an elementwise map."""

    def __init__(self, d, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(d, generator=g, dtype=f64))
        self.c = torch.nn.Parameter(torch.randn(d, generator=g, dtype=f64))

    def forward(self, h):
        return self.a * torch.tanh(h) + self.c


def test_16_10_jacobian_structure_of_the_reversible_residual_block():
    # h'_1 = h_1 + f_1(h_2), h'_2 = h_2 + f_2(h'_1).  With A_1 = df_1/dh_2 (at h_2) and
    # A_2 = df_2/dh'_1 (at h'_1), the chain rule gives
    #   J = [[I, 0], [A_2, I]] @ [[I, A_1], [0, I]] = [[I, A_1], [A_2, I + A_2 A_1]],
    # a product of two unit-triangular block matrices: det J = 1 whatever f_1, f_2 are.
    # (i) f_1, f_2 fully connected networks: A_1, A_2 are dense, so J is dense apart from the
    #     identity block (zeros off its diagonal).
    # (ii) f_1, f_2 elementwise: A_1, A_2 are diagonal, so each of the four blocks is diagonal.
    torch.manual_seed(0)
    layer = _perturbed([T.ReversibleResidual(4, num_blocks=1).double()], scale=0.5)[0]
    block = layer.blocks[0]
    x = _t([0.3, -0.8, 1.1, 0.4])
    eye = torch.eye(2, dtype=f64)
    for case in ("fully connected", "elementwise"):
        if case == "elementwise":
            block.F, block.G = _Elementwise(2, 1), _Elementwise(2, 2)
        J = jacobian(lambda v: layer(v), x)
        y1 = x[:2] + block.F(x[2:])
        A1, A2 = jacobian(block.F, x[2:]), jacobian(block.G, y1)
        expected = torch.cat([torch.cat([eye, A1], 1), torch.cat([A2, eye + A2 @ A1], 1)], 0)
        assert torch.allclose(J, expected, atol=1e-12)
        assert torch.equal(J[:2, :2], eye)
        blocks = [J[:2, 2:], J[2:, :2], J[2:, 2:]]
        if case == "fully connected":
            assert all((blk.abs() > 1e-6).all() for blk in blocks)
        else:
            assert all(torch.equal(blk, torch.diag(torch.diagonal(blk))) for blk in blocks)
        assert math.isclose(torch.linalg.det(J).item(), 1.0, abs_tol=1e-12)


def test_irevnet_deep_stack_log_det_is_zero_against_autograd_slogdet():
    # Each additive half-update h'_1 = h_1 + f_1(h_2) has the Jacobian [[I, A], [0, I]] (unit
    # triangular), so every block, and any stack of them, has |det J| = 1: log-det exactly 0,
    # whatever the networks (against the chapter's remark on this block's Jacobian).
    # (10 blocks far from the identity yet conditioned well enough, cond(J) < 1e4, for float64's
    # slogdet to be meaningful: much larger weights make J numerically singular, not det != 1)
    torch.manual_seed(0)
    layer = _perturbed([T.ReversibleResidual(6, num_blocks=10).double()], scale=0.2)[0]
    g = torch.Generator().manual_seed(3)
    for x in torch.randn(3, 6, generator=g, dtype=f64):
        J = jacobian(lambda v: layer(v), x)
        assert not torch.allclose(J, torch.eye(6, dtype=f64), atol=0.1)  # far from the identity
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign.item() == 1.0 and abs(logabsdet.item()) < 1e-10
        assert layer.log_abs_det_jacobian(x, layer(x)).item() == 0.0


# --- problem 16.11 (eq. 16.25): reverse KL to a density known up to a constant --------

class _NoInverse(T.Elementwise):
    """An elementwise affine layer whose inverse may not be called."""

    def _inverse_and_ladj(self, y):
        raise AssertionError("the inverse was evaluated")


def _target(log_kappa):
    target = MultivariateNormal(_t([1.0, -0.5]), _t([[1.0, 0.4], [0.4, 0.6]]))
    return lambda x: target.log_prob(x) + log_kappa


def test_16_11_reverse_kl_ignores_the_scale_and_never_inverts_the_flow():
    # Eq. 16.25 written out, with samples x = f(z), z ~ Pr(z), and the flow's density q_phi:
    #   KL[q_phi || p] = E_z[ log q_phi(f(z)) - log p(f(z)) ],
    #   log q_phi(f(z)) = log Pr(z) - log |df/dz|   (eq. 16.1 at the sample's own z).
    # With only p~ = kappa p known, E_z[log q_phi - log p~] = KL - log kappa: a constant shift,
    # so the minimiser and every gradient are unchanged.  Both terms need only the forward
    # pass z -> x and its log-det, so the inverse is never evaluated (it need not be cheap, as
    # in IAF); f must still be a bijection for q_phi to be the density of x (a many-to-one f
    # would add the densities of all its preimages).
    from copy import deepcopy

    layers = [_NoInverse(Affine(), 2).double(), T.Dense.from_matrix(_t([[1.0, 0.0], [0.5, 1.0]]))]
    fits = []
    for log_kappa in (0.0, math.log(1000.0)):
        flow = Flow(deepcopy(layers)).double()
        torch.manual_seed(0)
        # plain eq. 16.25: no tempering, no importance-weighted term (it scores through the inverse)
        result = distill(flow, _target(log_kappa), num_steps=40, num_samples=64, lr=0.05, progress=False,
                         num_eval_samples=256, anneal_steps=0, is_forward_kl_weight=0.0, lr_schedule="constant")
        fits.append((result, [p.detach().clone() for p in flow.parameters()]))
    (r1, p1), (r2, p2) = fits
    assert torch.allclose(torch.tensor(r1.losses) - math.log(1000.0), torch.tensor(r2.losses), atol=1e-9)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(p1, p2))
    assert math.isclose(r2.log_z - r1.log_z, math.log(1000.0), abs_tol=1e-9)
    assert r1.losses[-1] < r1.losses[0]  # and it does fit


# --- eq. 16.22: the power series of the log-determinant ------------------------------

def test_eq_16_22_log_det_power_series_is_the_trace_of_matrix_powers():
    # For f(u) = u + g(u) with Lip(g) < 1 every eigenvalue lambda of J = dg/du has |lambda| < 1, and
    #   log|I + J| = sum over eigenvalues of log(1 + lambda) = sum_k (-1)^(k-1) trace(J^k) / k
    # (Mercator's series per eigenvalue; trace(J^k) = sum lambda^k).  The sign starts at +, the
    # weight is 1/k and the power sits inside the trace.  The other readings are wrong:
    # sum (-1)^(k-1) trace(J)^k / k = log(1 + trace J), and the opposite signs give -log|I + J|.
    torch.manual_seed(1)
    layer = T.InvertibleResidual(4, (), 0.9, "exact", "forward").double()  # g linear: J constant
    u = _t([0.2, -0.3, 0.5, 0.1])
    J = jacobian(layer.g, u)
    exact = torch.linalg.slogdet(torch.eye(4, dtype=f64) + J)[1]
    assert torch.allclose(layer.log_abs_det_jacobian(u, layer(u)), exact, atol=1e-12)
    series = sum((-1) ** (k - 1) * torch.trace(torch.linalg.matrix_power(J, k)) / k for k in range(1, 300))
    assert torch.allclose(series, exact, atol=1e-10)
    power_of_trace = sum((-1) ** (k - 1) * torch.trace(J) ** k / k for k in range(1, 300))
    assert abs(power_of_trace - exact) > 1e-2 and abs(exact) > 1e-2
    # pyroflows' series estimator (Hutchinson probes, eqs. 16.23-16.24) converges to it
    layer.log_det, layer.n_terms = "series", 60
    n = 20000
    with torch.no_grad():
        est = layer.log_abs_det_jacobian(u.expand(n, 4), layer(u.expand(n, 4)))
    assert abs(est.mean() - exact) <= 4 * est.std() / n ** 0.5


# --- eq. 16.12: the piecewise-linear map in 0-based bins -----------------------------

def test_eq_16_12_piecewise_linear_is_continuous_with_zero_based_bins():
    # With b = floor(K h) (0-based), f(h) = sum_{k<b} q_k + (K h - b) q_b: the fraction K h - b lies
    # in [0, 1), f is continuous at every edge h = b/K (both sides give sum_{k<b} q_k) and maps
    # [0, 1] onto [0, 1].  Mixing a 1-based b = floor(K h) + 1 with that fraction makes it negative.
    K = 4
    q = _t([0.1, 0.2, 0.3, 0.4])
    layer = T.piecewise_linear(1, count_bins=K).double()
    with torch.no_grad():
        layer.params.copy_(((q - MIN_BIN_SIZE) / (1 - K * MIN_BIN_SIZE)).log().unsqueeze(0))
    cum = torch.cat([torch.zeros(1, dtype=f64), q.cumsum(0)])
    for b in range(1, K):
        left, right = layer(_t([[b / K - 1e-12]])), layer(_t([[b / K + 1e-12]]))
        assert math.isclose(left.item(), cum[b].item(), abs_tol=1e-9)
        assert math.isclose(right.item(), cum[b].item(), abs_tol=1e-9)
    assert layer(_t([[0.0]])).item() == 0.0 and math.isclose(layer(_t([[1.0]])).item(), 1.0, abs_tol=1e-12)
