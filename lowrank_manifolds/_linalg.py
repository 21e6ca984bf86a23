"""Small dense kernels shared by the manifold and the integrators (private).

Every function here works on batches: the matrix dimensions are the last two
axes and all leading axes broadcast.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def mT(a: Tensor) -> Tensor:
    """Transpose of the last two axes."""
    return a.transpose(-1, -2)


def tmm(a: Tensor, b: Tensor) -> Tensor:
    """The product ``a @ b`` of a tall (or large square) ``a`` and a thin ``b``, in the
    orientation measured fastest.

    On the CPU in float64, torch's BLAS runs ``(b^T a^T)^T`` 1.3-3x faster than ``a @ b``
    (4000 x 4000 times 4000 x 32: 114 ms vs 39 ms; 1024 x 64 times 64 x 32: 232 us vs
    128 us); in float32 the plain orientation is the faster one (57 us vs 67 us there,
    and the transposed result also slows the packing ``torch.cat``: a stock
    RiemannianAdam step of the benchmark MLP went from 2.60x to 2.42x LoRA + Adam's with
    the plain orientation). Other devices take the plain product.
    """
    if a.dtype == torch.float64 and a.device.type == "cpu":
        return (b.transpose(-1, -2) @ a.transpose(-1, -2)).transpose(-1, -2)
    return a @ b


def _qr_backward_safe(q: Tensor, r: Tensor, gq: Tensor, gr: Tensor) -> Tensor:
    r"""Reverse-mode derivative of the reduced QR ``a = q r`` (``a`` m x k, m >= k):

    .. math:: \bar a = \big(\bar q + q\, \operatorname{copyltu}(M)\big)\, r^{-\top},
              \qquad M = r \bar r^\top - \bar q^\top q,

    ``copyltu`` the symmetric matrix with the lower triangle of ``M``. Where ``r`` has a
    zero (or negligible) diagonal entry, i.e. ``a`` is rank deficient and the column of
    ``q`` is not a function of ``a``, that entry is replaced by one in the triangular
    solve: the result is finite, and exact wherever ``a`` has full column rank.
    """
    m = r @ mT(gr) - mT(gq) @ q
    low = torch.tril(m, -1)
    sym = low + mT(low) + torch.diag_embed(torch.diagonal(m, dim1=-2, dim2=-1))
    b = gq + q @ sym
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    small = d.abs() <= torch.finfo(r.dtype).eps * d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    r_safe = r + torch.diag_embed(small.to(r.dtype) * (1 - d))
    return torch.linalg.solve_triangular(mT(r_safe), b, upper=False, left=False)


class _SafeQR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        q, r = torch.linalg.qr(a)
        ctx.save_for_backward(q, r)
        return q, r

    @staticmethod
    def backward(ctx, gq, gr):
        q, r = ctx.saved_tensors
        gq = torch.zeros_like(q) if gq is None else gq
        gr = torch.zeros_like(r) if gr is None else gr
        m, k = q.shape[-2], r.shape[-1]
        if m >= k:
            return _qr_backward_safe(q, r, gq, gr)
        # wide a = [X, Y] with X square: X = q r_X, Y = q r_Y (r_Y = q^T Y)
        y = q @ r[..., m:]
        gx = _qr_backward_safe(q, r[..., :m], gq + y @ mT(gr[..., m:]), gr[..., :m])
        return torch.cat([gx, q @ gr[..., m:]], dim=-1)


def factor_dtype(a: Tensor) -> torch.dtype:
    """The dtype the tall factorisations (QRs of the bases, SVDs of dense weights) of ``a`` run
    in: float32 for float16 and bfloat16, which LAPACK and cuSOLVER do not factorise (the
    results are rounded back; half precision keeps its storage and products), else ``a``'s."""
    return torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype


def qr(a: Tensor) -> Tuple[Tensor, Tensor]:
    """Reduced QR of ``a`` (m x k), in the dtype of ``a`` (computed in float32 for half
    precision, :func:`factor_dtype`).

    The forward is ``torch.linalg.qr``; under autograd the backward is
    :func:`_qr_backward_safe`, which stays finite when ``a`` is rank deficient (torch's
    own divides by the zero diagonal of ``R``: NaN).
    """
    work = factor_dtype(a)
    if work != a.dtype:
        q, r = qr(a.to(work))
        return q.to(a.dtype), r.to(a.dtype)
    if torch.is_grad_enabled() and a.requires_grad:
        return _SafeQR.apply(a)
    return torch.linalg.qr(a)


def leading(count: Tensor, k: int) -> Tensor:
    """Boolean ``(..., k)``: the first ``count`` (an integer tensor ``(...)``) of ``k``
    positions; a rank as a column mask, without a host read."""
    return torch.arange(k, device=count.device) < count.unsqueeze(-1)


def qr_kept_first(a: Tensor, keep: Tensor) -> Tensor:
    """``Q`` of the QR of the columns of ``a`` (``m x k``) reordered: those where ``keep``
    (boolean ``(..., k)``) is true first, in their order, then the others.

    The leading ``count(keep)`` columns of ``Q`` are those of the QR of the kept columns
    alone (to rounding) and the rest complete them to an orthonormal set. A QR of ``a``
    as it stands would not do: a zero column *before* kept ones (the inactive columns of a
    padded basis in ``[K, U]``) yields an arbitrary direction that later kept columns have
    components along, so the leading columns would not span them. The order is computed on
    the device (a stable sort of the mask): no host read."""
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    return qr(torch.gather(a, -1, order.unsqueeze(-2).expand(a.shape)))[0]


def qr_positive(a: Tensor) -> Tuple[Tensor, Tensor]:
    """Reduced QR with a non-negative diagonal of ``R``.

    Householder QR fixes ``Q`` only up to column signs; flipping them so that
    ``diag(R) >= 0`` makes the factorisation unique for full-rank ``a`` and, in
    particular, returns ``Q = a`` (to rounding) when ``a`` already has
    orthonormal columns. That is what keeps ``projx`` idempotent.
    """
    q, r = qr(a)
    d = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2), r * d.unsqueeze(-1)


def eye_like(a: Tensor, k: int) -> Tensor:
    """``k x k`` identity on the device and with the dtype of ``a``."""
    return torch.eye(k, dtype=a.dtype, device=a.device)


def cat_rows(*tensors: Tensor) -> Tensor:
    """Stack matrices on top of each other (second-to-last axis), broadcasting their batch
    axes: the packing ``[U; S; V]`` of points and tangent vectors."""
    batch = torch.broadcast_shapes(*(t.shape[:-2] for t in tensors))
    return torch.cat([t.expand(*batch, *t.shape[-2:]) for t in tensors], dim=-2)


def cat_last(*tensors: Tensor) -> Tensor:
    """Concatenate matrices side by side (last axis), broadcasting their batch axes."""
    batch = torch.broadcast_shapes(*(t.shape[:-2] for t in tensors))
    return torch.cat([t.expand(*batch, *t.shape[-2:]) for t in tensors], dim=-1)


def core_dtype(a: Tensor) -> torch.dtype:
    # MPS has no float64; everywhere else the small cores are decomposed in float64.
    return a.dtype if a.dtype == torch.float64 or a.device.type == "mps" else torch.float64


def _safe_inverse_gaps(s: Tensor) -> Tensor:
    r""":math:`F_{ij} = 1/(s_j^2 - s_i^2)` for ``i != j``, and 0 on the diagonal and wherever
    :math:`|s_j^2 - s_i^2| \le \epsilon\, s_{\max}^2` (repeated singular values, e.g. the
    zero padding of a capacity, whose vectors are not functions of the matrix)."""
    s2 = s * s
    gap = s2.unsqueeze(-2) - s2.unsqueeze(-1)  # gap[i, j] = s_j^2 - s_i^2
    floor = torch.finfo(s.dtype).eps * s2.amax(-1, keepdim=True).unsqueeze(-1).clamp_min(torch.finfo(s.dtype).tiny)
    ok = gap.abs() > floor
    return torch.where(ok, 1 / torch.where(ok, gap, torch.ones_like(gap)), torch.zeros_like(gap))


def safe_reciprocal(s: Tensor, rtol: float = 0.0) -> Tensor:
    """``1 / s`` where ``|s| > rtol * max|s|`` (and ``s != 0``), else 0: the pseudo-inverse of a
    diagonal. No host sync."""
    a = s.abs()
    ok = (a > rtol * a.amax(-1, keepdim=True)) & (a > 0)
    return torch.where(ok, 1 / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(s))


def _svd_backward(p: Tensor, s: Tensor, qh: Tensor, gp: Tensor, gs: Tensor, gqh: Tensor) -> Tensor:
    r"""Reverse-mode derivative of the thin SVD ``a = p diag(s) qh`` (Townsend 2016):

    .. math:: \bar a = P\big[(F \circ (P^\top \bar P - \bar P^\top P)) \Sigma + \operatorname{diag}(\bar s)
              + \Sigma (F \circ (Q^\top \bar Q - \bar Q^\top Q))\big] Q^\top
              + (I - PP^\top) \bar P \Sigma^{+} Q^\top + P \Sigma^{+} \bar Q^\top (I - QQ^\top),

    with :math:`F` from :func:`_safe_inverse_gaps` and :math:`\Sigma^+` the pseudo-inverse
    (the last two terms vanish for a square matrix). For a loss that does not depend on
    the gauge of repeated singular values (e.g. padding columns that are masked) this is
    the exact derivative; otherwise it is finite.
    """
    q, gq = mT(qh), mT(gqh)
    f = _safe_inverse_gaps(s)
    pg, qg = mT(p) @ gp, mT(q) @ gq
    inner = (f * (pg - mT(pg))) * s.unsqueeze(-2) + torch.diag_embed(gs) + s.unsqueeze(-1) * (f * (qg - mT(qg)))
    ga = p @ inner @ qh
    sinv = safe_reciprocal(s).unsqueeze(-2)
    if p.shape[-2] > p.shape[-1]:
        ga = ga + ((gp - p @ pg) * sinv) @ qh
    if q.shape[-2] > q.shape[-1]:
        ga = ga + (p * sinv) @ mT(gq - q @ qg)
    return ga


class _SVDCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        work = core_dtype(a)
        p, s, qh = torch.linalg.svd(a.to(work), full_matrices=False)
        p, s, qh = p.to(a.dtype), s.to(a.dtype), qh.to(a.dtype)
        ctx.save_for_backward(p, s, qh)
        return p, s, qh

    @staticmethod
    def backward(ctx, gp, gs, gqh):
        p, s, qh = ctx.saved_tensors
        gp = torch.zeros_like(p) if gp is None else gp
        gs = torch.zeros_like(s) if gs is None else gs
        gqh = torch.zeros_like(qh) if gqh is None else gqh
        return _svd_backward(p, s, qh, gp, gs, gqh)


def svd_core(a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(P, s, Q^T)`` of a small core matrix (``r x r``, ``2r x 2r``), computed in
    float64 and returned in the dtype of ``a``.

    The float32 CPU SVD (LAPACK gesdd) can return NaN singular vectors, or fail to
    converge, on finite, well-scaled cores that float64 decomposes without trouble; the
    cores are small, so float64 costs O(r^3) next to the O((m + n) r^2) QRs of the bases,
    which stay in the parameter's dtype. Differentiable with a finite backward
    (:func:`_svd_backward`): torch's own divides by :math:`s_j^2 - s_i^2` and returns NaN
    for repeated singular values such as the zero padding of a capacity.
    """
    if torch.is_grad_enabled() and a.requires_grad:
        return _SVDCore.apply(a)
    work = core_dtype(a)
    p, s, qh = torch.linalg.svd(a.to(work), full_matrices=False)
    return p.to(a.dtype), s.to(a.dtype), qh.to(a.dtype)


def svdvals_core(a: Tensor) -> Tensor:
    """Singular values of a small core, computed in float64 as :func:`svd_core`."""
    return torch.linalg.svdvals(a.to(core_dtype(a))).to(a.dtype)


def solve_core(a: Tensor, b: Tensor, *, left: bool = True) -> Tensor:
    """``a^{-1} b`` (``left``) or ``b a^{-1}`` for a small square core ``a``, solved in float64
    (as :func:`svd_core`) and returned in the dtype of ``b``. Differentiable."""
    work = core_dtype(b)
    return torch.linalg.solve(a.to(work), b.to(work), left=left).to(b.dtype)


def pinv_core(a: Tensor, rtol: float) -> Tensor:
    r"""Pseudo-inverse :math:`Q \Sigma^+ P^\top` of a small square core from its float64 SVD,
    singular values :math:`\le` ``rtol`` times the largest treated as zero."""
    p, s, qh = svd_core(a)
    return (mT(qh) * safe_reciprocal(s, rtol).unsqueeze(-2)) @ mT(p)


def _lowrank_svd_forward(left: Tensor, mid: Tensor, right: Tensor, w: int):
    ql, rl = qr(left)
    qr_, rr = qr(right)
    p, s, qh = svd_core(rl @ mid @ mT(rr))
    return ql, rl, qr_, rr, p, s, qh, tmm(ql, p[..., :w]), tmm(qr_, mT(qh[..., :w, :]))


class _LowRankSVD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, mid, right, w):
        ql, rl, qr_, rr, p, s, qh, uw, vw = _lowrank_svd_forward(left, mid, right, w)
        ctx.save_for_backward(ql, rl, qr_, rr, mid, p, s, qh)
        ctx.w = w
        return uw, s, vw

    @staticmethod
    def backward(ctx, guw, gs, gvw):
        ql, rl, qr_, rr, mid, p, s, qh = ctx.saved_tensors
        w, k = ctx.w, s.shape[-1]
        q = mT(qh)
        guw = torch.zeros(*ql.shape[:-1], w, dtype=s.dtype, device=s.device) if guw is None else guw
        gvw = torch.zeros(*qr_.shape[:-1], w, dtype=s.dtype, device=s.device) if gvw is None else gvw
        gs = torch.zeros_like(s) if gs is None else gs
        au, av = mT(ql) @ guw, mT(qr_) @ gvw
        bu, bv = mT(p) @ au, qh @ av  # U_k^T gU, V_k^T gV  (k x w)
        pad = torch.nn.functional.pad
        ju, jv = pad(bu, (0, k - w)), pad(bv, (0, k - w))
        f = _safe_inverse_gaps(s)
        phi = (f * (ju - mT(ju))) * s.unsqueeze(-2) + torch.diag_embed(gs) + s.unsqueeze(-1) * (f * (jv - mT(jv)))
        dw = safe_reciprocal(s[..., :w]).unsqueeze(-2)
        gu_perp = (guw - tmm(ql, p @ bu)) * dw  # (I - U_k U_k^T) gU Sigma^+
        gv_perp = (gvw - tmm(qr_, q @ bv)) * dw  # (I - V_k V_k^T) gV Sigma^+
        left, right = ql @ rl, qr_ @ rr
        vtr, utl = qh @ rr, mT(p) @ rl  # V_k^T R, U_k^T L
        gup_l, gvp_r = mT(gu_perp) @ left, mT(gv_perp) @ right  # zero when U_k spans L (V_k spans R)
        a_r = phi @ vtr + pad(gvp_r, (0, 0, 0, k - w))
        b_l = mT(phi) @ utl + pad(gup_l, (0, 0, 0, k - w))
        gz_r = tmm(ql, p @ a_r) + tmm(gu_perp, vtr[..., :w, :])  # gZ R
        gz_l = tmm(qr_, q @ b_l) + tmm(gv_perp, utl[..., :w, :])  # gZ^T L
        g_left = gz_r @ mT(mid)
        g_right = gz_l @ mid
        g_mid = mT(rl) @ p @ a_r + mT(gup_l) @ vtr[..., :w, :]  # L^T gZ R
        return g_left, g_mid, g_right, None


def lowrank_svd(left: Tensor, mid: Tensor, right: Tensor, w: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The thin SVD of :math:`Z = L\, C\, R^\top` (``L`` m x k, ``C`` k x k, ``R`` n x k) without
    forming Z: :math:`L = Q_l R_l`, :math:`R = Q_r R_r`, :math:`R_l C R_r^\top = P \Sigma Q^\top`.
    Returns ``(Q_l P_{:, :w}, s, Q_r Q_{:, :w})``: the first ``w`` singular vectors and all
    ``k`` singular values (descending).

    Differentiable, with a backward that never differentiates the QRs or the core SVD
    (they are not differentiable where ``L`` or ``R`` is rank deficient, e.g. at a zero
    tangent vector or with the zero padding of a capacity, although Z's leading SVD is):
    with the Townsend formula for the thin SVD of Z written in factored form,

    .. math:: \bar Z = U_k \Phi V_k^\top + (I - U_k U_k^\top) \bar U \Sigma^+ V^\top
              + U \Sigma^+ \bar V^\top (I - V_k V_k^\top),

    (:math:`U_k = Q_l P`, :math:`V_k = Q_r Q`, :math:`\Phi` the core bracket of
    :func:`_svd_backward`), :math:`\bar L = \bar Z R C^\top`, :math:`\bar R = \bar Z^\top L C`,
    :math:`\bar C = L^\top \bar Z R` cost :math:`O((m + n) k^2)`. Exact where the kept singular values are positive and
    distinct from the others; the pseudo-inverses keep it finite elsewhere.
    """
    if torch.is_grad_enabled() and (left.requires_grad or mid.requires_grad or right.requires_grad):
        return _LowRankSVD.apply(left, mid, right, w)
    out = _lowrank_svd_forward(left, mid, right, w)
    return out[-2], out[5], out[-1]


def is_diagonal(s: Tensor) -> bool:
    """Whether every matrix in ``s`` is exactly diagonal; answered on the CPU only, where the
    check costs no device synchronisation (elsewhere the general path is taken)."""
    if s.device.type != "cpu":
        return False
    return torch.equal(s, torch.diag_embed(torch.diagonal(s, dim1=-2, dim2=-1)))


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite: the sum is finite unless an entry is NaN or inf (or the
    sum overflows, then checked entrywise); 10x cheaper than ``isfinite(t).all()`` on the CPU."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
