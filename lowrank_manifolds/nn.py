r"""Low-rank neural-network layers whose weights live on the fixed-rank manifold.

Every layer here holds its weight matrix :math:`W = U S V^\top` (``m x n``,
rank ``r``) as one :class:`geoopt.ManifoldParameter` on a
:class:`~lowrank_manifolds.FixedRankManifold`, packed as rows ``[U; S; V]``
(shape ``(m + r + n, r)``). Autograd differentiates the packed factors, and
geoopt's stock Riemannian optimizers (``RiemannianSGD``, ``RiemannianAdam``)
turn that gradient into the Riemannian gradient :math:`P_X(\partial L/\partial W)`
and retract, so training keeps the rank fixed and the bases orthonormal.
No layer ever forms the dense ``m x n`` weight in its forward or backward pass.

Layers
------
:class:`LowRankLinear`
    :math:`y = x W^\top + b` with :math:`W = U S V^\top`, cost :math:`O(b\,(m + n)\,r)`.
:class:`LowRankConv2d`
    A 2-d convolution whose kernel, matricised as ``out x (in * kh * kw)``, has
    rank ``r``: one convolution with ``r`` filters, then a ``1 x 1`` convolution.
:class:`LowRankAdapterLinear`
    Fine-tuning (GeoLoRA style): a frozen dense ``nn.Linear`` plus a trainable
    rank-``r`` correction on the manifold, :math:`y = x (W_0 + USV^\top)^\top + b_0`.

Model surgery
-------------
:func:`convert_to_low_rank` replaces the ``nn.Linear`` / ``nn.Conv2d`` layers of a
model by truncated SVDs; :func:`add_adapters` wraps ``nn.Linear`` layers in
adapters; :func:`export_dense` turns every layer of this module back into plain
PyTorch layers (dense, or two thin layers), so that a trained model deploys
without this library.

Throughout, ``S`` is folded into the factor with fewer rows before it is applied
(:func:`_split`): the weight-side cost is :math:`O(\min(m, n)\,r^2)` per call,
independent of the batch, and the batch-dependent cost is exactly that of two thin
products, :math:`b\,(m + n)\,r`.

Capacity (rank adaptivity)
--------------------------
Every layer takes ``max_rank=R`` (and a truncation tolerance ``tol``): its weight then
lives on the rank-adaptive ``FixedRankManifold(m, n, rank, max_rank=R, tol=tol)``, with
the static packed shape ``(m + R + n, R)``; the active columns come first, the inactive
columns of ``U``, ``V`` and rows/columns of ``S`` are exactly zero and contribute nothing
to the products above, so the forward pass needs no masking (it costs that of rank
``R``). Stock geoopt optimizers change the active rank at every retraction; the
optimizers of :mod:`lowrank_manifolds.optim` use the same convention. ``active_rank``
reads the current rank; exports (``to_factored``) trim to it.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Optional, Tuple, Union

import geoopt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._linalg import mT, qr_positive
from .manifold import FixedRankManifold
from .truncation import truncation_rank

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankAdapterLinear",
    "convert_to_low_rank",
    "add_adapters",
    "export_dense",
]

Patterns = Union[None, str, Iterable[str]]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_rank(rank, m: int, n: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must satisfy 1 <= rank <= min({m}, {n}) = {min(m, n)} for {what} "
            f"(a {m} x {n} weight matrix), got {rank}"
        )
    return rank


def _split(u: Tensor, s: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Factors ``(A, B)`` with :math:`A B^\top = U S V^\top`, ``S`` folded into the
    factor with fewer rows: ``(U S, V)`` if ``m <= n``, else ``(U, V S^T)``.

    Cost :math:`O(\min(m, n) r^2)`; the result is differentiable in ``U, S, V``.
    """
    if u.shape[-2] <= v.shape[-2]:
        return u @ s, v
    return u, v @ mT(s)


def _select_rank(singular_values: Tensor, tol: float) -> int:
    r"""The smallest rank :math:`k \ge 1` whose relative Frobenius truncation error
    :math:`(\sum_{j > k} s_j^2)^{1/2} \le \mathrm{tol}\, \|s\|` (Eckart-Young), by
    :func:`~lowrank_manifolds.integrators.truncation_rank`; ``0 <= tol < 1``."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number with 0 <= tol < 1, got {tol!r}")
    if singular_values.device.type == "meta":
        raise ValueError("a rank cannot be chosen by tolerance on the meta device (no values)")
    return int(truncation_rank(singular_values.detach().to(torch.float64), tol))


def _truncated_factors(w: Tensor, rank: Optional[int], tol: Optional[float], what: str):
    """SVD of the dense ``m x n`` matrix ``w``, truncated by ``rank`` and/or ``tol``.

    Returns ``(U_r, S_r, V_r)`` with ``S_r`` diagonal. With both arguments the rank
    chosen by ``tol`` is capped at ``rank``.
    """
    m, n = w.shape
    if rank is None and tol is None:
        raise ValueError("give a rank, a tolerance tol, or both (tol then chooses a rank <= rank)")
    if rank is not None:
        _check_rank(rank, m, n, what)
    w = w.detach()
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError(f"the weight of {what} contains non-finite values")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = rank
    if tol is not None:
        r = _select_rank(s, tol)
        if rank is not None:
            r = min(r, rank)
    if w.device.type != "meta" and not bool(s[r - 1] > 0):
        raise ValueError(
            f"the weight of {what} has rank < {r}: it has no rank-{r} approximation "
            "(choose a smaller rank)"
        )
    return u[:, :r], torch.diag_embed(s[:r]), mT(vh[:r, :])


def _capacity_args(rank, tol, max_rank, rank_tol, m: int, n: int):
    """``(rank cap, max_rank, manifold tol)`` for ``from_dense`` with an optional capacity."""
    if max_rank is None:
        if rank_tol is not None:
            raise ValueError("rank_tol is the rank-adaptive truncation tolerance: it needs max_rank")
        return rank, None, 0.0
    _check_positive_int(max_rank, "max_rank")
    max_rank = min(max_rank, m, n)
    if rank is not None:
        _check_rank(rank, m, n, "the layer")
        if rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    else:
        rank = max_rank  # tol chooses a rank <= the capacity
    mtol = rank_tol if rank_tol is not None else (tol if tol is not None else 0.0)
    return rank, max_rank, mtol


def _check_nonneg_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"rank_tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def _haar_stiefel(rows: int, cols: int, **factory) -> Tensor:
    """A Haar-distributed ``rows x cols`` matrix with orthonormal columns (QR of a
    Gaussian with a positive diagonal of R), cost ``O(rows cols^2)``."""
    q, _ = qr_positive(torch.randn(rows, cols, **factory))
    return q


def _check_capacity(max_rank, rank: int, m: int, n: int, what: str) -> Optional[int]:
    if max_rank is None:
        return None
    if isinstance(max_rank, bool) or not isinstance(max_rank, int):
        raise TypeError(f"max_rank must be an int or None, got {type(max_rank).__name__}")
    if not rank <= max_rank <= min(m, n):
        raise ValueError(
            f"max_rank must satisfy rank = {rank} <= max_rank <= min({m}, {n}) = {min(m, n)} "
            f"for {what}, got {max_rank}"
        )
    return max_rank


def _make_manifold(m: int, n: int, rank: int, max_rank, tol, retraction="metric") -> FixedRankManifold:
    """The weight's manifold: fixed rank, or rank-adaptive with capacity ``max_rank`` and
    truncation tolerance ``tol`` (relative); ``retraction`` as :class:`FixedRankManifold`'s."""
    if max_rank is None:
        if tol not in (None, 0, 0.0):
            raise ValueError("tol is the rank-adaptive truncation tolerance: it needs max_rank")
        return FixedRankManifold(m, n, rank, retraction=retraction)
    return FixedRankManifold(m, n, rank, max_rank=max_rank, tol=0.0 if tol is None else tol,
                             retraction=retraction)


def _manifold_repr(mf: FixedRankManifold) -> str:
    if not mf.adaptive:
        return f"rank={mf.rank}"
    return f"rank={mf.rank}, max_rank={mf.capacity}, tol={mf._truncation.tol}"


def _active_rank_int(mf: FixedRankManifold, x: Tensor) -> int:
    if not mf.adaptive:
        return mf.rank
    if x.device.type == "meta":
        raise ValueError("the active rank of a weight on the meta device is unknown (no values)")
    return int(mf.active_rank(x.detach()))  # host sync


def _trim(mf: FixedRankManifold, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` of ``x`` restricted to its active rank (the active columns come first)."""
    u, s, v = mf.unpack(x)
    if not mf.adaptive:
        return u, s, v
    r = _active_rank_int(mf, x)
    return u[..., :r], s[..., :r, :r], v[..., :r]


class _ManifoldModule(nn.Module):
    """Keeps ``ManifoldParameter`` s through ``Module._apply``.

    ``nn.Module._apply`` replaces a parameter by a plain ``nn.Parameter`` when the
    new tensor cannot share the old one's storage type (``to_empty`` from the
    ``meta`` device, for example), which would drop its manifold; this re-wraps it.
    """

    def _apply(self, fn, recurse=True):
        saved = {
            name: p.manifold
            for name, p in self._parameters.items()
            if isinstance(p, geoopt.ManifoldParameter)
        }
        out = super()._apply(fn, recurse)
        for name, manifold in saved.items():
            p = self._parameters[name]
            if p is not None and not isinstance(p, geoopt.ManifoldParameter):
                new = geoopt.ManifoldParameter(
                    geoopt.ManifoldTensor(p.data, manifold=manifold),
                    manifold=manifold,
                    requires_grad=p.requires_grad,
                )
                new.grad = p.grad
                self._parameters[name] = new
        return out

    def _keep_manifold(self, name: str, manifold: FixedRankManifold) -> None:
        """Remember ``manifold`` as that of the parameter ``name`` (outside the module tree:
        a manifold is an ``nn.Module`` without tensors)."""
        self.__dict__["_point_name"] = name
        self.__dict__["_own_manifold"] = manifold

    @property
    def manifold(self) -> FixedRankManifold:
        """The :class:`~lowrank_manifolds.FixedRankManifold` of the layer's point
        (``weight``, or ``delta`` of :class:`LowRankAdapterLinear`).

        Read from the parameter; when it has been replaced by a plain tensor that does not
        carry it (``torch.func.functional_call``), the layer's own, kept since construction,
        so that the forward works with any packed tensor of the right shape. A registered
        ``nn.Parameter`` without the manifold (FSDP's sharding, an assignment), which every
        optimizer would step off the manifold, and a tensor of the wrong shape raise a
        ``TypeError`` that names the cause (an ``AttributeError`` here would be masked by
        ``nn.Module.__getattr__``)."""
        name = self.__dict__["_point_name"]
        point = getattr(self, name)
        found = getattr(point, "manifold", None)
        if isinstance(found, FixedRankManifold):
            return found
        own = self.__dict__["_own_manifold"]
        if isinstance(point, nn.Parameter):
            # A registered parameter without the manifold: an optimizer would take a Euclidean
            # step on it and leave the manifold silently (FSDP2's sharded DTensor is one).
            raise TypeError(
                f"the {name} of this {type(self).__name__} is an nn.Parameter of type "
                f"{type(point).__name__} without a FixedRankManifold: a wrapper (FSDP's fully_shard or "
                "FullyShardedDataParallel) or an assignment replaced the geoopt.ManifoldParameter, and "
                "every optimizer would now step off the manifold. Sharding low-rank weights is not "
                "supported: replicate them with DistributedDataParallel (they are small), or assign "
                "a geoopt.ManifoldParameter carrying the layer's manifold"
            )
        if isinstance(point, Tensor) and tuple(point.shape) == tuple(own.packed_shape):
            return own
        raise TypeError(
            f"the {name} of this {type(self).__name__} is a {type(point).__name__} of shape "
            f"{tuple(getattr(point, 'shape', ()))} without a FixedRankManifold (a wrapper such as "
            "torch.func.functional_call or FSDP replaced the ManifoldParameter); the layer needs "
            f"the packed [U; S; V] point of shape {tuple(own.packed_shape)}"
        )


class _LowRankWeight(_ManifoldModule):
    """Shared machinery of the layers holding ``self.weight`` on a fixed-rank manifold."""

    weight: geoopt.ManifoldParameter

    def _init_weight(self, m: int, n: int, rank: int, *, max_rank, tol, retraction, bias: bool,
                     dtype, device, what: str) -> None:
        """Validate the rank and capacity, create :attr:`weight` (an ``m x n`` matrix on its
        manifold) and ``bias`` (``m``), then draw them (``reset_parameters``)."""
        _check_rank(rank, m, n, what)
        _check_capacity(max_rank, rank, m, n, what)
        manifold = _make_manifold(m, n, rank, max_rank, tol, retraction)
        self._keep_manifold("weight", manifold)
        point = torch.empty(manifold.packed_shape, dtype=dtype, device=device)
        self.weight = geoopt.ManifoldParameter(
            geoopt.ManifoldTensor(point, manifold=manifold), manifold=manifold
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(m, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """The nominal rank: the fixed rank, or, with a capacity, the rank the layer was
        built with (see :attr:`active_rank` for the current one)."""
        return self.manifold.rank

    @property
    def capacity(self) -> int:
        """The capacity ``R`` (``max_rank``; ``rank`` for a fixed-rank layer): the
        packed weight has shape ``(m + R + n, R)``."""
        return self.manifold.capacity

    @property
    def active_rank(self) -> int:
        """The current rank of the weight (its number of active columns).

        A Python int, hence one host synchronisation on an accelerator; use
        ``layer.manifold.active_rank(layer.weight)`` for a device tensor without one."""
        return _active_rank_int(self.manifold, self.weight)

    def _active_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(U, S, V)`` trimmed to the active rank (one host sync with a capacity)."""
        return _trim(self.manifold, self.weight)

    def weight_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Views ``(U, S, V)`` of the packed weight (differentiable), with
        :math:`W = U S V^\top`."""
        return self.manifold.unpack(self.weight)

    def dense_weight(self) -> Tensor:
        r"""The dense matrix :math:`W = U S V^\top` (``m x n``; cost :math:`O(mnr)`).

        For inspection and export only; the forward pass never forms it.
        """
        return self.manifold.to_dense(self.weight)

    def _reset_factors(self, fan_in: int) -> None:
        r"""Cheap factored initialisation matching ``nn.Linear``/``nn.Conv2d``'s scale.

        PyTorch draws :math:`W_{ij} \sim \mathcal{U}(-1/\sqrt{n}, 1/\sqrt{n})`
        (``kaiming_uniform_(a=sqrt(5))``), so :math:`\mathbb{E}\|W\|_F^2 = m/3` and
        :math:`\mathbb{E}\|Wx\|^2 = \tfrac{m}{3n}\|x\|^2` for any fixed ``x``. Here
        ``U`` and ``V`` are Haar-distributed and :math:`S = \sigma I` with
        :math:`\sigma = \sqrt{m / (3 r)}`: then :math:`\|W\|_F^2 = m/3` exactly and,
        since :math:`\mathbb{E}\,VV^\top = (r/n) I`,
        :math:`\mathbb{E}\|Wx\|^2 = \sigma^2 (r/n)\|x\|^2 = \tfrac{m}{3n}\|x\|^2`:
        the same output variance as the dense layer. Cost :math:`O((m + n) r^2)`
        (two thin QRs), instead of :math:`O(mnr)` for a truncated SVD of a dense draw.
        """
        m, n, r = self.manifold.m, self.manifold.n, self.rank
        factory = dict(dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            u = _haar_stiefel(m, r, **factory)
            v = _haar_stiefel(n, r, **factory)
            s = math.sqrt(m / (3.0 * r)) * torch.eye(r, **factory)
            self.weight.copy_(self.manifold._pad(u, s, v))  # active rank r, zero padding
            if getattr(self, "bias", None) is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def _adopt(self, u: Tensor, s: Tensor, v: Tensor, source: nn.Module) -> "_LowRankWeight":
        """Take the factors of a truncated SVD and the bias and mode of the dense ``source``."""
        self._set_factors(u, s, v)
        if source.bias is not None:
            with torch.no_grad():
                self.bias.copy_(source.bias)
        self.train(source.training)
        return self

    def _set_factors(self, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Set the weight from rank-``k`` factors (``k <= capacity``), zero padded."""
        with torch.no_grad():
            self.weight.copy_(self.manifold._pad(u, s, v))

    def _weight_repr(self) -> str:
        return _manifold_repr(self.manifold)


# ---------------------------------------------------------------------------
# LowRankLinear
# ---------------------------------------------------------------------------
class LowRankLinear(_LowRankWeight):
    r"""A linear layer with a fixed-rank weight on the manifold of rank-``r`` matrices.

    .. math:: y = x W^\top + b, \qquad W = U S V^\top \in \mathbb{R}^{m \times n},

    with ``m = out_features``, ``n = in_features``, ``U`` (m x r) and ``V`` (n x r)
    orthonormal, ``S`` (r x r) invertible. The weight is ``self.weight``, a
    :class:`geoopt.ManifoldParameter` on ``FixedRankManifold(m, n, rank)`` whose
    rows are ``[U; S; V]``; train it with ``geoopt.optim.RiemannianAdam`` or
    ``RiemannianSGD`` (a Euclidean optimizer would move it off the manifold).

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m``.
    rank : int
        ``1 <= rank <= min(in_features, out_features)``; with ``max_rank``, the
        initial (active) rank.
    bias : bool
        Whether to learn an additive bias (a plain Euclidean ``nn.Parameter``).
    max_rank : int, optional
        A capacity ``R`` (``rank <= R <= min(m, n)``) that makes the layer
        rank-adaptive: the weight lives on
        ``FixedRankManifold(m, n, rank, max_rank=R, tol=tol)``, packed with the static
        shape ``(m + R + n, R)``, active columns first and inactive parts exactly zero.
        Stock geoopt optimizers then change the rank at every retraction (truncation by
        ``tol``); :class:`~lowrank_manifolds.optim.DLRT`,
        :class:`~lowrank_manifolds.optim.GeometricSGD` and
        :class:`~lowrank_manifolds.optim.GeometricAdam` use the same capacity with
        their own ``rank_tol``. :attr:`active_rank` is the current rank.
    tol : float
        Relative truncation tolerance of the rank-adaptive manifold (only with
        ``max_rank``): keep the smallest rank whose discarded singular values have
        norm ``<= tol * ||s||``. ``0`` (default) drops only exact zeros.
    retraction : {"metric", "orthographic"}
        The manifold's retraction, which stock geoopt optimizers use (see
        :meth:`~lowrank_manifolds.FixedRankManifold.retr`). ``"metric"`` (default):
        QRs of ``m x 2r`` and ``n x 2r``, robust to any step. ``"orthographic"``: QRs
        of ``m x r`` and ``n x r``, 13-17 % faster per RiemannianAdam step on the
        benchmark MLP (``docs/benchmarks.md``), but it needs ``S + M`` invertible
        and keeps the rank fixed (no ``max_rank``).
    dtype, device
        Factory arguments of the parameters.

    Notes
    -----
    Forward: :math:`y = (x B) A^\top + b` with :math:`AB^\top = USV^\top`, ``S``
    folded into the thinner side (see :func:`_split`); cost
    :math:`O(b\,(m + n)\,r + \min(m, n)\,r^2)` for ``b`` rows of ``x``, memory
    :math:`O(b\,(m + n + r) + (m + n) r)`; the backward pass costs the same. The
    dense ``m x n`` weight is never formed. Any leading batch axes of ``x`` are
    kept; ``x`` may also be a single vector.

    Initialisation (:meth:`reset_parameters`): Haar ``U``, ``V`` and
    :math:`S = \sqrt{m/(3r)}\, I`, which reproduces the expected output variance and
    the expected Frobenius norm of ``nn.Linear``'s default initialisation; the
    bias as ``nn.Linear``'s.

    Examples
    --------
    >>> layer = LowRankLinear(512, 256, rank=16)
    >>> opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-3)
    >>> small = LowRankLinear.from_dense(nn.Linear(512, 256), tol=0.5)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        max_rank: Optional[int] = None,
        tol: float = 0.0,
        retraction: str = "metric",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        self._init_weight(out_features, in_features, rank, max_rank=max_rank, tol=tol,
                          retraction=retraction, bias=bias, dtype=dtype, device=device,
                          what="LowRankLinear")

    def reset_parameters(self) -> None:
        """Draw a fresh weight and bias (see the class notes); cost ``O((m + n) r^2)``."""
        self._reset_factors(self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        a, b = _split(*self.weight_factors())
        y = (x @ b) @ mT(a)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._weight_repr()}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: Optional[int] = None,
        *,
        tol: Optional[float] = None,
        max_rank: Optional[int] = None,
        rank_tol: Optional[float] = None,
    ) -> "LowRankLinear":
        r"""A :class:`LowRankLinear` from the truncated SVD of a dense ``nn.Linear``.

        Parameters
        ----------
        linear : nn.Linear
            The layer to compress (not modified). Dtype and device are kept.
        rank : int, optional
            A fixed rank. With ``tol`` as well, an upper bound on the chosen rank.
        tol : float, optional
            Relative Frobenius tolerance, ``0 <= tol < 1``: the smallest rank with
            :math:`\|W - W_r\|_F \le \mathrm{tol}\,\|W\|_F` (:func:`~lowrank_manifolds.integrators.truncation_rank`).
        max_rank : int, optional
            Build a rank-adaptive layer of capacity ``max_rank`` (clipped to
            ``min(m, n)``); the initial rank is capped at it.
        rank_tol : float, optional
            The truncation tolerance of the rank-adaptive manifold (only with
            ``max_rank``); default ``tol`` (the same rule as the initial choice), or 0.

        Notes
        -----
        By Eckart-Young the result is the best rank-``r`` approximation of ``W``;
        with ``rank = min(m, n)`` it reproduces the layer to rounding. Cost
        :math:`O(mn \min(m, n))` (one SVD); the bias is copied.
        Raises ``ValueError`` if ``W`` has rank below the requested rank.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        m, n = linear.out_features, linear.in_features
        rank, max_rank, mtol = _capacity_args(rank, tol, max_rank, rank_tol, m, n)
        u, s, v = _truncated_factors(linear.weight, rank, tol, "the nn.Linear")
        w = linear.weight
        layer = torch.nn.utils.skip_init(
            cls,
            linear.in_features,
            linear.out_features,
            u.shape[-1],
            bias=linear.bias is not None,
            max_rank=max_rank,
            tol=mtol,
            dtype=w.dtype,
            device=w.device,
        )
        return layer._adopt(u, s, v, linear)

    def to_dense_linear(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`USV^\top` (cost :math:`O(mnr)`),
        detached from this layer."""
        w = self.weight
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, dtype=w.dtype, device=w.device
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.train(self.training)
        return lin

    def to_factored(self) -> nn.Sequential:
        r"""Two thin plain layers computing the same map:
        ``nn.Sequential(nn.Linear(n, r, bias=False), nn.Linear(r, m, bias=bias))``
        with weights :math:`B^\top` and :math:`A`, :math:`AB^\top = USV^\top` (``S``
        folded into the thinner side, as in :meth:`forward`). ``r (m + n)`` weights, ``r``
        the :attr:`active_rank` (a layer with a capacity is trimmed)."""
        w = self.weight
        factors = self._active_factors()  # trimmed to the active rank (one host sync)
        r = factors[0].shape[-1]
        first = nn.Linear(self.in_features, r, bias=False, dtype=w.dtype, device=w.device)
        second = nn.Linear(r, self.out_features, bias=self.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            a, b = _split(*factors)
            first.weight.copy_(mT(b))
            second.weight.copy_(a)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        seq = nn.Sequential(first, second)
        seq.train(self.training)
        return seq


# ---------------------------------------------------------------------------
# LowRankConv2d
# ---------------------------------------------------------------------------
def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(value)


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class LowRankConv2d(_LowRankWeight):
    r"""A 2-d convolution whose matricised kernel has fixed rank ``r``.

    The kernel :math:`K \in \mathbb{R}^{c_o \times c_i \times k_h \times k_w}` is
    matricised as :math:`W = K.\mathrm{reshape}(c_o, c_i k_h k_w) = U S V^\top`
    (``m = out_channels``, ``n = in_channels * kh * kw``), held as
    ``self.weight``, a :class:`geoopt.ManifoldParameter` on
    ``FixedRankManifold(m, n, rank)``. Same arguments and output shapes as
    ``nn.Conv2d`` (``groups=1`` only).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    rank : int
        ``1 <= rank <= min(out_channels, in_channels * kh * kw)``.
    stride, padding, dilation
        As for ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``).
    groups : int
        Only ``1`` is supported (a grouped kernel is block diagonal, not low rank
        as one matrix); other values raise ``ValueError``.
    bias : bool
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
    max_rank, tol, retraction
        Capacity and truncation tolerance of a rank-adaptive layer, and the
        manifold's retraction, as in :class:`LowRankLinear`.
    dtype, device

    Notes
    -----
    Forward: two convolutions, never the dense kernel. With :math:`AB^\top = USV^\top`
    (``S`` folded into whichever of ``U`` (m x r) and ``V`` (n x r) has fewer rows,
    cost :math:`O(\min(m, n) r^2)` per call, independent of the batch):

    1. a ``kh x kw`` convolution with the ``r`` filters
       :math:`B^\top.\mathrm{reshape}(r, c_i, k_h, k_w)` and the layer's stride,
       padding and dilation: cost :math:`O(N H' W' \, c_i k_h k_w \, r)`;
    2. a ``1 x 1`` convolution with :math:`A` (``c_o x r``) plus the bias:
       cost :math:`O(N H' W' \, r\, c_o)`.

    Total :math:`O(N H' W' (c_i k_h k_w + c_o) r)` against
    :math:`O(N H' W' c_i k_h k_w c_o)` for the dense convolution (``H' x W'`` the
    output size). Applying ``S`` as a third ``r x r`` step would instead cost
    :math:`O(N H' W' r^2)`, which grows with the batch; folding it is never worse
    once :math:`N H' W' \ge \min(m, n)`. Initialisation as :class:`LowRankLinear`
    with fan-in :math:`c_i k_h k_w` (matching ``nn.Conv2d``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        max_rank: Optional[int] = None,
        tol: float = 0.0,
        retraction: str = "metric",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got {self.kernel_size}")
        self.stride = _pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be positive, got {self.stride}")
        self.dilation = _pair(dilation, "dilation")
        if min(self.dilation) < 1:
            raise ValueError(f"dilation must be positive, got {self.dilation}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be non-negative, got {self.padding}")
        if groups != 1:
            raise ValueError(
                f"LowRankConv2d supports only groups=1, got groups={groups!r} (a grouped "
                "kernel is block diagonal; convert its groups separately or leave it dense)"
            )
        self.groups = 1
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        n = in_channels * kh * kw
        self._init_weight(out_channels, n, rank, max_rank=max_rank, tol=tol,
                          retraction=retraction, bias=bias, dtype=dtype, device=device,
                          what="LowRankConv2d")

    def reset_parameters(self) -> None:
        """Draw a fresh weight and bias (see :class:`LowRankLinear`), fan-in ``in*kh*kw``."""
        kh, kw = self.kernel_size
        self._reset_factors(self.in_channels * kh * kw)

    def _explicit_padding(self) -> Tuple[int, int, int, int]:
        """``F.pad`` amounts (left, right, top, bottom) for a non-zero padding mode."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            out = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def _filters(self, factors=None) -> Tuple[Tensor, Tensor]:
        """The ``(R, c_i, kh, kw)`` filters and the ``(c_o, R, 1, 1)`` mixing kernel
        (``R`` the capacity, or the width of the given ``factors``)."""
        a, b = _split(*(self.weight_factors() if factors is None else factors))
        kh, kw = self.kernel_size
        return mT(b).reshape(b.shape[-1], self.in_channels, kh, kw), a[..., None, None]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"LowRankConv2d expects inputs of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        filters, mix = self._filters()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            z = F.conv2d(x, filters, None, self.stride, 0, self.dilation)
        else:
            z = F.conv2d(x, filters, None, self.stride, self.padding, self.dilation)
        return F.conv2d(z, mix, self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"{self._weight_repr()}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"

    def _conv_kwargs(self) -> dict:
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode
        )

    def dense_kernel(self) -> Tensor:
        """The dense ``(c_o, c_i, kh, kw)`` kernel (cost ``O(mnr)``; export/inspection only)."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: Optional[int] = None,
        *,
        tol: Optional[float] = None,
        max_rank: Optional[int] = None,
        rank_tol: Optional[float] = None,
    ) -> "LowRankConv2d":
        r"""A :class:`LowRankConv2d` from the truncated SVD of an ``nn.Conv2d``'s
        matricised kernel (``out x in*kh*kw``); arguments as
        :meth:`LowRankLinear.from_dense`. Stride, padding, dilation, padding mode,
        bias, dtype and device are copied; ``groups != 1`` raises ``ValueError``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be converted, got groups={conv.groups}")
        w = conv.weight
        rank, max_rank, mtol = _capacity_args(rank, tol, max_rank, rank_tol, w.shape[0], w[0].numel())
        u, s, v = _truncated_factors(w.reshape(w.shape[0], -1), rank, tol, "the nn.Conv2d")
        layer = torch.nn.utils.skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            u.shape[-1],
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            max_rank=max_rank,
            tol=mtol,
            dtype=w.dtype,
            device=w.device,
        )
        return layer._adopt(u, s, v, conv)

    def to_dense_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the dense kernel (cost ``O(mnr)``), detached."""
        w = self.weight
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
            dtype=w.dtype, device=w.device, **self._conv_kwargs(),
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def to_factored(self) -> nn.Sequential:
        """``nn.Sequential(nn.Conv2d(in, r, k, ...), nn.Conv2d(r, out, 1, bias=bias))``:
        the two convolutions of :meth:`forward` as plain layers, ``r`` the
        :attr:`active_rank` (a layer with a capacity is trimmed)."""
        w = self.weight
        factors = self._active_factors()  # one host sync with a capacity
        r = factors[0].shape[-1]
        first = nn.Conv2d(
            self.in_channels, r, self.kernel_size, bias=False, dtype=w.dtype, device=w.device,
            **self._conv_kwargs(),
        )
        second = nn.Conv2d(
            r, self.out_channels, 1, bias=self.bias is not None, dtype=w.dtype, device=w.device
        )
        with torch.no_grad():
            filters, mix = self._filters(factors)
            first.weight.copy_(filters)
            second.weight.copy_(mix)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        seq = nn.Sequential(first, second)
        seq.train(self.training)
        return seq


# ---------------------------------------------------------------------------
# Adapter (fine-tuning)
# ---------------------------------------------------------------------------
class LowRankAdapterLinear(_ManifoldModule):
    r"""A frozen dense ``nn.Linear`` plus a trainable rank-``r`` correction on the manifold.

    .. math:: y = x\,(W_0 + U S V^\top)^\top + b_0

    The correction :math:`\Delta = USV^\top` is ``self.delta``, a
    :class:`geoopt.ManifoldParameter` on ``FixedRankManifold(m, n, rank)``; the
    base layer ``self.base`` (with :math:`W_0`, :math:`b_0`) is frozen
    (``requires_grad=False``). This is the fine-tuning setting of GeoLoRA: train
    ``delta`` with ``geoopt.optim.RiemannianAdam``/``RiemannianSGD``.

    Parameters
    ----------
    base : nn.Linear
        The pretrained layer. It is adopted, not copied: it is frozen and, with
        ``exact_init=True``, its weight is overwritten in place (see below).
    rank : int
        ``1 <= rank <= min(in_features, out_features)``; with ``max_rank``, the
        initial rank.
    max_rank, tol
        Capacity and truncation tolerance of a rank-adaptive correction, as in
        :class:`LowRankLinear`.
    init_scale : float
        Scale of the initial correction, relative to the RMS singular value
        :math:`\|W_0\|_F / \sqrt{\min(m, n)}` of the base weight (or absolute if
        :math:`W_0 = 0`): :math:`\Delta_0 = U_0 (\varepsilon I) V_0^\top` with Haar
        ``U_0``, ``V_0`` and :math:`\varepsilon` = ``init_scale`` times that value.
        Default ``1e-3``. It must be positive: a rank-``r`` point cannot be zero.
    exact_init : bool
        If ``True`` (default), :math:`\Delta_0` is subtracted from the base weight
        (:math:`W_0 \leftarrow W_0 - \Delta_0`, in place, under ``no_grad``), so the
        adapted layer computes exactly the base layer's map at initialisation (to
        rounding, :math:`O(\epsilon_{mach} \|\Delta_0\|)`) without any extra buffer.
        If ``False``, the base is left untouched and the initial output differs by
        :math:`x\Delta_0^\top`, small by ``init_scale``.

    Notes
    -----
    Forward cost :math:`O(b\,(mn + (m + n) r))`: the base layer's dense product plus
    the two thin products of :class:`LowRankLinear`; the gradient reaches only the
    factors of ``delta`` (and ``x``). :meth:`merge` returns a plain ``nn.Linear``
    with weight :math:`W_0 + USV^\top`. The state dict holds the (folded) base and
    the packed correction, so saving and loading reproduce the layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        max_rank: Optional[int] = None,
        tol: float = 0.0,
        init_scale: float = 1e-3,
        exact_init: bool = True,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        m, n = base.out_features, base.in_features
        _check_rank(rank, m, n, "LowRankAdapterLinear")
        _check_capacity(max_rank, rank, m, n, "LowRankAdapterLinear")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        base.requires_grad_(False)
        self.base = base
        self.init_scale = float(init_scale)
        manifold = _make_manifold(m, n, rank, max_rank, tol)
        self._keep_manifold("delta", manifold)
        w0 = base.weight
        factory = dict(dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            ref = torch.linalg.matrix_norm(w0.detach()) / math.sqrt(min(m, n))
            ref = torch.where(ref > 0, ref, torch.ones_like(ref))
            u = _haar_stiefel(m, rank, **factory)
            v = _haar_stiefel(n, rank, **factory)
            s = (self.init_scale * ref) * torch.eye(rank, **factory)
            point = manifold._pad(u, s, v)
            if exact_init:
                w0.sub_((u @ s) @ mT(v))
        self.delta = geoopt.ManifoldParameter(geoopt.ManifoldTensor(point, manifold=manifold), manifold=manifold)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        """The nominal rank of the correction (fixed, or the initial one with a capacity)."""
        return self.manifold.rank

    @property
    def capacity(self) -> int:
        """The capacity ``R`` of the correction (``rank`` if it has a fixed rank)."""
        return self.manifold.capacity

    @property
    def active_rank(self) -> int:
        """The current rank of the correction (a Python int: one host sync on an accelerator)."""
        return _active_rank_int(self.manifold, self.delta)

    def delta_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Views ``(U, S, V)`` of the packed correction, :math:`\Delta = USV^\top`."""
        return self.manifold.unpack(self.delta)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowRankAdapterLinear expects inputs of shape (..., in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        a, b = _split(*self.delta_factors())
        return self.base(x) + (x @ b) @ mT(a)

    def merge(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`W_0 + USV^\top` and the base bias
        (cost :math:`O(mnr)`); a new, trainable layer, detached from this one."""
        w0 = self.base.weight
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, dtype=w0.dtype, device=w0.device
        )
        with torch.no_grad():
            lin.weight.copy_(w0 + self.manifold.to_dense(self.delta))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return _manifold_repr(self.manifold)


# ---------------------------------------------------------------------------
# model surgery
# ---------------------------------------------------------------------------
_OURS = (LowRankLinear, LowRankConv2d, LowRankAdapterLinear)


def _as_patterns(patterns: Patterns, name: str) -> Optional[Tuple[str, ...]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    patterns = tuple(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a string or an iterable of strings")
    return patterns


def _selected(qualname: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(qualname, p) for p in include):
        return False
    if exclude is not None and any(fnmatch.fnmatchcase(qualname, p) for p in exclude):
        return False
    return True


def _shared_param_ids(module: nn.Module) -> set:
    counts: dict = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {k for k, c in counts.items() if c > 1}


def _replace(module: nn.Module, fn, descend_into_ours: bool = False) -> nn.Module:
    """Apply ``fn(qualname, child) -> new or None`` to every submodule (pre-order),
    replacing a child when ``fn`` returns a module; replaced subtrees and (unless
    ``descend_into_ours``) this module's own layers are not descended into."""

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            new = fn(qual, child)
            if new is not None:
                setattr(parent, name, new)
            elif descend_into_ours or not isinstance(child, _OURS):
                visit(child, qual)

    root = fn("", module)
    if root is not None:
        return root
    if not isinstance(module, _OURS):
        visit(module, "")
    return module


def _matrix_shape(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels * kh * kw
    return layer.out_features, layer.in_features


def convert_to_low_rank(
    module: nn.Module,
    rank: Optional[int] = None,
    *,
    tol: Optional[float] = None,
    max_rank: Optional[int] = None,
    rank_tol: Optional[float] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> nn.Module:
    r"""Replace ``nn.Linear`` and ``nn.Conv2d`` layers by low-rank layers, in place.

    Every submodule whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` (with
    ``groups=1``) and whose qualified name (as in ``module.named_modules()``; ``""``
    for ``module`` itself) is selected by ``include``/``exclude`` is replaced by
    :meth:`LowRankLinear.from_dense` / :meth:`LowRankConv2d.from_dense`.

    Parameters
    ----------
    module : nn.Module
        Modified **in place** (deep-copy it first to keep the original).
    rank : int, optional
        Fixed rank for every layer; with ``tol``, a cap on the chosen ranks.
    tol : float, optional
        Per-layer relative Frobenius tolerance (see :func:`~lowrank_manifolds.integrators.truncation_rank`).
    max_rank : int, optional
        Make every converted layer rank-adaptive with this capacity (clipped to each
        layer's ``min(m, n)``); the initial rank is capped at it.
    rank_tol : float, optional
        Truncation tolerance of the rank-adaptive layers (only with ``max_rank``);
        default ``tol``, or 0.
    include, exclude : str or iterable of str, optional
        ``fnmatch`` patterns on qualified names (e.g. ``"encoder.*"``,
        ``"*.fc2"``). A layer is converted if it matches some ``include`` pattern
        (or ``include`` is ``None``) and no ``exclude`` pattern.

    Returns
    -------
    nn.Module
        ``module`` itself, or the new layer if ``module`` is itself a convertible
        layer (a module cannot replace itself in place).

    Notes
    -----
    Skipping rule: for an ``m x n`` weight (``n = in*kh*kw`` for a convolution) and
    the rank ``r`` chosen (``rank``, or from ``tol``), the layer is converted only if
    the low-rank layer stores fewer weight numbers,
    :math:`R (m + n + R) < m n` (the packed ``[U; S; V]``; ``R = r``, or the
    capacity with ``max_rank``); this also skips ``rank > min(m, n)``. Also skipped: subclasses of ``nn.Linear``/``nn.Conv2d``
    (their forward may differ, e.g. ``nn.MultiheadAttention.out_proj``, whose weight
    its parent reads directly), grouped convolutions, layers whose weight is shared
    with another module (tied weights), and the inside of this module's own layers.
    Cost: one SVD per converted layer.
    """
    if rank is None and tol is None and max_rank is None:
        raise ValueError("give a rank, a tolerance tol, or both (or a capacity max_rank)")
    if rank is not None:
        _check_positive_int(rank, "rank")
    if max_rank is not None:
        _check_positive_int(max_rank, "max_rank")
        if rank is not None and rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    elif rank_tol is not None:
        raise ValueError("rank_tol is the rank-adaptive truncation tolerance: it needs max_rank")
    if rank_tol is not None:
        _check_nonneg_tol(rank_tol)
    if tol is not None:
        _select_rank(torch.ones(1), tol)  # validates tol
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    shared = _shared_param_ids(module)

    def convert(qual: str, child: nn.Module):
        if type(child) not in (nn.Linear, nn.Conv2d) or not _selected(qual, include, exclude):
            return None
        if id(child.weight) in shared or (type(child) is nn.Conv2d and child.groups != 1):
            return None
        m, n = _matrix_shape(child)
        w = child.weight.detach()
        cap_r = None if max_rank is None else min(max_rank, m, n)
        if tol is None:
            r = rank if rank is not None else cap_r
        else:
            r = _select_rank(torch.linalg.svdvals(w.reshape(m, n)), tol)
            if rank is not None:
                r = min(r, rank)
        if cap_r is not None:
            r = min(r, cap_r)
        stored = r if cap_r is None else cap_r
        if stored * (m + n + stored) >= m * n:
            return None
        cls = LowRankLinear if type(child) is nn.Linear else LowRankConv2d
        if cap_r is None:
            return cls.from_dense(child, rank=r)
        mtol = rank_tol if rank_tol is not None else (tol if tol is not None else 0.0)
        return cls.from_dense(child, rank=r, max_rank=cap_r, rank_tol=mtol)

    return _replace(module, convert)


def add_adapters(
    module: nn.Module,
    rank: int,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    init_scale: float = 1e-3,
    exact_init: bool = True,
    freeze: bool = True,
    max_rank: Optional[int] = None,
    tol: float = 0.0,
) -> nn.Module:
    r"""Wrap ``nn.Linear`` layers in :class:`LowRankAdapterLinear`, in place.

    Parameters
    ----------
    module : nn.Module
        Modified **in place**; returned (or the adapter if ``module`` is itself an
        ``nn.Linear``).
    rank : int
        Rank of every correction; layers with ``rank > min(m, n)`` are skipped.
    include, exclude
        ``fnmatch`` patterns on qualified names, as in :func:`convert_to_low_rank`.
    init_scale, exact_init
        See :class:`LowRankAdapterLinear`. With ``exact_init=True`` (default) the
        adapted model computes the same function as before, to rounding.
    freeze : bool
        If ``True`` (default, LoRA practice), every parameter of the model other than
        the adapters' ``delta`` gets ``requires_grad=False``.
    max_rank, tol
        Rank-adaptive corrections of capacity ``max_rank`` (clipped to each layer's
        ``min(m, n)``) and truncation tolerance ``tol`` (see :class:`LowRankAdapterLinear`).

    Notes
    -----
    Only layers whose type is exactly ``nn.Linear`` and whose weight is not shared
    are wrapped (see :func:`convert_to_low_rank`). Pass only trainable parameters
    to the optimizer: ``RiemannianAdam(p for p in model.parameters() if p.requires_grad)``.
    """
    _check_positive_int(rank, "rank")
    if max_rank is not None:
        _check_positive_int(max_rank, "max_rank")
        if rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    shared = _shared_param_ids(module)

    def wrap(qual: str, child: nn.Module):
        if type(child) is not nn.Linear or not _selected(qual, include, exclude):
            return None
        small = min(child.in_features, child.out_features)
        if id(child.weight) in shared or rank > small:
            return None
        cap = None if max_rank is None else min(max_rank, small)
        return LowRankAdapterLinear(
            child, rank, max_rank=cap, tol=tol, init_scale=init_scale, exact_init=exact_init
        )

    module = _replace(module, wrap)
    if freeze:
        deltas = {id(m.delta) for m in module.modules() if isinstance(m, LowRankAdapterLinear)}
        for p in module.parameters():
            if id(p) not in deltas:
                p.requires_grad_(False)
    return module


def export_dense(module: nn.Module, factored: bool = False) -> nn.Module:
    r"""Replace every layer of this module by plain PyTorch layers, in place.

    :class:`LowRankLinear` becomes ``nn.Linear`` (:meth:`LowRankLinear.to_dense_linear`)
    or, with ``factored=True``, two thin layers (:meth:`LowRankLinear.to_factored`);
    :class:`LowRankConv2d` likewise (``to_dense_conv`` / ``to_factored``);
    :class:`LowRankAdapterLinear` is always merged into one ``nn.Linear``
    (:meth:`LowRankAdapterLinear.merge`: its base is dense anyway).

    The result loads and runs without this library (no ``ManifoldParameter`` left
    from these layers). Returns ``module`` (or the replacement if ``module`` is
    itself such a layer).
    """

    def export(qual: str, child: nn.Module):
        if isinstance(child, LowRankLinear):
            return child.to_factored() if factored else child.to_dense_linear()
        if isinstance(child, LowRankConv2d):
            return child.to_factored() if factored else child.to_dense_conv()
        if isinstance(child, LowRankAdapterLinear):
            return child.merge()
        return None

    return _replace(module, export)
