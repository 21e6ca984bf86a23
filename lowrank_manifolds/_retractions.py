r"""The retractions of :class:`~lowrank_manifolds.FixedRankManifold`, in factored form.

Each takes the manifold (its sizes, capacity and truncation policy), a packed point ``x``
and a packed vector ``u`` and returns the packed point :math:`R_X(\xi)`; the formulas are in
:meth:`FixedRankManifold.retr <lowrank_manifolds.FixedRankManifold.retr>`. 
:data:`INTEGRATORS`, the integrators by name, is defined here and filled by
:mod:`lowrank_manifolds.integrators` (which imports the manifold): the manifold looks names up
without importing the integrators, so the package's modules import one another without a cycle.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from ._linalg import cat_rows, lowrank_svd, mT, qr, qr_positive, solve_core, svd_core

NAMES = ("metric", "orthographic")

#: name -> integrator class; filled by :mod:`lowrank_manifolds.integrators`, which is imported
#: with the package, so before any manifold is made.
INTEGRATORS: Dict[str, type] = {}


def resolve_retraction(retraction: Any, adaptive: bool) -> Any:
    """``"metric"``, ``"orthographic"`` or an integrator instance, from what the manifold was
    given (a name of either kind or an integrator); raises for anything else."""
    if isinstance(retraction, str) and retraction not in NAMES:
        if retraction not in INTEGRATORS:
            raise ValueError(f"retraction must be one of {NAMES}, a name of {sorted(INTEGRATORS)} or an "
                             f"integrator, got {retraction!r}")
        return INTEGRATORS[retraction]()
    if isinstance(retraction, str):
        if retraction == "orthographic" and adaptive:
            raise ValueError("the orthographic retraction keeps the rank: it cannot be rank-adaptive (max_rank)")
    elif not callable(getattr(retraction, "step", None)):
        raise TypeError("retraction must be 'metric', 'orthographic' or an integrator with a "
                        f"step(U, S, V, field, h) method, got {type(retraction).__name__}")
    return retraction


def _scale(s: Tensor, u: Tensor) -> Tensor:
    r"""A power of two ``c`` (``(..., 1, 1)``) with the entries of ``S / c`` and ``u / c`` below 2
    where some exceed the fourth root of the dtype's largest number (``2^32`` in float32), else exactly 1.

    The retractions are homogeneous, :math:`R_{cX}(c\xi) = c R_X(\xi)`, but the orthographic
    one's and the integrators' products and QRs multiply entries of ``S`` and ``u`` together: a
    finite point near the overflow threshold (``S = diag(3e38)`` in float32) would overflow
    inside them. Scaling by a power of two is
    exact, and with ``c = 1`` the ordinary case is computed as before, bit for bit. No host
    sync; ``c`` is piecewise constant, so it carries no gradient."""
    with torch.no_grad():
        big = 2.0 ** (math.frexp(torch.finfo(s.dtype).max)[1] // 4)
        a = torch.maximum(s.abs().amax((-2, -1)), u.abs().amax((-2, -1)))
        one = torch.ones_like(a)
        c = torch.where(a > big, torch.ldexp(one, torch.frexp(a).exponent - 1), one)  # a / c in [1, 2)
    return c[..., None, None]


def metric_retraction(mf, x: Tensor, u: Tensor) -> Tensor:
    r"""The truncated SVD of :math:`X + \xi` from QRs of ``[U, Up]``, ``[V, Vp]`` and a 2r x 2r core."""
    ux, s, vx = mf.unpack(x)
    up, mm, vp = mf.unpack(u)
    r = mf.capacity
    batch = torch.broadcast_shapes(x.shape[:-2], u.shape[:-2])
    left = torch.cat([ux.expand(*batch, -1, -1), up.expand(*batch, -1, -1)], -1)
    right = torch.cat([vx.expand(*batch, -1, -1), vp.expand(*batch, -1, -1)], -1)
    eye = torch.eye(r, dtype=s.dtype, device=s.device).expand(*batch, r, r)
    mid = torch.cat([torch.cat([(s + mm).expand(*batch, r, r), eye], -1),
                     torch.cat([eye, torch.zeros_like(eye)], -1)], -2)
    # X + xi = [U, Up] [[S + M, I], [I, 0]] [V, Vp]^T; the backward of lowrank_svd is the
    # factored derivative of the SVD of X + xi, finite at a zero tangent vector and with the
    # zero padding. No scaling (_scale): the QRs are of [U, Up] and [V, Vp], so their R
    # factors hold Up's and Vp's sizes in separate blocks that the core never multiplies
    # together, and the core is decomposed in float64.
    uw, sig, vw = lowrank_svd(left, mid, right, r)
    return cat_rows(*mf.truncation.from_svd(uw, sig, vw))  # the rank: fixed, or by tolerance


def integrator_retraction(mf, x: Tensor, u: Tensor) -> Tensor:
    r"""One step of size 1 of the manifold's integrator along the constant field :math:`\xi`,
    then the manifold's truncation."""
    u = mf.proju(x, u)
    ux, s, vx = mf.unpack(x)
    c = _scale(s, u)
    s = s / c
    up, mm, vp = mf.unpack(u / c)
    # the tangent vector as the ambient pair A B^T, A = [U M + Up, U], B = [V, Vp]
    field = (torch.cat([ux @ mm + up, ux.expand_as(up)], -1), torch.cat([vx.expand_as(vp), vp], -1))
    if mf.adaptive:
        # Integrators expect orthonormal bases: complete the zero columns to an orthonormal
        # basis (S stays zero there, so X is unchanged). With zero columns, a QR of [U0, K1]
        # would leave arbitrary directions inside the "old" basis and lose the components of
        # K1 along them (parallel BUG's U~ = last columns).
        ux, vx = _complete_basis(mf, ux), _complete_basis(mf, vx)
    integrator = mf.retraction
    if getattr(integrator, "rank_adaptive", False):
        u1, s1, v1 = integrator.augmented_step(ux, s, vx, field, 1.0)
    else:
        u1, s1, v1 = integrator.step(ux, s, vx, field, 1.0)
    return cat_rows(*mf.truncation(u1, s1 * c, v1))


def _complete_basis(mf, u: Tensor) -> Tensor:
    r"""Fill the inactive (zero) columns with an orthonormal completion."""
    q, _ = qr_positive(u)
    return u + q * (1 - mf.active_mask(u)).unsqueeze(-2)


def orthographic_retraction(mf, x: Tensor, u: Tensor) -> Tensor:
    r""":math:`(X + \xi) V (S + M)^{-1} U^\top (X + \xi)` from QRs of :math:`(X + \xi) V`,
    :math:`(X + \xi)^\top U` and an r x r SVD; needs :math:`S + M` invertible."""
    u = mf.proju(x, u)
    ux, s, vx = mf.unpack(x)
    c = _scale(s, u)
    up, mm, vp = mf.unpack(u / c)
    sm = s / c + mm
    qa, ra = qr(ux @ sm + up)  # (X + xi) V
    qb, rb = qr(vx @ mT(sm) + vp)  # (X + xi)^T U
    core = ra @ solve_core(sm, mT(rb))  # the r x r solve in float64, as the core SVD
    p, sig, qh = svd_core(core)
    return cat_rows(qa @ p, torch.diag_embed(sig[..., : mf.capacity]) * c, qb @ mT(qh))
