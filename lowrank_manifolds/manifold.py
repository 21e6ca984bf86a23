r"""The manifold of fixed-rank matrices as a geoopt manifold.

.. math::

    \mathcal{M}_r = \{X \in \mathbb{R}^{m \times n} : \operatorname{rank} X = r\}

with the Euclidean metric of :math:`\mathbb{R}^{m\times n}` (embedded geometry of
Vandereycken 2013, Absil and Oseledets 2015; Manopt's ``fixedrankembeddedfactory``).

Representation
--------------
A point :math:`X = U S V^\top` (``U`` m x r and ``V`` n x r with orthonormal
columns, ``S`` r x r invertible) is one tensor whose rows are ``[U; S; V]``:
shape ``(..., m + r + n, r)``.

A tangent vector :math:`\xi = U M V^\top + U_p V^\top + U V_p^\top` with the gauge
conditions :math:`U^\top U_p = 0`, :math:`V^\top V_p = 0` is packed the same way,
as rows ``[Up; M; Vp]``. Gradients, momenta and Adam states therefore all have
the shape of the point, as geoopt requires. Under the gauge conditions the
metric is the Frobenius inner product of the packed tensors,
:math:`\langle \xi, \eta\rangle = \langle M, M'\rangle + \langle U_p, U_p'\rangle
+ \langle V_p, V_p'\rangle`.

Every operation costs :math:`O((m + n) r^2 + r^3)` and none forms an m x n matrix,
except :meth:`FixedRankManifold.to_dense` and
:meth:`FixedRankManifold.tangent_to_dense`, whose purpose is to do so.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple, Union

import torch
from geoopt import ManifoldTensor
from geoopt.manifolds.base import Manifold
from torch import Tensor

from ._args import check_ambient, positive_int
from ._linalg import all_finite, cat_rows, core_dtype, is_diagonal, mT, pinv_core, qr_positive, safe_reciprocal, svd_core, svdvals_core, tmm
from ._retractions import integrator_retraction, metric_retraction, orthographic_retraction, resolve_retraction
from .truncation import Truncation

__all__ = ["FixedRankManifold"]

Ambient = Union[Tensor, Tuple[Tensor, Tensor]]


class GradientProducts(NamedTuple):
    r"""What a step needs of the Euclidean gradient :math:`G` at :math:`X = USV^\top`, from
    autograd's gradient on the packed factors (:meth:`FixedRankManifold.gradient_products`):
    the factors, :math:`dS = U^\top G V` and the products :math:`GV`, :math:`G^\top U`
    (``m x R``, ``n x R``; never :math:`G` itself)."""

    u: Tensor
    s: Tensor
    v: Tensor
    ds: Tensor
    gv: Tensor
    gtu: Tensor


class FixedRankManifold(Manifold):
    r"""Matrices of size ``m x n`` and rank exactly ``rank``, embedded in
    :math:`\mathbb{R}^{m\times n}`.

    Parameters
    ----------
    m, n : int
        Matrix size.
    rank : int
        The rank ``r``, ``1 <= r <= min(m, n)``; with ``max_rank``, the rank of the
        points made by :meth:`random`, :meth:`origin` and :meth:`from_dense`.
    max_rank : int, optional
        A capacity ``R >= rank`` that makes the manifold rank-adaptive: points keep
        the static shape ``(m + R + n, R)`` while their *active rank* changes inside
        it. The active columns come first; the inactive columns of ``U``, ``V`` and
        rows and columns of ``S`` (and of ``Up``, ``M``, ``Vp``) are exactly zero, so
        every formula holds unchanged (zero columns contribute nothing) except the
        inverse of ``S``, taken on the active block. Each retraction truncates the
        new rank by the tolerance below, within ``[min_rank, R]``
        (:class:`~lowrank_manifolds.integrators.Truncation`). Static shapes keep
        geoopt's ``copy_``, optimizer states and ``state_dict`` working, and need no
        host synchronisation.
    tol, relative, min_rank :
        The truncation rule of a rank-adaptive manifold: keep the smallest rank whose
        discarded singular values have norm ``<= tol * ||s||`` (``relative=True``) or
        ``<= tol``. Only with ``max_rank``.
    retraction : {"metric", "orthographic"}, an integrator or its name
        ``"metric"`` (default): the metric projection, i.e. the best low-rank
        approximation of :math:`X + \xi` (second order).
        ``"orthographic"``: Absil and Oseledets' orthographic retraction
        (second order, cheaper: QRs of m x r and n x r matrices; fixed rank only).
        An integrator of :mod:`lowrank_manifolds.integrators` (anything with its
        ``step(U, S, V, field, h)`` protocol), or its name in
        :data:`~lowrank_manifolds.integrators.INTEGRATORS` (e.g. ``"abc-psi"``): one step of
        size 1 along the constant tangent field, then the manifold's truncation.
    check_finite : bool, optional
        Whether :meth:`egrad2rgrad` checks that the Euclidean gradient is finite and raises
        ``ValueError`` if not (before an optimizer folds it into its state). ``None``
        (default): on the CPU, where the check is free, and not on other devices, where it
        costs a host synchronisation per parameter and step; ``True`` / ``False`` force it
        on or off everywhere. Tensors on the ``meta`` device are never checked.
    second_moment : {"rows", "scalar"}
        :meth:`component_inner`, the (untransported) second moment of geoopt's ``RiemannianAdam``.
        ``"rows"`` (default): the mean squares of each row of ``Up`` and ``Vp`` and of ``M``,
        invariant under the gauge, steps of about ``lr`` per entry: Adam's learning rates work
        (docs/training.md, ``RiemannianAdam``). ``"scalar"``: the metric, one number per matrix,
        steps of Frobenius norm about ``lr`` (rates 100-1000x Adam's; better on ill-conditioned
        matrix completion).

    Attributes
    ----------
    truncation : Truncation
        The manifold's truncation policy (``tol``, ``relative``, ``min_rank`` within the
        capacity; plain rank-``r`` truncation at fixed rank), applied by every retraction.
    capacity : int
        ``max_rank``, or ``rank`` at fixed rank.

    Notes
    -----
    Points and tangent vectors are packed tensors (see the module docstring);
    :meth:`pack` and :meth:`unpack` convert (:meth:`pad` from fewer columns). Leading batch
    axes broadcast.
    The Euclidean gradient that geoopt's optimizers hand to
    :meth:`egrad2rgrad` is autograd's gradient with respect to the packed
    factors ``[U; S; V]``.
    """

    ndim = 2
    reversible = False
    name = "FixedRank"

    def __init__(
        self,
        m: int,
        n: int,
        rank: int,
        *,
        max_rank: Optional[int] = None,
        tol: float = 0.0,
        relative: bool = True,
        min_rank: int = 1,
        retraction: Any = "metric",
        check_finite: Optional[bool] = None,
        second_moment: str = "rows",
    ):
        super().__init__()
        if second_moment not in ("scalar", "rows"):
            raise ValueError(f"second_moment must be 'scalar' or 'rows', got {second_moment!r}")
        self.second_moment = second_moment
        if check_finite is not None and not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be None, True or False, got {check_finite!r}")
        self.check_finite = check_finite
        self.m = positive_int(m, "m")
        self.n = positive_int(n, "n")
        self.rank = positive_int(rank, "rank")
        if rank > min(m, n):
            raise ValueError(f"rank must be <= min(m, n) = {min(m, n)}, got {rank}")
        self.adaptive = max_rank is not None
        if self.adaptive:
            positive_int(max_rank, "max_rank")
            if not rank <= max_rank <= min(m, n):
                raise ValueError(f"max_rank must be in [rank, min(m, n)] = [{rank}, {min(m, n)}], got {max_rank}")
            if isinstance(min_rank, bool) or not isinstance(min_rank, int) or not 1 <= min_rank <= rank:
                raise ValueError(f"min_rank must be an int in [1, rank] = [1, {rank}], got {min_rank!r}")
            self.truncation = Truncation(tol, relative=relative, min_rank=min_rank, max_rank=max_rank, pad=True)
        else:
            if tol != 0.0 or min_rank != 1:
                raise ValueError("tol and min_rank set a rank-adaptive truncation: they need max_rank")
            self.truncation = Truncation(0.0, min_rank=rank, max_rank=rank, pad=True)
        self.capacity = max_rank if self.adaptive else rank
        self.retraction = resolve_retraction(retraction, self.adaptive)

    @property
    def packed_shape(self) -> Tuple[int, int]:
        """Trailing shape ``(m + R + n, R)`` of points and tangent vectors, ``R`` the capacity."""
        return (self.m + self.capacity + self.n, self.capacity)

    def extra_repr(self) -> str:
        out = f"m={self.m}, n={self.n}, rank={self.rank}"
        if self.adaptive:
            t = self.truncation
            out += f", max_rank={self.capacity}, tol={t.tol}, relative={t.relative}, min_rank={t.min_rank}"
        out += f", retraction={self.retraction!r}"
        return out + (f", second_moment={self.second_moment!r}" if self.second_moment != "rows" else "")

    def active_rank(self, x: Tensor) -> Tensor:
        """The active rank of each point (number of non-zero columns of ``U``), as an
        int64 tensor of the batch shape; ``rank`` everywhere for a fixed-rank manifold."""
        return self.active_mask(self.unpack(x)[0]).sum(-1).to(torch.int64)

    def active_mask(self, u: Tensor) -> Tensor:
        """The active columns of a basis ``U (..., m, R)`` of a point, as a 0/1 tensor
        ``(..., R)`` of its dtype (no host sync): active columns have norm 1, inactive
        ones are exactly zero, and 0.5 separates them."""
        return ((u * u).sum(-2) > 0.5).to(u.dtype)

    def _mask_tangent(self, u: Tensor, up: Tensor, mm: Tensor, vp: Tensor) -> Tensor:
        """Pack a tangent vector, zeroing its inactive parts (no-op at fixed rank)."""
        if self.adaptive:
            mask = self.active_mask(u)
            up, vp = up * mask.unsqueeze(-2), vp * mask.unsqueeze(-2)
            mm = mm * mask.unsqueeze(-1) * mask.unsqueeze(-2)
        return cat_rows(up, mm, vp)

    def invertible_core(self, u: Tensor, s: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``S`` with ones on the inactive diagonal (``U``, or its :meth:`active_mask` if
        given, tells which columns are active), so that a solve or pseudo-inverse acts on the
        active block as on the padded ``S``; ``S`` itself at fixed rank."""
        if not self.adaptive:
            return s
        return s + torch.diag_embed(1 - (self.active_mask(u) if mask is None else mask))

    # ------------------------------------------------------------------ checks
    def _check_packed(self, t: Tensor, name: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() < 2 or tuple(t.shape[-2:]) != self.packed_shape:
            raise ValueError(
                f"{name} must have trailing shape (m + R + n, R) = {self.packed_shape} "
                f"for {self}, got shape {tuple(t.shape)}"
            )

    @staticmethod
    def _check_compatible(ref: Tensor, **others: Tensor) -> None:
        for name, t in others.items():
            if t.dtype != ref.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the point has {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but the point is on {ref.device}")
            try:
                torch.broadcast_shapes(ref.shape[:-2], t.shape[:-2])
            except RuntimeError:
                raise ValueError(f"{name} has batch shape {tuple(t.shape[:-2])}, which does not broadcast with "
                                 f"the point's {tuple(ref.shape[:-2])}") from None

    def _check_ambient(self, x: Tensor, z: Ambient, name: str) -> None:
        """Check a dense ``(..., m, n)`` matrix or a factor pair ``(A, B)`` against the point."""
        check_ambient(z, self.m, self.n, x, name)

    @staticmethod
    def _check_finite(t: Tensor, name: str) -> None:
        # A host sync: used only at the entry points that build points from user data.
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")

    def _check_shape(self, shape: Tuple[int, ...], name: str) -> Tuple[bool, Optional[str]]:
        if len(shape) < 2 or tuple(shape[-2:]) != self.packed_shape:
            return False, (
                f"'{name}' on {self} needs trailing shape (m + R + n, R) = "
                f"{self.packed_shape}, got {tuple(shape)}"
            )
        return True, None

    def _check_point_on_manifold(self, x: Tensor, *, atol=1e-5, rtol=1e-5):
        u, s, v = self.unpack(x)
        if not bool(torch.isfinite(x).all()):
            return False, "the point contains non-finite values"
        mask = self.active_mask(u)
        eye = torch.diag_embed(mask)
        if not torch.allclose(mT(u) @ u, eye, atol=atol, rtol=rtol):
            return False, "U does not have orthonormal (or exactly zero inactive) columns"
        if not torch.allclose(mT(v) @ v, eye, atol=atol, rtol=rtol):
            return False, "V does not have orthonormal (or exactly zero inactive) columns"
        if self.adaptive:
            if not torch.equal(mask, self.active_mask(v)):
                return False, "U and V have different active columns"
            if not torch.equal(mask, torch.sort(mask, dim=-1, descending=True).values):
                return False, "the active columns must come first"
            if not torch.equal(s, s * mask.unsqueeze(-1) * mask.unsqueeze(-2)):
                return False, "S is not zero outside its active block"
        sv = svdvals_core(self.invertible_core(u, s))
        if not bool((sv.amin(-1) > 0).all()):
            return False, "the active block of S is singular: the rank is lower than the active rank"
        return True, None

    def _check_vector_on_tangent(self, x: Tensor, u: Tensor, *, atol=1e-5, rtol=1e-5):
        ux, _, vx = self.unpack(x)
        up, _, vp = self.unpack(u)
        if not torch.allclose(mT(ux) @ up, torch.zeros_like(mT(ux) @ up), atol=atol, rtol=rtol):
            return False, "gauge condition U^T Up = 0 violated"
        if not torch.allclose(mT(vx) @ vp, torch.zeros_like(mT(vx) @ vp), atol=atol, rtol=rtol):
            return False, "gauge condition V^T Vp = 0 violated"
        if not torch.equal(u, self._mask_tangent(ux, *self.unpack(u))):
            return False, "the tangent vector is not zero outside the active rank"
        return True, None

    # ---------------------------------------------------------------- packing
    def unpack(self, x: Tensor, *, check: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        """Split a packed tensor into its row blocks ``(U, S, V)`` (views, no copy).

        For a tangent vector the blocks are ``(Up, M, Vp)``. ``check=False`` skips the shape
        check, for callers that checked it once at their boundary (the optimizers, when a
        parameter joins a group; torch checks that a ``.grad`` has its parameter's shape).
        """
        if check:
            self._check_packed(x, "x")
        m, r = self.m, self.capacity
        return x[..., :m, :], x[..., m : m + r, :], x[..., m + r :, :]

    def pack(self, u: Tensor, s: Tensor, v: Tensor) -> Tensor:
        """Pack factors ``U (.., m, R)``, ``S (.., R, R)``, ``V (.., n, R)`` into one
        tensor ``[U; S; V]`` (batch axes broadcast; ``R`` the capacity).

        Works for tangent vectors too: ``pack(Up, M, Vp)``. The inputs are copied,
        not checked for orthonormality (see :meth:`projx` for that).
        """
        m, n, r = self.m, self.n, self.capacity
        for t, shape, name in ((u, (m, r), "U"), (s, (r, r), "S"), (v, (n, r), "V")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2 or tuple(t.shape[-2:]) != shape:
                raise ValueError(f"{name} must have trailing shape {shape}, got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        self._check_compatible(u, S=s, V=v)
        for t, name in ((u, "U"), (s, "S"), (v, "V")):
            self._check_finite(t, name)
        return cat_rows(u, s, v)

    # ------------------------------------------------------- dense conversions
    def to_dense(self, x: Tensor) -> Tensor:
        r""":math:`X = U S V^\top` as a dense ``(..., m, n)`` tensor (differentiable)."""
        u, s, v = self.unpack(x)
        return (u @ s) @ mT(v)

    def tangent_to_dense(self, x: Tensor, u: Tensor) -> Tensor:
        r"""The ambient matrix :math:`U M V^\top + U_p V^\top + U V_p^\top` of a tangent vector."""
        ux, _, vx = self.unpack(x)
        up, mm, vp = self.unpack(u)
        self._check_compatible(x, u=u)
        return (ux @ mm + up) @ mT(vx) + ux @ mT(vp)

    def from_dense(self, a: Tensor) -> ManifoldTensor:
        """The best rank-r approximation of a dense ``(..., m, n)`` matrix, packed.

        Computed by a truncated SVD (Eckart-Young), so ``S`` is diagonal with
        the r largest singular values. Raises if those include a zero one (the
        matrix has rank < r) or if ``a`` is not finite.
        """
        if not isinstance(a, Tensor) or a.dim() < 2 or tuple(a.shape[-2:]) != (self.m, self.n):
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"the matrix must have trailing shape ({self.m}, {self.n}), got {shape}")
        if not a.dtype.is_floating_point:
            raise TypeError(f"the matrix must have a floating dtype, got {a.dtype}")
        self._check_finite(a, "the matrix")
        r = self.rank
        u, s, vh = svd_core(a.detach())  # in float64, as the core SVDs (one-off, O(mn min(m, n)))
        s = s[..., :r]
        # numerical rank as in torch.linalg.matrix_rank: s_r > max(m, n) * eps * s_1
        cutoff = max(self.m, self.n) * torch.finfo(a.dtype).eps * s[..., :1]
        if a.device.type != "meta" and not bool((s[..., -1:] > cutoff).all()):
            raise ValueError(f"the matrix has numerical rank < {r}: it has no rank-{r} approximation")
        x = self.pad(u[..., :r], torch.diag_embed(s), mT(vh[..., :r, :]))
        return ManifoldTensor(x, manifold=self)

    def pad(self, u: Tensor, s: Tensor, v: Tensor) -> Tensor:
        """Pack factors of ``k <= R`` columns, ``U (.., m, k)``, ``S (.., k, k)``,
        ``V (.., n, k)``, into the capacity ``R``: ``[U; S; V]`` with zero inactive columns
        (a point of active rank ``k``, or a tangent vector ``(Up, M, Vp)``). Unlike
        :meth:`pack` it checks nothing (no host sync): for factors an algorithm has made."""
        extra = self.capacity - u.shape[-1]
        pad = torch.nn.functional.pad
        return cat_rows(pad(u, (0, extra)), pad(s, (0, extra, 0, extra)), pad(v, (0, extra)))

    # ------------------------------------------------------------ projections
    @staticmethod
    def _proj_from_products(u: Tensor, v: Tensor, zv: Tensor, ztu: Tensor) -> Tensor:
        # P_X(Z) needs only Z V and Z^T U:  M = U^T Z V,  Up = Z V - U M,  Vp = Z^T U - V M^T.
        mm = mT(u) @ zv
        return cat_rows(zv - tmm(u, mm), mm, ztu - tmm(v, mT(mm)))

    def _ambient_products(self, z: Ambient, u: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """``(Z V, Z^T U)`` for a dense ``Z`` or for ``Z = A B^T`` given as ``(A, B)``."""
        if isinstance(z, tuple):
            a, b = z
            return tmm(a, mT(b) @ v), tmm(b, mT(a) @ u)
        return tmm(z, v), mT(mT(u) @ z)

    def proj_dense(self, x: Tensor, z: Tensor) -> Tensor:
        r"""Orthogonal projection of a dense ambient matrix onto :math:`T_X\mathcal{M}_r`.

        .. math:: P_X(Z) = U M V^\top + U_p V^\top + U V_p^\top,\quad
                  M = U^\top Z V,\ U_p = Z V - U M,\ V_p = Z^\top U - V M^\top.

        Cost :math:`O(mnr)` for the two products with ``Z``, :math:`O((m+n)r^2)` after.
        """
        self._check_ambient(x, z, "Z")
        u, _, v = self.unpack(x)
        return self._proj_from_products(u, v, *self._ambient_products(z, u, v))

    def proj_lowrank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        r"""Projection of the ambient matrix :math:`A B^\top` (``A`` m x k, ``B`` n x k)
        without forming it: as :meth:`proj_dense` with :math:`ZV = A (B^\top V)` and
        :math:`Z^\top U = B (A^\top U)`; cost :math:`O((m + n) k r)`."""
        self._check_ambient(x, (a, b), "Z")
        u, _, v = self.unpack(x)
        return self._proj_from_products(u, v, *self._ambient_products((a, b), u, v))

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Project a packed vector ``[Up; M; Vp]`` that may violate the gauge conditions.

        Such a vector still stands for the ambient matrix
        :math:`\xi = U M V^\top + U_p V^\top + U V_p^\top`, which is tangent at X for
        any ``Up``, ``Vp``; the projection only moves the components of ``Up`` along
        ``U`` and of ``Vp`` along ``V`` into ``M``:

        .. math:: M' = M + U^\top U_p + V_p^\top V,\quad U_p' = (I - UU^\top) U_p,\quad
                  V_p' = (I - VV^\top) V_p.

        ``tangent_to_dense`` of the result equals that of the input.
        """
        self._check_packed(u, "u")
        self._check_compatible(x, u=u)
        ux, _, vx = self.unpack(x)
        up, mm, vp = self.unpack(u)
        uup = mT(ux) @ up
        vvp = mT(vx) @ vp
        return self._mask_tangent(ux, up - ux @ uup, mm + uup + mT(vvp), vp - vx @ vvp)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Riemannian gradient from autograd's gradient with respect to ``[U; S; V]``.

        For a loss :math:`L(USV^\top)` with :math:`G = \partial L / \partial X`,
        autograd gives :math:`dU = G V S^\top`, :math:`dS = U^\top G V`,
        :math:`dV = G^\top U S`; hence :math:`P_X(G)` is

        .. math:: M = dS,\quad U_p = (I - UU^\top)\, dU\, S^{-\top},\quad
                  V_p = (I - VV^\top)\, dV\, S^{-1}.

        computed as :math:`(I - UU^\top)(dU\, S^{-\top})` from :meth:`gradient_products`:
        when ``S`` is diagonal (as after every retraction) :math:`S^{-1}` is a column
        scaling, exact to rounding; for a general ``S`` the inverse comes from its float64
        SVD (:func:`~lowrank_manifolds._linalg.svd_core`).

        Zero and negligible singular values: :math:`S^{-1}` is the pseudo-inverse
        :math:`S^+` with singular values :math:`\le R\,\epsilon\,\sigma_{\max}(S)` treated as
        zero (``R`` the capacity, :math:`\epsilon` the dtype's machine epsilon; the
        convention of ``torch.linalg.pinv``), so an exactly zero or underflowed singular
        value gives no 0/0: its columns of ``Up`` and ``Vp`` are zero while ``M = dS`` keeps
        its full row and column, so the step is finite and the retraction can grow that
        direction back (the gradient of the rank-deficient matrix restricted to the
        directions that keep the column space of the non-zero part). With a capacity the
        inactive block of ``S`` is zero and is handled the same way.

        Non-finite gradients: if ``u`` contains NaN or inf this raises ``ValueError``
        before anything is computed (before geoopt's optimizers fold it into their
        moments); see ``check_finite`` in the class docstring for when this is checked.

        A weight decay that adds
        :math:`\lambda [U; S; V]` to ``u`` (as geoopt's optimizers do) becomes
        :math:`M \mathrel{+}= \lambda S`: the Riemannian gradient of
        :math:`\tfrac{\lambda}{2}\|X\|_F^2`.
        """
        self._check_packed(u, "the gradient")
        self._check_compatible(x, gradient=u)
        if self._checks_finite(u) and not all_finite(u):
            raise ValueError(
                "non-finite gradient (nan or inf) passed to egrad2rgrad: the Euclidean gradient "
                "with respect to the packed factors [U; S; V] must be finite (check the loss, "
                "the learning rate, or skip the step as torch.amp.GradScaler does)"
            )
        ux, _, vx, ds, gv, gtu = self.gradient_products(x, u)
        up = gv - tmm(ux, mT(ux) @ gv)  # (I - UU^T) G V
        vp = gtu - tmm(vx, mT(vx) @ gtu)  # (I - VV^T) G^T U
        return self._mask_tangent(ux, up, ds, vp)

    def gradient_products(self, x: Tensor, grad: Tensor) -> GradientProducts:
        r"""The products :math:`GV = dU\, S^{+\top}` and :math:`G^\top U = dV S^{+}` from
        autograd's gradient ``grad`` on the packed point ``x`` (:math:`dU = G V S^\top`,
        :math:`dV = G^\top U S`), with ``x``'s factors and :math:`dS`: a
        :class:`GradientProducts`. What every Riemannian
        gradient of this manifold is made of (:meth:`egrad2rgrad`, the optimizers' steps):
        :math:`P_X G = U\, dS\, V^\top + (I - UU^\top) GV V^\top + U (G^\top U)^\top (I - VV^\top)`.

        :math:`S^+` is the pseudo-inverse with singular values :math:`\le R\,\epsilon\,
        \sigma_{\max}(S)` treated as zero (:meth:`pinv_rtol`; :meth:`egrad2rgrad`'s docstring
        says why), so the inactive block of a capacity point (zero) and an exactly zero singular
        value give zero columns instead of a singular solve. When ``S`` is diagonal (as after
        every retraction) it is a column scaling, exact to rounding; the test is made on the CPU
        only, where it costs no synchronisation; elsewhere, and for a general ``S``, the
        float64 SVD of the ``R x R`` core gives it. ``x`` and ``grad`` are not checked (a
        step checks them once)."""
        ux, s, vx = self.unpack(x, check=False)
        du, ds, dv = self.unpack(grad, check=False)
        rtol = self.pinv_rtol(s.dtype)
        if is_diagonal(s):
            # a column scaling: a third of the flops of the general products
            d = safe_reciprocal(torch.diagonal(s, dim1=-2, dim2=-1), rtol).unsqueeze(-2)
            return GradientProducts(ux, s, vx, ds, du * d, dv * d)
        s_inv = pinv_core(s, rtol)
        return GradientProducts(ux, s, vx, ds, tmm(du, mT(s_inv)), tmm(dv, s_inv))

    def pinv_rtol(self, dtype: torch.dtype) -> float:
        """Relative threshold ``R eps`` below which singular values of ``S`` count as zero
        (relative to the largest) in the pseudo-inverses of :meth:`egrad2rgrad` and the
        optimizers."""
        return self.capacity * torch.finfo(dtype).eps

    def _checks_finite(self, t: Tensor) -> bool:
        if t.device.type == "meta":
            return False
        if self.check_finite is None:
            return t.device.type == "cpu"
        return self.check_finite

    def ehess2rhess(self, x: Tensor, egrad: Ambient, ehess: Ambient, u: Tensor) -> Tensor:
        r"""Riemannian Hessian-vector product (Vandereycken 2013, Prop. 2.3).

        For :math:`H = (U_p, M, V_p)` tangent at X, with the ambient Euclidean
        gradient :math:`G` and :math:`D^2 f(X)[H]` given as dense ``(m, n)`` tensors
        or as factor pairs ``(A, B)`` meaning :math:`AB^\top`:

        .. math:: \operatorname{Hess} f(X)[H] = P_X(D^2 f(X)[H])
                  + (I - UU^\top) G V_p S^{-\top} V^\top + U S^{-\top} U_p^\top G (I - VV^\top).

        :math:`S^{-1}` is the pseudo-inverse of :meth:`egrad2rgrad`. Both curvature terms
        take :math:`S^{-\top}`; this is right for a general,
        non-diagonal S (Manopt writes :math:`S^{-1}`, equal for its diagonal S).
        In packed form the curvature adds :math:`(I-UU^\top) G V_p S^{-\top}` to ``Up``
        and :math:`(I-VV^\top) G^\top U_p S^{-1}` to ``Vp``.
        """
        self._check_ambient(x, egrad, "egrad")
        self._check_ambient(x, ehess, "ehess")
        u = self.proju(x, u)
        ux, s, vx = self.unpack(x)
        up, _, vp = self.unpack(u)
        h_up, h_m, h_vp = self.unpack(
            self._proj_from_products(ux, vx, *self._ambient_products(ehess, ux, vx))
        )
        g_vp, gt_up = self._ambient_products(egrad, up, vp)
        g_vp = g_vp - ux @ (mT(ux) @ g_vp)
        gt_up = gt_up - vx @ (mT(vx) @ gt_up)
        s_inv = pinv_core(s, self.pinv_rtol(s.dtype))  # S^+ as in egrad2rgrad
        curv_u = tmm(g_vp, mT(s_inv))  # (I - UU^T) G Vp S^{-T}
        curv_v = tmm(gt_up, s_inv)  # (I - VV^T) G^T Up S^{-1}
        return cat_rows(h_up + curv_u, h_m, h_vp + curv_v)

    # ----------------------------------------------------------- metric etc.
    def inner(self, x: Tensor, u: Tensor, v: Optional[Tensor] = None, *, keepdim: bool = False) -> Tensor:
        r"""Euclidean metric :math:`\langle M, M'\rangle + \langle U_p, U_p'\rangle +
        \langle V_p, V_p'\rangle`: the Frobenius product of the packed tangent vectors
        (valid under the gauge conditions)."""
        v = u if v is None else v
        for t, name in ((x, "x"), (u, "u"), (v, "v")):
            self._check_packed(t, name)
        self._check_compatible(x, u=u, v=v)
        self._check_compatible(u, v=v)
        batch = torch.broadcast_shapes(x.shape[:-2], u.shape[:-2], v.shape[:-2])
        out = torch.linalg.vecdot(u.flatten(-2), v.flatten(-2)).expand(batch)  # no u * v temporary
        return out[..., None, None] if keepdim else out

    def component_inner(self, x: Tensor, u: Tensor, v: Optional[Tensor] = None) -> Tensor:
        """``inner(x, u, v, keepdim=True)``; ``"rows"``: the packed mean of ``u * v`` over the active
        columns of each row of ``Up``, ``Vp`` and over ``M``'s active block, broadcast across it."""
        if self.second_moment == "scalar":
            return self.inner(x, u, v, keepdim=True)
        self._check_packed(u, "u")
        self._check_compatible(x, u=u, **({} if v is None else {"v": v}))
        up, mm, vp, r = *self.unpack(u * (u if v is None else v)), self.capacity
        k = (self.active_rank(x).to(up.dtype).clamp(min=1) if self.adaptive else up.new_tensor(float(r)).expand(x.shape[:-2]))[..., None, None]
        c = mm.sum((-2, -1), keepdim=True) / (k * k)
        return cat_rows(*(t.expand(*t.shape[:-1], r) for t in (up.sum(-1, keepdim=True) / k, c.expand(*c.shape[:-2], r, 1), vp.sum(-1, keepdim=True) / k)))

    # ------------------------------------------------------------ retractions
    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Retraction: the point :math:`R_X(\xi)` on :math:`\mathcal{M}_r`.

        ``"metric"``: the truncated SVD of :math:`X + \xi`, computed in factored form

        .. math:: [U, U_p] = Q_u R_u,\quad [V, V_p] = Q_v R_v,\quad
                  C = R_u \begin{bmatrix} S + M & I \\ I & 0\end{bmatrix} R_v^\top
                  = P \Sigma Q^\top,

        :math:`U' = Q_u P_{:, :r}`, :math:`S' = \Sigma_{:r,:r}`, :math:`V' = Q_v Q_{:, :r}`.
        The QR is of :math:`[U, U_p]`, not of :math:`U_p` alone: Householder QR keeps
        :math:`Q_u` orthonormal even when ``Up`` is rank deficient or not quite
        orthogonal to ``U`` (Manopt fixed a loss of orthogonality that way), and since
        :math:`[U, U_p]\,[\cdot]\,[V, V_p]^\top = X + \xi` holds for any ``Up``, ``Vp``,
        vectors that violate the gauge (geoopt's first momentum step passes one) need no
        projection. Cost: two QRs of m x 2r and n x 2r, one 2r x 2r SVD.

        ``"orthographic"``: :math:`R_X(\xi) = (X + \xi) V (S + M)^{-1} U^\top (X + \xi)`,
        the rank-r point that differs from :math:`X + \xi` by a normal vector
        (Absil and Oseledets 2015); computed from QRs of :math:`US + UM + U_p` and
        :math:`VS^\top + VM^\top + V_p` and an r x r SVD. Needs :math:`S + M` invertible.

        The returned ``S'`` is diagonal, positive and descending.

        Autograd through the retraction is finite for every retraction, also at a zero
        tangent vector and with the zero padding of a capacity: the metric retraction
        differentiates the SVD of :math:`X + \xi` in factored form
        (:func:`~lowrank_manifolds._linalg.lowrank_svd`, exact wherever the kept singular
        values are positive and separated from the discarded ones), the other QRs and
        core SVDs use backwards that skip the undefined terms of repeated singular values
        and rank-deficient QRs (finite; exact where those are of full rank).
        """
        self._check_packed(u, "u")
        self._check_compatible(x, u=u)
        if self.retraction == "orthographic":
            return orthographic_retraction(self, x, u)
        if self.retraction == "metric":
            return metric_retraction(self, x, u)
        return integrator_retraction(self, x, u)

    def dist(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        """Not available: the geodesics of the fixed-rank manifold, hence its Riemannian
        distance, have no closed form (Vandereycken 2013, Sec. 2). Raises
        ``NotImplementedError`` saying what to use instead."""
        raise NotImplementedError(
            "FixedRankManifold.dist: the Riemannian distance has no closed form (nor do the geodesics); for the "
            "distance in the embedding, ||X - Y||_F, use torch.linalg.matrix_norm(manifold.to_dense(x) - "
            "manifold.to_dense(y)) on small matrices, or sqrt(||S_x||^2 + ||S_y||^2 - 2 tr(S_x^T (U_x^T U_y) S_y "
            "(V_y^T V_x))) from the factors")

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """The retraction :meth:`retr`: the geodesics of this manifold have no closed
        form, so the exponential map is replaced by the (second-order) retraction."""
        return self.retr(x, u)

    def projx(self, x: Tensor) -> Tensor:
        r"""A point representing :math:`A = USV^\top` for any finite packed ``x = [U; S; V]``
        (``U``, ``V`` need not be orthonormal, ``S`` need not be invertible).

        ``A`` has rank at most the capacity ``R``, so its truncated SVD within the capacity
        is ``A`` itself: the result is the nearest point to ``A`` (distance zero) whenever
        ``rank A`` is admissible. With :math:`U = Q_u R_u`, :math:`V = Q_v R_v` (QR with a
        non-negative diagonal) and :math:`C = R_u S R_v^\top`, :math:`A = Q_u C Q_v^\top`:

        - fixed rank: ``[Q_u; C; Q_v]``. If ``A`` has rank below ``r`` (``U``, ``V`` or ``S``
          rank deficient, e.g. ``S = 0``) ``C`` is singular: the result is still finite with
          orthonormal bases and represents ``A`` exactly, but it is a limit point of the
          manifold, not a point of it (``check_point_on_manifold`` says so).
        - with a capacity: from the float64 SVD :math:`C = P\Sigma Q^\top` the active rank is
          the numerical rank, the number of :math:`\sigma_j > R\,\epsilon\,\sigma_1`
          (the convention of ``torch.linalg.matrix_rank``), raised to ``min_rank`` if lower
          (with zero singular values there, handled by :meth:`egrad2rgrad` as a
          pseudo-inverse); the smaller singular values (rounding noise, at most
          :math:`R\epsilon\sigma_1` each) are dropped. The active columns come first, the
          inactive ones are exactly zero. The manifold's truncation tolerance is *not*
          applied: a retraction's result need not satisfy it again, and ``projx`` must
          leave points alone.

        Gauge: the kept singular vectors are rotated back towards :math:`Q_u`, :math:`Q_v`:
        :math:`U' = Q_u P_r G`, :math:`V' = Q_v Q_r H`, :math:`S' = G^\top \Sigma_r H`, with
        :math:`G`, :math:`H` the orthogonal QR factors of :math:`(P_r)_{:r,:}^\top`,
        :math:`(Q_r)_{:r,:}^\top`. On a point (orthonormal ``U``, ``V``, active block
        first, ``S`` of full rank there, diagonal or not) :math:`R_u = R_v = I` and
        :math:`P_r G = Q_r H = [I; 0]` to rounding, so ``projx`` returns the point
        unchanged, packed tensor included (optimizer states stored in its gauge stay
        valid), and ``projx(projx(x)) == projx(x)``. Where ``min_rank`` keeps singular values
        at the rounding level, their singular vectors are not determined: ``projx`` then
        keeps the matrix, and the packed tensor may rotate within those columns.

        Cost: two QRs of m x R and n x R (the parameter's dtype), one R x R SVD and two
        R x R QRs (float64) with a capacity; only the QRs at fixed rank. No host sync.
        """
        self._check_packed(x, "x")
        ux, s, vx = self.unpack(x)
        qu, ru = qr_positive(ux)
        qv, rv = qr_positive(vx)
        core = ru @ s @ mT(rv)
        if not self.adaptive:
            return cat_rows(qu, core, qv)
        p, sig, qh = svd_core(core)
        work = core_dtype(core)
        thr = self.pinv_rtol(s.dtype) * sig[..., :1]
        rank = (sig > thr).sum(-1).clamp(min=self.truncation.min_rank)
        mask = (torch.arange(self.capacity, device=s.device) < rank.unsqueeze(-1)).to(s.dtype)
        col, row = mask.unsqueeze(-2), mask.unsqueeze(-1)
        pk, qk = p * col, mT(qh) * col  # kept singular vectors, zero columns beyond the rank
        ident = torch.diag_embed(1 - mask)

        def regauge(a: Tensor) -> Tensor:
            # [[T, 0], [0, I]] with T the leading r x r block of the kept vectors
            g, _ = qr_positive(mT(a * row + ident).to(work))
            return g.to(s.dtype)

        g, h = regauge(pk), regauge(qk)
        s1 = (mT(g) @ torch.diag_embed(sig * mask) @ h) * row * col
        return cat_rows(tmm(qu, pk @ g) * col, s1, tmm(qv, qk @ h) * col)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        r"""Vector transport by projection: :math:`P_Y(\xi)` for :math:`\xi` tangent at X.

        :math:`\xi = A B^\top` with :math:`A = [U M + U_p,\ U]`, :math:`B = [V,\ V_p]`
        (m x 2r and n x 2r), projected at Y without forming it (:meth:`proj_lowrank`),
        cost :math:`O((m+n) r^2)`. As in :meth:`retr`, ``v`` need not satisfy the gauge
        conditions at X.
        """
        self._check_packed(y, "y")
        self._check_packed(v, "v")
        self._check_compatible(x, y=y, v=v)
        ux, _, vx = self.unpack(x)
        up, mm, vp = self.unpack(v)
        uy, _, vy = self.unpack(y)
        batch = torch.broadcast_shapes(x.shape[:-2], v.shape[:-2])
        a = torch.cat([ux @ mm + up, ux.expand(*batch, -1, -1)], -1)
        b = torch.cat([vx.expand(*batch, -1, -1), vp.expand(*batch, -1, -1)], -1)
        return self._proj_from_products(uy, vy, *self._ambient_products((a, b), uy, vy))

    # --------------------------------------------------------------- sampling
    def random(self, *size, dtype=None, device=None, **kwargs) -> ManifoldTensor:
        """A random point: Haar-distributed ``U``, ``V`` and ``S = diag(s)`` with
        ``s_i = 1 + |N(0, 1)|`` sorted in descending order.

        ``size`` is the full shape ``(*batch, m + R + n, R)``; empty means one point. With a
        capacity ``R > rank`` the point has active rank ``rank``.
        """
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if not size:
            size = self.packed_shape
        self._assert_check_shape(tuple(size), "x")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        batch = tuple(size[:-2])
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"random: dtype must be a real floating dtype, got {dtype}")
        opts = dict(dtype=dtype if dtype is not None else torch.get_default_dtype(), device=device)
        u, _ = qr_positive(torch.randn(*batch, self.m, self.rank, **opts))
        v, _ = qr_positive(torch.randn(*batch, self.n, self.rank, **opts))
        s = 1 + torch.randn(*batch, self.rank, **opts).abs()
        s = torch.sort(s, dim=-1, descending=True).values
        return ManifoldTensor(self.pad(u, torch.diag_embed(s), v), manifold=self)

    def random_tangent(self, x: Tensor) -> Tensor:
        """A random tangent vector at ``x`` (Gaussian ``Up``, ``M``, ``Vp`` projected)."""
        self._check_packed(x, "x")
        return self.proju(x, torch.randn_like(x))
