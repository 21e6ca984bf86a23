"""What the low-rank layers share: argument checks, factor helpers, the manifold-holding module base."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import geoopt
import torch
from torch import Tensor, nn

from .._args import deprecated, nonneg, positive_int
from .._linalg import factor_dtype, mT, qr_positive
from ..manifold import FixedRankManifold
from ..truncation import truncation_rank


@contextlib.contextmanager
def requires_grad_restored_on_error(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag if the block raises: the model
    surgeries build their new layers aside, but an adapter freezes its base when built."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def check_rank(rank, m: int, n: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must satisfy 1 <= rank <= min({m}, {n}) = {min(m, n)} for {what} "
            f"(a {m} x {n} weight matrix), got {rank}"
        )
    return rank


def split_factors(u: Tensor, s: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Factors ``(A, B)`` with :math:`A B^\top = U S V^\top`, ``S`` folded into the
    factor with fewer rows: ``(U S, V)`` if ``m <= n``, else ``(U, V S^T)``.

    Cost :math:`O(\min(m, n) r^2)`; the result is differentiable in ``U, S, V``.
    """
    if u.shape[-2] <= v.shape[-2]:
        return u @ s, v
    return u, v @ mT(s)


def select_rank(singular_values: Tensor, svd_tol: float) -> int:
    r"""The smallest rank :math:`k \ge 1` whose relative Frobenius truncation error
    :math:`(\sum_{j > k} s_j^2)^{1/2} \le \mathrm{svd\_tol}\, \|s\|` (Eckart-Young), by
    :func:`~lowrank_manifolds.integrators.truncation_rank`; ``0 <= svd_tol < 1``."""
    tol = svd_tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"svd_tol must be a number with 0 <= svd_tol < 1, got {tol!r}")
    if singular_values.device.type == "meta":
        raise ValueError("a rank cannot be chosen by tolerance on the meta device (no values)")
    return int(truncation_rank(singular_values.detach().to(torch.float64), tol))


def truncated_factors(w: Tensor, rank: Optional[int], svd_tol: Optional[float], what: str):
    """SVD of the dense ``m x n`` matrix ``w``, truncated by ``rank`` and/or the cut ``svd_tol``.

    Returns ``(U_r, S_r, V_r)`` with ``S_r`` diagonal. With both arguments the rank
    chosen by ``svd_tol`` is capped at ``rank``.
    """
    m, n = w.shape
    if rank is None and svd_tol is None:
        raise ValueError("give a rank, an initial SVD cut svd_tol, or both (svd_tol then chooses a rank <= rank)")
    if rank is not None:
        check_rank(rank, m, n, what)
    w = w.detach()
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError(f"the weight of {what} contains non-finite values")
    u, s, vh = (t.to(w.dtype) for t in torch.linalg.svd(w.to(factor_dtype(w)), full_matrices=False))
    r = rank
    if svd_tol is not None:
        r = select_rank(s, svd_tol)
        if rank is not None:
            r = min(r, rank)
    if w.device.type != "meta" and not bool(s[r - 1] > 0):
        raise ValueError(
            f"the weight of {what} has rank < {r}: it has no rank-{r} approximation "
            "(choose a smaller rank)"
        )
    return u[:, :r], torch.diag_embed(s[:r]), mT(vh[:r, :])


def conversion_args(rank, svd_tol, max_rank, tol, rank_tol, m: int, n: int, where: str):
    """``(rank cap, SVD cut, capacity, truncation tol)`` of a conversion from a dense weight.

    ``svd_tol`` cuts the initial SVD; ``tol`` is the truncation tolerance of the weight's
    rank-adaptive manifold (with ``max_rank``), and also cuts the initial SVD when
    ``svd_tol`` is not given: the weight's own policy truncates the dense weight.
    The old spellings keep working with a ``DeprecationWarning``: ``rank_tol`` (now ``tol``,
    the old ``tol`` then being the cut) and ``tol`` without ``max_rank`` (then the cut).
    A ``max_rank`` above ``min(m, n)`` is clipped with a ``DeprecationWarning`` (a layer
    constructor raises)."""
    if rank_tol is not None:
        deprecated(f"{where}: rank_tol= is deprecated: the truncation tolerance is tol= and the initial SVD cut svd_tol=", stacklevel=5)
        if svd_tol is not None:
            raise TypeError(f"{where}: give svd_tol= and tol=, not the deprecated rank_tol=")
        svd_tol, tol = tol, rank_tol
    elif max_rank is None and tol is not None and svd_tol is None:
        deprecated(f"{where}: tol= without max_rank as the initial SVD cut is deprecated: use svd_tol=", stacklevel=5)
        svd_tol, tol = tol, None
    if max_rank is None:
        if tol is not None:
            raise ValueError("tol is the rank-adaptive truncation tolerance: it needs max_rank")
        if rank is None and svd_tol is None:
            raise ValueError("give a rank, an initial SVD cut svd_tol, or both (svd_tol then chooses a rank <= rank)")
        return rank, svd_tol, None, 0.0
    positive_int(max_rank, "max_rank")
    if max_rank > min(m, n):
        deprecated(f"{where}: max_rank = {max_rank} > min({m}, {n}) is clipped; it will raise as in the layers", stacklevel=5)
        max_rank = min(m, n)
    if rank is not None:
        check_rank(rank, m, n, "the layer")
        if rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    else:
        rank = max_rank  # the cut chooses a rank <= the capacity
    tol = 0.0 if tol is None else nonneg(tol, "tol")
    return rank, (svd_tol if svd_tol is not None else (tol or None)), max_rank, tol


def haar_stiefel(rows: int, cols: int, **factory) -> Tensor:
    """A Haar-distributed ``rows x cols`` matrix with orthonormal columns (QR of a
    Gaussian with a positive diagonal of R), cost ``O(rows cols^2)``."""
    q, _ = qr_positive(torch.randn(rows, cols, **factory))
    return q


def check_capacity(max_rank, rank: int, m: int, n: int, what: str) -> Optional[int]:
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


def make_manifold(m: int, n: int, rank: int, max_rank, tol, retraction="metric",
                  second_moment="rows") -> FixedRankManifold:
    """The weight's manifold: fixed rank, or rank-adaptive with capacity ``max_rank`` and
    truncation tolerance ``tol`` (relative); ``retraction`` and ``second_moment`` as
    :class:`FixedRankManifold`'s."""
    if max_rank is None:
        if tol not in (None, 0, 0.0):
            raise ValueError("tol is the rank-adaptive truncation tolerance: it needs max_rank")
        return FixedRankManifold(m, n, rank, retraction=retraction, second_moment=second_moment)
    return FixedRankManifold(m, n, rank, max_rank=max_rank, tol=0.0 if tol is None else tol,
                             retraction=retraction, second_moment=second_moment)


def manifold_repr(mf: FixedRankManifold) -> str:
    if not mf.adaptive:
        return f"rank={mf.rank}"
    return f"rank={mf.rank}, max_rank={mf.capacity}, tol={mf.truncation.tol}"


def active_rank_int(mf: FixedRankManifold, x: Tensor) -> int:
    if not mf.adaptive:
        return mf.rank
    if x.device.type == "meta":
        raise ValueError("the active rank of a weight on the meta device is unknown (no values)")
    return int(mf.active_rank(x.detach()))  # host sync


def trim(mf: FixedRankManifold, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` of ``x`` restricted to its active rank (the active columns come first)."""
    u, s, v = mf.unpack(x)
    if not mf.adaptive:
        return u, s, v
    r = active_rank_int(mf, x)
    return u[..., :r], s[..., :r, :r], v[..., :r]


def is_lowrank_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of the library's low-rank layers (:class:`LowRankLinear`,
    :class:`LowRankConv2d`, :class:`LowRankAdapterLinear`: the modules whose point, a
    ``geoopt.ManifoldParameter`` on a :class:`~lowrank_manifolds.FixedRankManifold`, is
    :attr:`ManifoldModule.point`)."""
    return isinstance(module, ManifoldModule)


class ManifoldModule(nn.Module):
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
    def point(self) -> Tensor:
        """The layer's packed low-rank point ``[U; S; V]`` (``weight``, or ``delta`` of
        :class:`LowRankAdapterLinear`)."""
        return getattr(self, self.__dict__["_point_name"])

    @property
    def rank(self) -> int:
        """The nominal rank: the fixed rank, or, with a capacity, the rank the point was built
        with (:attr:`active_rank` is the current one)."""
        return self.manifold.rank

    @property
    def capacity(self) -> int:
        """The capacity ``R`` (``max_rank``; ``rank`` at fixed rank): the packed point has
        shape ``(m + R + n, R)``."""
        return self.manifold.capacity

    @property
    def active_rank(self) -> int:
        """The current rank of the point (its number of active columns). A Python int, hence
        one host synchronisation on an accelerator; ``layer.manifold.active_rank(point)``
        gives a device tensor without one."""
        return active_rank_int(self.manifold, self.point)

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
        point = self.point
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
