"""Numerics of GeometricAdam: structural zeros of the augmented coefficients are exact, the
trajectory depends continuously on the gradient (4-ulp perturbations stay at rounding level),
and steps equal an independent dense float64 reference of the formulas.

The reference builds the augmented bases and the coefficients' blocks from dense QRs of
(I - UU^T) G V and (I - VV^T) G^T U with G the dense gradient, and truncates with an SVD of the
coefficient matrix; it shares no code with the optimizer. A separate test checks that the
optimizer's coefficients represent the dense projection P_X G.
"""
from __future__ import annotations

import geoopt
import pytest
import torch

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.optim import GeometricAdam
from lowrank_manifolds.optim._core import tangent_augment

torch.set_num_threads(1)
F64 = torch.float64


# --------------------------------------------------------------------------
# sensitivity to rounding
# --------------------------------------------------------------------------
def completion(dtype, adaptive):
    """30 x 20, rank 4 (capacity 6 when adaptive), half the entries of a Gaussian observed."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 30, 20, 4
    a = torch.randn(m, n, generator=g, dtype=F64)
    mask = (torch.rand(m, n, generator=g, dtype=F64) < 0.5).to(F64)
    mf = FixedRankManifold(m, n, r, max_rank=6) if adaptive else FixedRankManifold(m, n, r)
    cap = mf.capacity
    u, _ = torch.linalg.qr(torch.randn(m, cap, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, cap, generator=g, dtype=F64))
    s = torch.diag(torch.linspace(1.0, 0.3, cap, dtype=F64))
    act = (torch.arange(cap) < r).to(F64)
    u, v, s = u * act, v * act, s * act * act[:, None]
    return a.to(dtype), mask.to(dtype), mf, torch.cat([u, s, v]).to(dtype)


def trajectory(dtype, adaptive, perturb, steps=50, **kw):
    a, mask, mf, x0 = completion(dtype, adaptive)
    w = geoopt.ManifoldParameter(x0, manifold=mf)
    opt = GeometricAdam([w], lr=1e-2, **kw)
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(dtype).eps
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((mask * (mf.to_dense(w) - a)) ** 2).sum()).backward()
        if perturb:
            w.grad.mul_(1 + 4 * eps * torch.randn(w.grad.shape, generator=gen, dtype=F64).to(dtype))
        opt.step()
    return mf.to_dense(w).detach().double()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "adaptive, options",
    [(a, o) for a in (False, True) for o in ({}, {"m2_transport": "sqrt"}, {"perp_second_moment": "scalar"})]
    + [(True, {"tol": 0.05})],  # a group tol needs a capacity
)
def test_four_ulp_gradient_perturbation_stays_at_rounding_level(dtype, bound, adaptive, options):
    """Before the exact block structure: 0.36 of max|W| in float32 (1.5e-6 in float64, 2e-2
    adaptive); now about 1e-6 in float32 and 1e-14 in float64, as geoopt's RiemannianAdam."""
    clean = trajectory(dtype, adaptive, False, **options)
    moved = trajectory(dtype, adaptive, True, **options)
    rel = float((moved - clean).abs().max() / clean.abs().max())
    assert rel < bound, rel
    assert rel > 0 or dtype == torch.float64  # the perturbation did reach the step


# --------------------------------------------------------------------------
# the augmented coefficients
# --------------------------------------------------------------------------
def random_point(m, n, cap, rank, seed):
    g = torch.Generator().manual_seed(seed)
    mf = FixedRankManifold(m, n, rank, max_rank=cap) if cap > rank else FixedRankManifold(m, n, rank)
    u, _ = torch.linalg.qr(torch.randn(m, cap, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, cap, generator=g, dtype=F64))
    s = torch.diag(torch.rand(cap, generator=g, dtype=F64) + 0.5)
    act = (torch.arange(cap) < rank).to(F64)
    w = geoopt.ManifoldParameter(torch.cat([u * act, s * act * act[:, None], v * act]), manifold=mf)
    return mf, w, torch.randn(m, n, generator=g, dtype=F64)


def dense_tangent(u, v, g):
    pu, pv = u @ u.T, v @ v.T
    return pu @ g + g @ pv - pu @ g @ pv


@pytest.mark.parametrize("m, n, cap, rank", [(9, 7, 3, 3), (9, 7, 4, 2), (5, 8, 3, 3)])
def test_augmented_coefficients_are_exact_and_structured(m, n, cap, rank):
    mf, w, g = random_point(m, n, cap, rank, seed=m + cap)
    (g * mf.to_dense(w)).sum().backward()
    uh, vh, s0, gh, mask, (core, up, vp) = tangent_augment(w, w.grad, mf)
    u, s, v = mf.unpack(w.detach())
    # bases orthonormal on their used columns, the old point and P_X G represented exactly
    assert torch.allclose(uh @ s0 @ vh.T, u @ s @ v.T, atol=1e-13)
    assert torch.allclose(uh @ gh @ vh.T, dense_tangent(u, v, g), atol=1e-12)
    assert torch.allclose(uh.T @ uh, torch.eye(uh.shape[-1], dtype=F64), atol=1e-13)
    # structural zeros are exact zeros: the normal block, the triangles, inactive rows/columns
    support = core | up | vp
    assert torch.all(gh[~support] == 0)
    k = mask.shape[-1]
    normal = torch.ones_like(support)
    normal[:k, :] &= ~mask.unsqueeze(-1)
    normal[:, :k] &= ~mask.unsqueeze(-2)
    assert torch.all(gh[normal] == 0)
    low = gh[k:, :k]
    assert torch.all(low.tril(-1) == 0) and torch.all(gh[:k, k:].triu(1) == 0)


# --------------------------------------------------------------------------
# steps against a dense float64 reference
# --------------------------------------------------------------------------
def positive_qr(a):
    """The unique QR (non-negative diagonal of R): the square-root transport of m2 depends
    on the signs of the new basis columns, so the reference fixes them as the optimizer."""
    q, r = torch.linalg.qr(a)
    d = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(a.dtype)
    return q * d, r * d[:, None]


def reference_run(u, s, v, grads, lr, b1, b2, eps, transport):
    """Fixed-rank GeometricAdam from the formulas, dense: returns the weights after each step."""
    r = s.shape[0]
    m1 = torch.zeros(r, r, dtype=F64)
    m2 = torch.zeros(r, r, dtype=F64)
    out = []
    for t, grad_of in enumerate(grads, start=1):
        g = grad_of(u @ s @ v.T)
        qu, ru = positive_qr((g @ v) - u @ (u.T @ g @ v))
        qv, rv = positive_qr((g.T @ u) - v @ (v.T @ g.T @ u))
        uh, vh = torch.cat([u, qu], 1), torch.cat([v, qv], 1)
        # U^^T (P_X G) V^ by blocks: Qu^T (I - UU^T) G V = Ru, and its zero normal block. The
        # blocks are exact by definition; a product uh.T @ P_X G @ vh would put 1e-16 there,
        # which Adam's first step g / (|g| + eps) turns into 1e-8.
        gh = torch.cat([torch.cat([u.T @ g @ v, rv.T], 1), torch.cat([ru, torch.zeros(r, r, dtype=F64)], 1)])
        z = torch.zeros(2 * r, 2 * r, dtype=F64)
        big1, big2 = z.clone(), z.clone()
        big1[:r, :r], big2[:r, :r] = m1, m2
        big1 = b1 * big1 + (1 - b1) * gh
        big2 = b2 * big2 + (1 - b2) * gh * gh
        d = (big1 / (1 - b1**t)) / ((big2 / (1 - b2**t)).sqrt() + eps)
        sh = uh.T @ (u @ s @ v.T) @ vh - lr * d
        p, sv, qt = torch.linalg.svd(sh)
        p, q = p[:, :r], qt[:r].T
        u, s, v = uh @ p, torch.diag(sv[:r]), vh @ q
        m1 = p.T @ big1 @ q
        sq = (p * p).T @ big2 @ (q * q)
        m2 = sq if transport == "squared" else torch.maximum(sq, (p.T @ big2.sqrt() @ q) ** 2)
        out.append(u @ s @ v.T)
    return out


@pytest.mark.parametrize("transport", ["squared", "sqrt"])
def test_steps_equal_dense_reference(transport):
    m, n, r = 9, 7, 3
    mf, w, _ = random_point(m, n, r, r, seed=3)
    gen = torch.Generator().manual_seed(4)
    targets = [torch.randn(m, n, generator=gen, dtype=F64) for _ in range(4)]
    grads = [lambda x, a=a: x - a for a in targets]  # gradient of 0.5 ||X - A||^2
    u, s, v = (t.clone() for t in mf.unpack(w.detach()))
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
    ref = reference_run(u, s, v, grads, lr, b1, b2, eps, transport)
    opt = GeometricAdam([w], lr=lr, betas=(b1, b2), eps=eps, m2_transport=transport)
    for a, want in zip(targets, ref):
        opt.zero_grad()
        (0.5 * ((mf.to_dense(w) - a) ** 2).sum()).backward()
        opt.step()
        assert torch.allclose(mf.to_dense(w).detach(), want, atol=1e-11, rtol=0)
    assert not torch.allclose(ref[-1], u @ s @ v.T, atol=1e-2)  # it moved


def test_zero_eps_gives_a_finite_step():
    """Structural zeros have m1 = m2 = 0 exactly: with eps = 0 they must not become 0/0."""
    mf, w, g = random_point(9, 7, 4, 2, seed=5)
    opt = GeometricAdam([w], lr=0.01, eps=0.0)
    (g * mf.to_dense(w)).sum().backward()
    opt.step()
    assert torch.isfinite(w.detach()).all()
