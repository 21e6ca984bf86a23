r"""Matrix completion: the sampled least-squares loss of a packed point, from sparse kernels.

For observed entries :math:`(i_k, j_k, a_k)`, :math:`k = 1..N`, of an ``m x n`` matrix and a
point :math:`X = U S V^\top` (packed ``[U; S; V]``),

.. math:: f(X) = \frac{1}{2N} \sum_k w_k \big(X_{i_k j_k} - a_k\big)^2

(weights :math:`w_k = 1` unless given). Its Euclidean gradient is the sparse matrix
:math:`G = R / N` with :math:`R_{i_k j_k} = w_k (X_{i_k j_k} - a_k)`, and with respect to the
factors :math:`dU = G V S^\top`, :math:`dS = U^\top G V`, :math:`dV = G^\top U S`: two products of
a sparse matrix with a thin one. :class:`Observations` holds the pattern once, in CSR order
and in the CSR order of the transpose; :meth:`Observations.loss` is an autograd function whose
forward is one sampled product (``torch.sparse.sampled_addmm``, the residual at the observed
entries) and whose backward is the two sparse products: :math:`O(N r)` work, no gather of
:math:`N \times r` rows per factor, no ``m x n`` tensor. The loss is differentiable with respect
to the packed point, so stock geoopt optimizers and this package's take it as any loss.

Duplicate observations of one entry are merged (their weighted mean, with the weights summed):
:math:`\sum_l w_l (x - a_l)^2 = W (x - \bar a)^2 + \sum_l w_l (a_l - \bar a)^2`, and the
constant is kept, so the value is the sum over the observations as given.

Sources: Vandereycken 2013 (LRGeomCG), Sec. 4: the cost and its Riemannian gradient for
completion on the embedded manifold; Manopt's ``fixedrankembeddedfactory`` with sparse
Euclidean gradients.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ._linalg import cat_rows, mT

__all__ = ["Observations", "sampled_loss"]


class Observations:
    """Observed entries of an ``m x n`` matrix, held for :meth:`loss`.

    Parameters
    ----------
    rows, cols : Tensor
        Integer tensors ``(N,)``, the entries' row and column indices (any order; repeated
        entries allowed).
    values : Tensor
        Floating ``(N,)``, the observed values.
    shape : (int, int)
        ``(m, n)``.
    weights : Tensor, optional
        Non-negative ``(N,)``: a weighted loss (default: all ones).

    The pattern is sorted and merged once, here (``O(N log N)``); each :meth:`loss` call then
    costs one sampled product forward and two sparse products backward. The index tensors
    are moved to a point's device the first time it is seen there, and kept.
    """

    def __init__(self, rows: Tensor, cols: Tensor, values: Tensor, shape: Tuple[int, int],
                 weights: Optional[Tensor] = None):
        m, n = _check_shape(shape)
        for t, name in ((rows, "rows"), (cols, "cols")):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"{name} must be a 1-D integer tensor, got {_describe(t)}")
        if not isinstance(values, Tensor) or values.dim() != 1 or not values.dtype.is_floating_point:
            raise TypeError(f"values must be a 1-D floating tensor, got {_describe(values)}")
        if not rows.numel() == cols.numel() == values.numel():
            raise ValueError(f"rows, cols and values must have one length, got {rows.numel()}, {cols.numel()}, "
                             f"{values.numel()}")
        if values.numel() == 0:
            raise ValueError("there are no observations: the loss (a mean over them) is undefined")
        rows, cols = rows.to(torch.int64), cols.to(torch.int64)
        if bool((rows < 0).any() | (rows >= m).any() | (cols < 0).any() | (cols >= n).any()):
            raise ValueError(f"an observed entry lies outside the {m} x {n} matrix")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values contains non-finite entries")
        w = torch.ones_like(values) if weights is None else weights
        if not isinstance(w, Tensor) or w.shape != values.shape or not bool((w >= 0).all() & torch.isfinite(w).all()):
            raise ValueError("weights must be a finite, non-negative tensor of the shape of values")
        w = w.to(values.dtype)
        key, inverse = torch.unique(rows * n + cols, return_inverse=True)  # sorted: row-major, CSR order
        total = torch.zeros(key.numel(), dtype=values.dtype).index_add_(0, inverse, w)
        mean = torch.zeros_like(total).index_add_(0, inverse, w * values) / total.clamp_min(torch.finfo(values.dtype).tiny)
        self.shape = (m, n)
        self.count = values.numel()
        self._offset = 0.5 * float((w * (values - mean[inverse]) ** 2).sum())  # the spread within duplicates
        r, c = key // n, key % n
        order = torch.argsort(c * m + r)  # the CSR order of the transpose
        self._host: Dict[str, Tensor] = {
            "crow": _crow(r, m), "col": c, "targets": mean, "weights": total,
            "t_crow": _crow(c[order], n), "t_col": r[order], "order": order,
        }
        self._on: Dict[Tuple[torch.device, torch.dtype], Dict[str, Tensor]] = {}

    def _parts(self, ref: Tensor) -> Dict[str, Tensor]:
        """The pattern on ``ref``'s device, its values in ``ref``'s dtype (made once, kept)."""
        key = (ref.device, ref.dtype)
        parts = self._on.get(key)
        if parts is None:
            parts = self._on[key] = {k: v.to(ref.device, ref.dtype if v.dtype.is_floating_point else v.dtype)
                                     for k, v in self._host.items()}
        return parts

    def loss(self, x: Tensor, manifold) -> Tensor:
        r""":math:`\frac{1}{2N}\sum_k w_k (X_{i_k j_k} - a_k)^2` for the packed point ``x`` of
        ``manifold`` (2-D, no batch), differentiable with respect to ``x`` (module docstring)."""
        if (manifold.m, manifold.n) != self.shape:
            raise ValueError(f"the observations are of a {self.shape[0]} x {self.shape[1]} matrix, the manifold's "
                             f"points are {manifold.m} x {manifold.n}")
        manifold._check_packed(x, "x")
        if x.dim() != 2:
            raise ValueError(f"x must be one point (m + R + n, R), got shape {tuple(x.shape)}")
        return _SampledLoss.apply(x, manifold, self)


    def exact_step(self, x: Tensor, manifold, direction: Tensor) -> Tensor:
        r"""The minimiser :math:`t^*` of :math:`f(X + t\xi)` for the tangent vector ``direction``
        (packed ``[Up; M; Vp]``) at ``x``: along the straight line the loss is quadratic in
        :math:`t`, so :math:`t^* = -\langle R, Q\rangle_w / \langle Q, Q\rangle_w` with the
        residual :math:`R` and :math:`Q = P_\Omega(\xi)`, :math:`\xi = [UM + U_p, U][V, V_p]^\top`
        sampled in one product of rank 2R (Vandereycken 2013, Sec. 4.3: the initial step of
        LRGeomCG's line search). A 0-d tensor (no host sync); 0 where :math:`Q = 0`."""
        manifold._check_packed(direction, "direction")
        parts = self._parts(x)
        with torch.no_grad():
            u, _, v = manifold.unpack(x)
            up, mm, vp = manifold.unpack(direction)
            pattern = _csr(parts["crow"], parts["col"], parts["targets"], self.shape)
            q = torch.sparse.sampled_addmm(pattern, torch.cat([u @ mm + up, u], -1), mT(torch.cat([v, vp], -1)),
                                           beta=0.0).values()
            wq = parts["weights"] * q
            den = (wq * q).sum()
            return torch.where(den > 0, -(wq * _residual(x, manifold, parts)).sum() / den.clamp_min(
                torch.finfo(den.dtype).tiny), torch.zeros_like(den))


def sampled_loss(x: Tensor, manifold, rows: Tensor, cols: Tensor, values: Tensor,
                 weights: Optional[Tensor] = None) -> Tensor:
    """:meth:`Observations.loss` of the entries ``(rows, cols, values)``, building the pattern on
    every call (``O(N log N)``); in a loop, build :class:`Observations` once."""
    return Observations(rows, cols, values, (manifold.m, manifold.n), weights).loss(x, manifold)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    # built from indices made here, valid by construction: torch's invariant check is skipped;
    # its note that CSR support is in beta is about torch, not about the user's code
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _residual(x: Tensor, manifold, parts: Dict[str, Tensor]) -> Tensor:
    u, s, v = manifold.unpack(x)
    a = _csr(parts["crow"], parts["col"], parts["targets"], (manifold.m, manifold.n))
    # one sampled product: (U S) V^T at the pattern, minus the targets
    return torch.sparse.sampled_addmm(a, u @ s, mT(v), beta=-1.0).values()


class _SampledLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, manifold, obs):
        parts = obs._parts(x)
        res = _residual(x.detach(), manifold, parts)
        wres = parts["weights"] * res
        ctx.manifold, ctx.obs = manifold, obs
        ctx.save_for_backward(x.detach(), wres)
        return (0.5 * (res * wres).sum() + obs._offset) / obs.count

    @staticmethod
    def backward(ctx, grad):
        x, wres = ctx.saved_tensors
        mf, obs = ctx.manifold, ctx.obs
        parts = obs._parts(x)
        m, n = mf.m, mf.n
        vals = wres * (grad / obs.count)
        g = _csr(parts["crow"], parts["col"], vals, (m, n))
        gt = _csr(parts["t_crow"], parts["t_col"], vals[parts["order"]], (n, m))
        u, s, v = mf.unpack(x)
        gv, gtu = g @ v, gt @ u  # G V and G^T U: the two sparse products
        return cat_rows(gv @ mT(s), mT(u) @ gv, gtu @ s), None, None


def _crow(rows: Tensor, m: int) -> Tensor:
    return torch.cat([rows.new_zeros(1), torch.cumsum(torch.bincount(rows, minlength=m), 0)])


def _check_shape(shape) -> Tuple[int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"shape must be (m, n) with positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _describe(t) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
