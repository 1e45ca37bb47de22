r"""Linear flows: :math:`y = W x + b` with a structured, invertible :math:`W`.

A linear layer mixes dimensions, which elementwise layers cannot; the
structure of :math:`W` decides what its determinant and inverse cost
(Prince, "Understanding Deep Learning", section 16.3, linear flows):

===================  ==============================  ==============  ==============
layer                :math:`W`                       log-det         inverse
===================  ==============================  ==============  ==============
``diagonal``         :math:`\mathrm{diag}(e^{s})`    :math:`O(D)`    :math:`O(D)`
``Triangular``       lower, positive diagonal        :math:`O(D)`    :math:`O(D^2)`
``LU``               :math:`P L (U + D)`             :math:`O(D)`    :math:`O(D^2)`
``Householder``      :math:`H_K \cdots H_1`          0               :math:`O(KD)`
``Dense``            any invertible matrix           :math:`O(D^3)`  :math:`O(D^3)`
===================  ==============================  ==============  ==============

Costs are per batch (the log-det) and per row (the inverse).  ``Dense`` is the
slow reference the others are checked against.  Each ``Triangular``, ``LU``
and ``Dense`` layer can be set from a given matrix with ``from_matrix`` and
returns its matrix with ``matrix()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import MLP
from .base import Bijector, ConditionalBijector
from .elementwise import Elementwise, check_context_dim, check_input_dim
from .permutation import StoredPermutation
from .transformers import Affine

__all__ = [
    "LU",
    "ConditionalHouseholder",
    "Dense",
    "Householder",
    "Triangular",
    "conditional_householder",
    "dense",
    "diagonal",
    "householder",
    "lu",
    "triangular",
]


# --- shared helpers ---------------------------------------------------------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` of shape ``(..., D)`` as a matrix of rows ``(N, D)`` (``N >= 1``)."""
    return x.reshape(-1, x.shape[-1])


def _batch_ladj(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A constant log-det ``value`` (a scalar tensor) expanded to the batch shape of ``x``."""
    return value.expand(x.shape[:-1])


def _as_square_matrix(matrix, name: str = "matrix") -> torch.Tensor:
    matrix = torch.as_tensor(matrix)
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.get_default_dtype())
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty square matrix (D, D), got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} has non-finite entries")
    return matrix


def _set_bias(layer, bias, dim: int, dtype) -> None:
    if bias is None:
        return
    bias = torch.as_tensor(bias, dtype=dtype)
    if bias.shape != (dim,):
        raise ValueError(f"bias must have shape ({dim},), got {tuple(bias.shape)}")
    layer.bias.copy_(bias)


def _make_permutation(permutation, dim: int, seed: int | None) -> torch.Tensor:
    """Indices ``perm`` of the permutation matrix :math:`P` with :math:`(Pz)_i = z_{perm[i]}`."""
    if isinstance(permutation, str):
        if permutation == "identity":
            return torch.arange(dim)
        if permutation == "random":
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            return torch.randperm(dim, generator=generator)
        raise ValueError(f"permutation must be 'random', 'identity' or a sequence of indices, got {permutation!r}")
    perm = torch.as_tensor(permutation)
    if perm.dtype.is_floating_point or perm.shape != (dim,) or not torch.equal(perm.sort().values, torch.arange(dim)):
        raise ValueError(f"permutation must be a rearrangement of 0..{dim - 1}, got {permutation!r}")
    return perm.long().clone()


# --- LU ---------------------------------------------------------------------------

def lu_factors(lower, upper, log_abs_diag, diag_sign):
    r"""The triangular factors :math:`L` (unit lower) and :math:`U + D` (upper,
    :math:`D = \mathrm{diag}(\sigma e^{s})`) from unconstrained parameters.

    Only the strictly lower part of ``lower`` and the strictly upper part of
    ``upper`` are used, so one dense ``(..., D, D)`` tensor may serve as both.
    Leading batch dimensions are allowed (a conditional layer's network output).
    The log-determinant of :math:`P L (U + D)` is ``log_abs_diag.sum(-1)``."""
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    return torch.tril(lower, -1) + eye, torch.triu(upper, 1) + torch.diag_embed(diag_sign * log_abs_diag.exp())


def lu_matmul(rows, lower, upper, permutation):
    """Rows ``(..., N, D)`` times :math:`W^T` with :math:`W = P L U` (``lower``, ``upper``
    from :func:`lu_factors`; matrices may carry batch dimensions that broadcast)."""
    return ((rows @ upper.mT) @ lower.mT)[..., permutation]


def lu_solve(rows, lower, upper, inverse_permutation):
    """Rows ``(..., N, D)`` times :math:`W^{-T}`: two triangular solves, the inverse of :func:`lu_matmul`."""
    z = rows[..., inverse_permutation]  # P^T y, as rows
    # rows: x^T U^T L^T = z^T, solved one triangle at a time
    w = torch.linalg.solve_triangular(lower.mT, z, upper=True, left=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper.mT, w, upper=False, left=False)


@torch.no_grad()
def lu_decompose(matrix):
    """``(perm, lower, upper, log_abs_diag, diag_sign)`` of an invertible matrix by LU with
    partial pivoting, so that :func:`lu_factors` and ``perm`` give back :math:`W`."""
    P, L, U = torch.linalg.lu(matrix)
    diag = torch.diagonal(U)
    if (diag == 0).any():
        raise ValueError("matrix is singular: an LU flow needs an invertible matrix")
    return P.argmax(-1), torch.tril(L, -1), torch.triu(U, 1), diag.abs().log(), diag.sign()


class LU(Bijector):
    r"""Linear flow with an LU-factorised matrix (Kingma & Dhariwal, "Glow", 2018).

    .. math::

        y = P\,L\,(U + D)\,x + b, \qquad \log|\det J| = \sum_d \log|D_{dd}|,

    with a fixed permutation :math:`P` (a :class:`~pyroflows.transforms.permutation.StoredPermutation`:
    saved by ``state_dict`` and Pyro's param store, never trained), a unit lower-triangular
    :math:`L`, a strictly upper-triangular :math:`U` and a diagonal
    :math:`D = \mathrm{diag}(\sigma \odot e^{s})`: the learnable log-magnitude
    :math:`s` keeps every :math:`D_{dd}` away from zero for any real
    parameter values (so :math:`W` is always invertible), and the fixed signs
    :math:`\sigma \in \{\pm 1\}^D` (a buffer, all +1 unless set by
    :meth:`from_matrix`) let the layer represent matrices of either
    determinant sign.  Every invertible matrix has such a factorisation
    (LU with partial pivoting).

    Both directions are cheap: the forward pass is two triangular
    matrix-vector products, the inverse two triangular solves
    (``torch.linalg.solve_triangular``), :math:`O(D^2)` per row, and the
    log-det is :math:`O(D)`.

    Args:
        input_dim: :math:`D`.
        permutation: ``"random"`` (default), ``"identity"`` or a sequence of
            indices ``perm`` with :math:`(Pz)_i = z_{perm[i]}`.
        seed: seed of the random permutation (default: torch's global RNG).

    The layer starts at :math:`W = P` (``L = I``, ``U = 0``, ``D = I``), ``b = 0``.
    """

    def __init__(self, input_dim: int, permutation="random", seed: int | None = None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = check_input_dim(input_dim)
        self.event_shape = (dim,)
        self.stored = StoredPermutation(_make_permutation(permutation, dim, seed))
        self.register_buffer("diag_sign", torch.ones(dim))
        self.lower = nn.Parameter(torch.zeros(dim, dim))  # only the strictly lower part is used
        self.upper = nn.Parameter(torch.zeros(dim, dim))  # only the strictly upper part is used
        self.log_abs_diag = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def _factors(self):
        return lu_factors(self.lower, self.upper, self.log_abs_diag, self.diag_sign)

    @property
    def permutation(self) -> torch.Tensor:
        """The indices ``perm`` of :math:`P`, :math:`(Pz)_i = z_{perm[i]}`."""
        return self.stored.indices

    def matrix(self) -> torch.Tensor:
        """The assembled :math:`W = P L (U + D)` (for tests and inspection)."""
        lower, upper = self._factors()
        return (lower @ upper)[self.stored.indices]

    def _call_and_ladj(self, x):
        y = lu_matmul(x, *self._factors(), self.stored.indices) + self.bias
        return y, _batch_ladj(self.log_abs_diag.sum(), x)

    def _inverse_and_ladj(self, y):
        x = lu_solve(_rows(y - self.bias), *self._factors(), self.stored.inverse_indices).reshape(y.shape)
        return x, _batch_ladj(self.log_abs_diag.sum(), x)

    @classmethod
    @torch.no_grad()
    def from_matrix(cls, matrix, bias=None) -> LU:
        """The layer with :math:`W` = ``matrix`` (any invertible square matrix) and
        :math:`b` = ``bias`` (default 0), via LU with partial pivoting.  Its dtype
        is that of ``matrix``.  Raises ``ValueError`` if ``matrix`` is singular."""
        matrix = _as_square_matrix(matrix)
        dim = matrix.shape[0]
        perm, lower, upper, log_abs_diag, diag_sign = lu_decompose(matrix)
        layer = cls(dim, permutation=perm).to(matrix.dtype)
        layer.lower.copy_(lower)
        layer.upper.copy_(upper)
        layer.log_abs_diag.copy_(log_abs_diag)
        layer.diag_sign.copy_(diag_sign)
        _set_bias(layer, bias, dim, matrix.dtype)
        return layer


# --- triangular -------------------------------------------------------------------

def triangular_matrix(weight: torch.Tensor) -> torch.Tensor:
    r""":math:`L = \mathrm{tril}(A, -1) + \mathrm{diag}(e^{s})` from a packed ``weight`` of shape
    ``(D, D + 1)`` (:class:`Triangular`'s layout: :math:`A` below the diagonal of the square
    block, :math:`s` on it, the bias in the last column)."""
    square = weight[:, :-1]
    return torch.tril(square, -1) + torch.diag(square.diagonal().exp())


def triangular_forward(x: torch.Tensor, weight: torch.Tensor):
    r"""``(L x + b, sum s)`` for the packed ``weight`` of :func:`triangular_matrix` (the log-det
    is a scalar: the same for every row)."""
    return F.linear(x, triangular_matrix(weight), weight[:, -1]), weight[:, :-1].diagonal().sum()


def triangular_inverse(y: torch.Tensor, weight: torch.Tensor):
    r"""``(L^{-1} (y - b), sum s)``, a triangular solve, for the packed ``weight`` of
    :func:`triangular_matrix`."""
    rows = _rows(y - weight[:, -1])
    x = torch.linalg.solve_triangular(triangular_matrix(weight).T, rows, upper=True, left=False)
    return x.reshape(y.shape), weight[:, :-1].diagonal().sum()


class Triangular(Bijector):
    r"""Lower-triangular linear flow :math:`y = L x + b` with a positive diagonal.

    .. math::

        L = \mathrm{tril}(A, -1) + \mathrm{diag}(e^{s}), \qquad
        \log|\det J| = \sum_d s_d,

    so :math:`L` is invertible for any real parameters.  The forward pass is a
    triangular matrix-vector product, the inverse a triangular solve, both
    :math:`O(D^2)` per row; the log-det is :math:`O(D)`.  A triangular layer
    makes :math:`y_d` depend on :math:`x_{\le d}` only, a linear
    autoregressive flow (Prince, section 16.3).  Starts at the identity.

    The parameters live in one tensor, ``weight`` of shape ``(D, D + 1)``: its
    square block holds :math:`A` below the diagonal and :math:`s` on it
    (``lower`` and ``log_diag`` are views of them), its last column is
    :math:`b` (``bias``).  An optimizer that steps each parameter tensor
    separately (Pyro's ``PyroOptim``, about 0.2 ms of Python a tensor in an
    SVI step) steps one; elementwise optimizers (Adam, ``ClippedAdam``) take
    the same steps as on three tensors.  State dicts with the separate
    ``lower``, ``log_diag``, ``bias`` entries of earlier versions still load.
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = check_input_dim(input_dim)
        self.event_shape = (dim,)
        self.weight = nn.Parameter(torch.zeros(dim, dim + 1))  # [A with s on its diagonal | b]

    @property
    def lower(self) -> torch.Tensor:
        """The square block of ``weight``: :math:`A` below the diagonal, :math:`s` on it (a view;
        the part above the diagonal is not used)."""
        return self.weight[:, :-1]

    @property
    def log_diag(self) -> torch.Tensor:
        """:math:`s`, the log of :math:`L`'s diagonal (a view of ``weight``)."""
        return self.weight[:, :-1].diagonal()

    @property
    def bias(self) -> torch.Tensor:
        """:math:`b` (a view of ``weight``)."""
        return self.weight[:, -1]

    def matrix(self) -> torch.Tensor:
        """The assembled lower-triangular :math:`L`."""
        return triangular_matrix(self.weight)

    def _call_and_ladj(self, x):
        y, ladj = triangular_forward(x, self.weight)
        return y, _batch_ladj(ladj, x)

    def _inverse_and_ladj(self, y):
        x, ladj = triangular_inverse(y, self.weight)
        return x, _batch_ladj(ladj, x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        names = [prefix + n for n in ("lower", "log_diag", "bias")]
        if all(n in state_dict for n in names) and prefix + "weight" not in state_dict:
            lower, log_diag, bias = (state_dict.pop(n) for n in names)  # the three-tensor layout
            weight = torch.cat([torch.tril(lower, -1) + torch.diag(log_diag), bias[:, None]], dim=-1)
            state_dict[prefix + "weight"] = weight
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_matrix(cls, matrix, bias=None) -> Triangular:
        """The layer with :math:`L` = ``matrix`` (lower-triangular with a positive
        diagonal, else ``ValueError``) and :math:`b` = ``bias`` (default 0)."""
        matrix = _as_square_matrix(matrix)
        if (torch.triu(matrix, 1) != 0).any():
            raise ValueError("matrix must be lower-triangular (nonzero entries above the diagonal)")
        diag = torch.diagonal(matrix)
        if not (diag > 0).all():
            raise ValueError(f"matrix must have a positive diagonal, got {diag.tolist()}")
        layer = cls(matrix.shape[0]).to(matrix.dtype)
        layer.lower.copy_(torch.tril(matrix, -1))
        layer.log_diag.copy_(diag.log())
        _set_bias(layer, bias, matrix.shape[0], matrix.dtype)
        return layer


# --- Householder ------------------------------------------------------------------

def householder_reflect(x: torch.Tensor, vectors: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    r"""Apply :math:`H_K \cdots H_1 x` (or :math:`H_1 \cdots H_K x` if ``reverse``, the inverse).

    :math:`H_k = I - 2 u_k u_k^\top` with :math:`u_k = v_k / \|v_k\|`;
    ``vectors`` has shape ``(..., K, D)`` and broadcasts against ``x`` of shape
    ``(..., D)``.  Each reflection is its own inverse and costs :math:`O(D)`.
    """
    units = F.normalize(vectors, dim=-1)
    order = range(units.shape[-2] - 1, -1, -1) if reverse else range(units.shape[-2])
    for k in order:
        u = units[..., k, :]
        x = x - 2.0 * (x * u).sum(-1, keepdim=True) * u
    return x


def _check_count(count_transforms) -> int:
    if isinstance(count_transforms, bool) or not isinstance(count_transforms, int) or count_transforms < 1:
        raise ValueError(f"count_transforms must be a positive int, got {count_transforms!r}")
    return count_transforms


def _check_householder_dim(input_dim) -> int:
    dim = check_input_dim(input_dim)
    if dim < 2:
        raise ValueError("a Householder flow needs input_dim >= 2 (in 1-D a reflection is the fixed map x -> -x)")
    return dim


class Householder(Bijector):
    r"""Orthogonal linear flow: a product of :math:`K` Householder reflections.

    .. math::

        y = H_K \cdots H_1 x, \qquad H_k = I - 2\frac{v_k v_k^\top}{\|v_k\|^2},
        \qquad \log|\det J| = 0.

    Volume-preserving; both directions cost :math:`O(KD)` per row (the
    inverse applies the reflections in reverse order).  :math:`D` reflections
    reach every orthogonal matrix.  Reference: Tomczak & Welling, "Improving
    Variational Auto-Encoders using Householder Flow", 2016.  The vectors
    :math:`v_k` start as standard normal draws.
    """

    def __init__(self, input_dim: int, count_transforms: int = 1, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = _check_householder_dim(input_dim)
        self.event_shape = (dim,)
        self.vectors = nn.Parameter(torch.randn(_check_count(count_transforms), dim))

    def matrix(self) -> torch.Tensor:
        """The assembled orthogonal matrix."""
        eye = torch.eye(self.event_shape[0], dtype=self.vectors.dtype, device=self.vectors.device)
        return householder_reflect(eye, self.vectors).T

    def _call_and_ladj(self, x):
        return householder_reflect(x, self.vectors), x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        return householder_reflect(y, self.vectors, reverse=True), y.new_zeros(y.shape[:-1])


class ConditionalHouseholder(ConditionalBijector):
    r"""Householder flow whose vectors depend on a context :math:`c`:
    :math:`v_k(c) = v_k + \mathrm{MLP}(c)_k`.

    The same math as :class:`Householder` (log-det 0, :math:`O(KD)` both
    ways); the network's last layer starts at zero, so the layer starts as an
    unconditional Householder flow with standard normal :math:`v_k`.
    """

    def __init__(self, input_dim: int, context_dim: int, count_transforms: int = 1,
                 hidden_dims: Sequence[int] = (64, 64)):
        super().__init__()
        dim = _check_householder_dim(input_dim)
        count = _check_count(count_transforms)
        self.event_shape = (dim,)
        self.context_dim = check_context_dim(context_dim)
        self.vectors = nn.Parameter(torch.randn(count, dim))
        self.net = MLP(self.context_dim, count * dim, hidden_dims)

    def _vectors(self, context):
        return self.vectors + self.net(context).unflatten(-1, self.vectors.shape)

    def _call_and_ladj(self, x, context):
        y = householder_reflect(x, self._vectors(context))
        return y, y.new_zeros(y.shape[:-1])

    def _inverse_and_ladj(self, y, context):
        x = householder_reflect(y, self._vectors(context), reverse=True)
        return x, x.new_zeros(x.shape[:-1])


# --- dense ------------------------------------------------------------------------

class Dense(Bijector):
    r"""General linear flow :math:`y = W x + b` with an unconstrained matrix :math:`W`.

    .. math::

        \log|\det J| = \log|\det W| \quad (\texttt{slogdet}, O(D^3)), \qquad
        x = W^{-1}(y - b) \quad (\texttt{linalg.solve}, O(D^3)).

    The slow reference implementation: it can represent any invertible matrix,
    but nothing keeps :math:`W` invertible during training (a singular
    :math:`W` has measure zero, not probability zero of being approached), and
    both the log-det and the inverse cost :math:`O(D^3)`.  Prefer :class:`LU`,
    which has the same expressive power at :math:`O(D^2)`.  Starts at the identity.
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        dim = check_input_dim(input_dim)
        self.event_shape = (dim,)
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def matrix(self) -> torch.Tensor:
        """The matrix :math:`W`."""
        return self.weight

    def _call_and_ladj(self, x):
        return x @ self.weight.T + self.bias, _batch_ladj(torch.linalg.slogdet(self.weight)[1], x)

    def _inverse_and_ladj(self, y):
        x = torch.linalg.solve(self.weight.T, _rows(y - self.bias), left=False).reshape(y.shape)
        return x, _batch_ladj(torch.linalg.slogdet(self.weight)[1], x)

    @classmethod
    @torch.no_grad()
    def from_matrix(cls, matrix, bias=None) -> Dense:
        """The layer with :math:`W` = ``matrix`` (invertible, else ``ValueError``)
        and :math:`b` = ``bias`` (default 0)."""
        matrix = _as_square_matrix(matrix)
        if torch.linalg.slogdet(matrix)[0] == 0:
            raise ValueError("matrix is singular: a Dense flow needs an invertible matrix")
        layer = cls(matrix.shape[0]).to(matrix.dtype)
        layer.weight.copy_(matrix)
        _set_bias(layer, bias, matrix.shape[0], matrix.dtype)
        return layer


# --- helpers ----------------------------------------------------------------------

def lu(input_dim: int, *, permutation="random") -> LU:
    """An :class:`LU` linear layer :math:`y = P L (U + D) x + b` (starts at :math:`W = P`);
    ``permutation="random"`` draws :math:`P` from torch's generator (``pyro.set_rng_seed``
    reproduces it), ``"identity"`` or explicit indices fix it."""
    return LU(input_dim, permutation=permutation)


def triangular(input_dim: int) -> Triangular:
    """A :class:`Triangular` layer :math:`y = L x + b` (starts at the identity)."""
    return Triangular(input_dim)


def diagonal(input_dim: int) -> Elementwise:
    """The diagonal affine flow :math:`y = e^{s} \\odot x + t`: an
    :class:`~pyroflows.transforms.elementwise.Elementwise` layer with the
    :class:`~pyroflows.transforms.transformers.Affine` transformer."""
    return Elementwise(Affine(), input_dim)


def householder(input_dim: int, count_transforms: int | None = None) -> Householder:
    """A :class:`Householder` flow of ``count_transforms`` reflections (``input_dim >= 2``;
    default ``max(1, input_dim // 2)``, Pyro's)."""
    if count_transforms is None and isinstance(input_dim, int):
        count_transforms = max(1, input_dim // 2)
    return Householder(input_dim, count_transforms)


def conditional_householder(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                            count_transforms: int = 1) -> ConditionalHouseholder:
    """A :class:`ConditionalHouseholder` flow (``input_dim >= 2``); ``hidden_dims`` defaults
    to two layers of ``max(32, 10 * input_dim)``."""
    if hidden_dims is None:
        hidden_dims = (max(32, 10 * input_dim),) * 2 if isinstance(input_dim, int) else (64, 64)
    return ConditionalHouseholder(input_dim, context_dim, count_transforms, hidden_dims)


def dense(input_dim: int) -> Dense:
    """A :class:`Dense` linear layer (the slow :math:`O(D^3)` reference; starts at the identity)."""
    return Dense(input_dim)
