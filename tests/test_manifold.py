"""Properties of FixedRankManifold, each against the dense float64 formulas of
``dense_reference`` (which share no code with the package)."""

import geoopt
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from dense_reference import dense_point, dense_tangent, tangent_projector, truncated_svd
from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.testing import make_point, make_tangent, manifolds_and_points

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def orth_error(a):
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return (a.transpose(-1, -2) @ a - eye).abs().max().item()


def slope(ts, errs):
    return np.polyfit(np.log(ts), np.log(errs), 1)[0]


# ----------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "args, exc",
    [((5, 4, 0), ValueError), ((5, 4, 5), ValueError), ((0, 4, 1), ValueError), ((5, 4, 2.0), TypeError), ((5, True, 1), TypeError)],
)
def test_bad_construction(args, exc):
    with pytest.raises(exc):
        FixedRankManifold(*args)


def test_bad_retraction_name():
    with pytest.raises(ValueError, match="retraction"):
        FixedRankManifold(5, 4, 2, retraction="svd")


def test_geoopt_contract():
    mf = FixedRankManifold(7, 5, 3)
    assert isinstance(mf, geoopt.manifolds.Manifold) and mf.ndim == 2 and mf.reversible is False
    x = mf.random(dtype=F64)
    assert isinstance(x, geoopt.ManifoldTensor) and x.manifold is mf and x.shape == (15, 3)
    assert mf.check_point_on_manifold(x)
    p = geoopt.ManifoldParameter(x, manifold=mf)
    assert p.manifold is mf
    assert "m=7, n=5, rank=3" in repr(mf) and "second_moment" not in repr(mf)  # the default, rows
    assert "second_moment='scalar'" in repr(FixedRankManifold(7, 5, 3, second_moment="scalar"))
    o1, o2 = mf.origin(dtype=F64), mf.origin(dtype=F64)
    assert torch.equal(o1, o2) and isinstance(o1, geoopt.ManifoldTensor)
    batch = mf.random(4, 2, 15, 3)
    assert batch.shape == (4, 2, 15, 3) and mf.check_point_on_manifold(batch)
    with pytest.raises(ValueError):
        mf.random(14, 3)


# -------------------------------------------------------------------- projection
@given(manifolds_and_points(), seeds)
def test_projection_properties(case, seed):
    mf, x = case
    m, n, r = mf.m, mf.n, mf.rank
    z1, z2 = randn((m, n), seed), randn((m, n), seed + 1)
    proj = tangent_projector(x, m, r)
    p1 = mf.proj_dense(x, z1)
    d1 = dense_tangent(x, p1, m, r)
    scale = 1 + z1.norm().item()
    # matches the dense projector, and is tangent (gauge conditions)
    assert (d1 - proj(z1)).abs().max() < 1e-12 * scale
    assert mf.check_vector_on_tangent(x, p1, atol=1e-12 * scale)
    # linear
    lin = mf.proj_dense(x, 2.0 * z1 - 3.0 * z2) - (2.0 * p1 - 3.0 * mf.proj_dense(x, z2))
    assert lin.abs().max() < 1e-12 * scale
    # idempotent
    assert (mf.proj_dense(x, d1) - p1).abs().max() < 1e-12 * scale
    # self-adjoint
    lhs = (d1 * z2).sum()
    rhs = (z1 * dense_tangent(x, mf.proj_dense(x, z2), m, r)).sum()
    assert abs(lhs - rhs) < 1e-10 * scale**2
    # optimal: the residual is orthogonal to every tangent vector, so any tangent
    # perturbation is farther from z1
    eta = make_tangent(mf, x, seed + 2)
    res = z1 - d1
    assert abs((res * dense_tangent(x, eta, m, r)).sum()) < 1e-10 * scale**2
    assert (res - dense_tangent(x, eta, m, r)).norm() >= res.norm()
    # inner is the Frobenius product of the dense tangents
    p2 = mf.proj_dense(x, z2)
    assert abs(mf.inner(x, p1, p2) - (d1 * dense_tangent(x, p2, m, r)).sum()) < 1e-10 * scale**2


@given(manifolds_and_points(), seeds, st.booleans())
def test_gradient_products_are_gv_and_gtu(case, seed, rotate):
    """gradient_products recovers G V and G^T U from autograd's gradient on [U; S; V] (for a
    diagonal S, the column scaling, and for a general one, the pseudo-inverse), and
    egrad2rgrad built on them is the dense projection of G."""
    mf, x = case
    if rotate:  # the same matrix with a general S: U Q, Q^T S R, R^T V for orthogonal Q, R
        u, s, v = mf.unpack(x)
        r = s.shape[-1]
        q = torch.linalg.qr(randn((r, r), seed + 3))[0]
        w = torch.linalg.qr(randn((r, r), seed + 4))[0]
        x = mf.pack(u @ q, q.T @ s @ w, v @ w)
    g = randn((mf.m, mf.n), seed)
    point = x.clone().requires_grad_(True)
    u, s, v = mf.unpack(point)
    (g * (u @ s @ v.T)).sum().backward()
    parts = mf.gradient_products(x, point.grad)
    u, s, v = (t.detach() for t in (u, s, v))
    scale = 1 + g.norm().item() * (1 + float(torch.linalg.matrix_norm(torch.linalg.pinv(s), 2)))
    assert (parts.gv - g @ v).abs().max() < 1e-10 * scale
    assert (parts.gtu - g.T @ u).abs().max() < 1e-10 * scale
    assert (parts.ds - u.T @ g @ v).abs().max() < 1e-12 * scale
    rgrad = dense_tangent(x, mf.egrad2rgrad(x, point.grad), mf.m, mf.rank)
    assert (rgrad - tangent_projector(x, mf.m, mf.rank)(g)).abs().max() < 1e-10 * scale


@given(manifolds_and_points(), seeds, st.integers(1, 6))
def test_lowrank_and_dense_ambient_agree(case, seed, k):
    mf, x = case
    a, b = randn((mf.m, k), seed), randn((mf.n, k), seed + 1)
    p_low = mf.proj_lowrank(x, a, b)
    p_dense = mf.proj_dense(x, a @ b.T)
    assert (p_low - p_dense).abs().max() < 1e-12 * (1 + a.norm() * b.norm())


@given(manifolds_and_points(), seeds)
def test_proju_keeps_the_ambient_vector(case, seed):
    mf, x = case
    raw = randn(x.shape, seed)  # violates the gauge conditions
    fixed = mf.proju(x, raw)
    m, r = mf.m, mf.rank
    assert (dense_tangent(x, fixed, m, r) - dense_tangent(x, raw, m, r)).abs().max() < 1e-12 * (1 + raw.norm())
    assert mf.check_vector_on_tangent(x, fixed, atol=1e-12 * (1 + raw.norm()))
    assert (mf.proju(x, fixed) - fixed).abs().max() < 1e-12 * (1 + raw.norm())


# --------------------------------------------------------------------- retraction
@given(manifolds_and_points(), seeds, st.sampled_from([1e-3, 1e-1, 1.0]))
def test_metric_retraction_is_truncated_svd(case, seed, scale):
    mf, x = case
    m, r = mf.m, mf.rank
    xi = make_tangent(mf, x, seed, scale=scale)
    y = mf.retr(x, xi)
    target = dense_point(x, m, r) + dense_tangent(x, xi, m, r)
    sv = torch.linalg.svdvals(target)
    gap = sv[r - 1] - (sv[r] if sv.numel() > r else 0.0)
    if gap > 1e-6 * sv[0]:  # the best rank-r approximation is unique
        err = (dense_point(y, m, r) - truncated_svd(target, r)).abs().max()
        assert err < 1e-10 * sv[0] / (gap / sv[0])
    u, s, v = mf.unpack(y)
    assert orth_error(u) < 1e-12 and orth_error(v) < 1e-12
    assert torch.equal(s, torch.diag_embed(torch.diagonal(s)))
    assert (torch.diagonal(s)[:-1] >= torch.diagonal(s)[1:]).all()


@pytest.mark.parametrize("retraction", ["metric", "orthographic"])
@given(case=manifolds_and_points(spectrum="random"), seed=seeds)
def test_retraction_zero_and_orders(retraction, case, seed):
    mf0, x = case
    mf = FixedRankManifold(mf0.m, mf0.n, mf0.rank, retraction=retraction)
    m, r = mf.m, mf.rank
    xi = make_tangent(mf, x, seed)
    xi = xi / mf.norm(x, xi)
    x_dense = dense_point(x, m, r)
    assert (dense_point(mf.retr(x, torch.zeros_like(x)), m, r) - x_dense).abs().max() < 1e-12
    ts = np.array([1e-2, 3e-3, 1e-3, 3e-4])
    errs = [
        (dense_point(mf.retr(x, t * xi), m, r) - x_dense - t * dense_tangent(x, xi, m, r)).norm().item()
        for t in ts
    ]
    if max(errs) > 1e-12:  # the retraction may be exact along xi (e.g. rank = min(m, n))
        assert slope(ts, errs) > 1.8  # R(x, t xi) = x + t xi + O(t^2)


def test_orthographic_retraction_differs_by_a_normal_vector():
    mf = FixedRankManifold(12, 9, 3, retraction="orthographic")
    x = make_point(mf, 0)
    xi = make_tangent(mf, x, 1, scale=0.3)
    diff = dense_point(mf.retr(x, xi), 12, 3) - dense_point(x, 12, 3) - dense_tangent(x, xi, 12, 3)
    assert diff.norm() > 1e-3  # not trivially exact
    assert tangent_projector(x, 12, 3)(diff).abs().max() < 1e-12


@given(manifolds_and_points(spectrum="tiny"), seeds, st.sampled_from([0.0, 1e-8, 1.0]))
def test_retraction_stays_orthonormal_on_ill_conditioned_input(case, seed, noise):
    mf, x = case
    u, s, v = mf.unpack(x)
    m, r = mf.m, mf.rank
    # a step whose Up, Vp are rank deficient (one repeated column) and not orthogonal to U, V
    up = randn((m, 1), seed).expand(m, r) * 1e-8 + noise * u
    vp = randn((mf.n, 1), seed + 1).expand(mf.n, r) * 1e-12 + noise * v
    step = mf.pack(up, -s * (1 - 1e-12), vp)  # nearly cancels S: X + xi is nearly rank deficient
    y = mf.retr(x, step)
    yu, ys, yv = mf.unpack(y)
    assert torch.isfinite(y).all()
    assert orth_error(yu) < 1e-12 and orth_error(yv) < 1e-12


def test_retraction_is_invariant_to_the_svd_gauge():
    mf = FixedRankManifold(10, 8, 4)
    for spectrum in ("random", "repeated"):
        x = make_point(mf, 3, spectrum=spectrum)
        xi = make_tangent(mf, x, 4, scale=0.5)
        u, s, v = mf.unpack(x)
        up, mm, vp = mf.unpack(xi)
        if spectrum == "repeated":
            q, _ = torch.linalg.qr(randn((4, 4), 5))  # any rotation keeps X when S = I
            p = q
        else:
            q = p = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64))
        x2 = mf.pack(u @ p, p.T @ s @ q, v @ q)
        xi2 = mf.pack(up @ q, p.T @ mm @ q, vp @ p)
        assert (dense_point(x2, 10, 4) - dense_point(x, 10, 4)).abs().max() < 1e-13
        assert (dense_tangent(x2, xi2, 10, 4) - dense_tangent(x, xi, 10, 4)).abs().max() < 1e-13
        assert (dense_point(mf.retr(x2, xi2), 10, 4) - dense_point(mf.retr(x, xi), 10, 4)).abs().max() < 1e-12


# ---------------------------------------------------------------------- transport
@given(manifolds_and_points(), seeds)
def test_transport_is_projection_at_the_new_point(case, seed):
    mf, x = case
    m, r = mf.m, mf.rank
    xi = make_tangent(mf, x, seed, scale=0.3)
    v = make_tangent(mf, x, seed + 1)
    y = mf.retr(x, xi)
    w = mf.transp(x, y, v)
    ref = tangent_projector(y, m, r)(dense_tangent(x, v, m, r))
    assert (dense_tangent(y, w, m, r) - ref).abs().max() < 1e-11 * (1 + v.norm())
    assert mf.check_vector_on_tangent(y, w, atol=1e-11 * (1 + v.norm()))
    # identity when the point does not move
    assert (mf.transp(x, x, v) - v).abs().max() < 1e-12 * (1 + v.norm())
    # a vector that violates the gauge is transported as its ambient matrix
    raw = randn(x.shape, seed + 2)
    ref_raw = tangent_projector(y, m, r)(dense_tangent(x, raw, m, r))
    assert (dense_tangent(y, mf.transp(x, y, raw), m, r) - ref_raw).abs().max() < 1e-11 * (1 + raw.norm())
    y2, w2 = mf.retr_transp(x, xi, v)
    assert torch.allclose(y2, y) and torch.allclose(w2, w)


# ----------------------------------------------------------- gradient and Hessian
def quartic(a):
    """f(X) = sum(X^4)/4 - <A, X>: gradient X^3 - A, Hessian H -> 3 X^2 * H."""
    f = lambda xd: (xd**4).sum() / 4 - (a * xd).sum()
    return f, (lambda xd: xd**3 - a), (lambda xd, h: 3 * xd**2 * h)


@pytest.mark.parametrize("diagonal", [True, False])
@given(case=manifolds_and_points(spectrum="random"), seed=seeds)
def test_riemannian_gradient(diagonal, case, seed):
    mf, x0 = case
    m, r = mf.m, mf.rank
    x = make_point(mf, seed, diagonal=diagonal)
    f, grad, _ = quartic(randn((m, mf.n), seed + 1))
    xr = x.clone().requires_grad_(True)
    f(mf.to_dense(xr)).backward()
    rgrad = mf.egrad2rgrad(x, xr.grad)
    xd = dense_point(x, m, r)
    ref = tangent_projector(x, m, r)(grad(xd))
    assert (dense_tangent(x, rgrad, m, r) - ref).abs().max() < 1e-10 * (1 + ref.abs().max())
    xi = make_tangent(mf, x, seed + 2)
    xi = xi / mf.norm(x, xi)
    ts = np.array([1e-3, 3e-4, 1e-4, 3e-5])
    f0, slope1 = f(xd), mf.inner(x, rgrad, xi)
    errs = [abs(f(dense_point(mf.retr(x, t * xi), m, r)) - f0 - t * slope1).item() for t in ts]
    assert slope(ts, errs) > 1.8


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("lowrank_ambient", [False, True])
def test_riemannian_hessian(diagonal, lowrank_ambient):
    mf = FixedRankManifold(9, 7, 3)
    x = make_point(mf, 11, diagonal=diagonal)
    f, grad, hess = quartic(randn((9, 7), 12))
    xd = dense_point(x, 9, 3)
    g = grad(xd)
    xi, eta = make_tangent(mf, x, 13), make_tangent(mf, x, 14)
    xi = xi / mf.norm(x, xi)

    def ambient(z):
        if not lowrank_ambient:
            return z
        u, s, vh = torch.linalg.svd(z, full_matrices=False)
        return (u * s, vh.T)  # the same matrix as a factor pair

    def rhess(v):
        return mf.ehess2rhess(x, ambient(g), ambient(hess(xd, dense_tangent(x, v, 9, 3))), v)

    h_xi, h_eta = rhess(xi), rhess(eta)
    assert mf.check_vector_on_tangent(x, h_xi, atol=1e-10)
    assert abs(mf.inner(x, h_xi, eta) - mf.inner(x, xi, h_eta)) < 1e-10 * (1 + h_xi.norm() * eta.norm())
    proj = tangent_projector(x, 9, 3)
    rgrad = mf.proj_dense(x, g)
    ts = np.array([1e-2, 3e-3, 1e-3, 3e-4])
    errs = [
        abs(
            f(dense_point(mf.retr(x, t * xi), 9, 3))
            - f(xd) - t * mf.inner(x, rgrad, xi) - t**2 / 2 * mf.inner(x, h_xi, xi)
        ).item()
        for t in ts
    ]
    assert slope(ts, errs) > 2.7
    # and against a finite difference of the Riemannian gradient field along xi
    t = 1e-6
    y = mf.retr(x, t * xi)
    fd = (dense_tangent(y, mf.proj_dense(y, grad(dense_point(y, 9, 3))), 9, 3) - dense_tangent(x, rgrad, 9, 3)) / t
    assert (proj(fd) - dense_tangent(x, h_xi, 9, 3)).abs().max() < 1e-4 * (1 + h_xi.abs().max())


@given(manifolds_and_points(spectrum="repeated"), seeds)
def test_gradient_has_no_nan_with_repeated_singular_values(case, seed):
    mf, x = case
    xr = x.clone().requires_grad_(True)
    (mf.to_dense(xr) ** 3).sum().backward()
    rgrad = mf.egrad2rgrad(x, xr.grad)
    y = mf.retr(x, -0.1 * rgrad)
    assert torch.isfinite(rgrad).all() and torch.isfinite(y).all()


# ----------------------------------------------------------------- projx, shapes
@given(manifolds_and_points())
def test_projx_is_idempotent_and_keeps_the_matrix(case):
    mf, x = case
    m, r = mf.m, mf.rank
    assert (mf.projx(x) - x).abs().max() < 1e-12 * (1 + x.abs().max())
    u, s, v = mf.unpack(x)
    skewed = mf.pack(u @ torch.triu(torch.ones(r, r, dtype=F64)), s, 2 * v)
    fixed = mf.projx(skewed)
    assert mf.check_point_on_manifold(fixed, atol=1e-12)
    assert (dense_point(fixed, m, r) - dense_point(skewed, m, r)).abs().max() < 1e-11 * (1 + skewed.abs().max() ** 3)


@pytest.mark.parametrize("op", ["proju", "egrad2rgrad", "retr", "transp", "inner", "projx"])
def test_batched_equals_loop(op):
    mf = FixedRankManifold(8, 6, 2)
    x = make_point(mf, 0, batch=(3, 2))
    v = torch.stack([torch.stack([make_tangent(mf, x[i, j], 7 * i + j) for j in range(2)]) for i in range(3)])
    y = mf.retr(x, v)
    call = {
        "proju": lambda x, v, y: mf.proju(x, v),
        "egrad2rgrad": lambda x, v, y: mf.egrad2rgrad(x, v),
        "retr": lambda x, v, y: mf.retr(x, v),
        "transp": lambda x, v, y: mf.transp(x, y, v),
        "inner": lambda x, v, y: mf.inner(x, v, v),
        "projx": lambda x, v, y: mf.projx(x),
    }[op]
    batched = call(x, v, y)
    looped = torch.stack([torch.stack([call(x[i, j], v[i, j], y[i, j]) for j in range(2)]) for i in range(3)])
    assert (batched - looped).abs().max() < 1e-12


def test_a_single_point_broadcasts_against_a_batch_of_vectors():
    mf = FixedRankManifold(8, 6, 2)
    x = make_point(mf, 0)
    v = torch.stack([make_tangent(mf, x, k) for k in range(3)])
    assert mf.retr(x, v).shape == (3, 16, 2)
    assert mf.inner(x, v).shape == (3,)
    assert mf.inner(x, v, keepdim=True).shape == (3, 1, 1)


# ------------------------------------------------------------------- dtypes etc.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (F64, 1e-13)])
def test_dtypes_and_devices(device, dtype, tol):
    mf = FixedRankManifold(20, 15, 4)
    x = mf.random(dtype=dtype, device=device)
    assert x.dtype == dtype and x.device.type == device.type
    xi = mf.proju(x, torch.randn_like(x))
    for out in (mf.retr(x, xi), mf.transp(x, mf.retr(x, xi), xi), mf.egrad2rgrad(x, xi), mf.projx(x)):
        assert out.dtype == dtype and out.device.type == device.type
    y = mf.retr(x, 0.1 * xi)
    u, s, v = mf.unpack(y)
    assert orth_error(u.cpu()) < 10 * tol and orth_error(v.cpu()) < 10 * tol
    x64, xi64 = x.detach().double().cpu(), xi.double().cpu()
    ref = dense_point(mf.retr(x64, 0.1 * xi64), 20, 4)
    assert (dense_point(y.detach().double().cpu(), 20, 4) - ref).abs().max() < 1e3 * tol


def test_meta_device_runs_every_fixed_shape_operation():
    """Meta tensors have no data: any hidden host sync or CPU tensor would fail."""
    mf = FixedRankManifold(20000, 30000, 8)
    x = torch.empty(*mf.packed_shape, device="meta")
    g = torch.empty(*mf.packed_shape, device="meta")
    for out in (mf.proju(x, g), mf.egrad2rgrad(x, g), mf.retr(x, g), mf.transp(x, x, g), mf.projx(x)):
        assert out.device.type == "meta" and out.shape == mf.packed_shape
    assert FixedRankManifold(20, 30, 8, retraction="orthographic").retr(
        torch.empty(58, 8, device="meta"), torch.empty(58, 8, device="meta")
    ).device.type == "meta"
    assert mf.inner(x, g).device.type == "meta"


# ------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_and_left_untouched():
    mf = FixedRankManifold(6, 5, 2)
    x = make_point(mf, 0)
    xi = make_tangent(mf, x, 1)
    x_copy, xi_copy = x.clone(), xi.clone()
    with pytest.raises(ValueError, match="trailing shape"):
        mf.retr(x, xi[:-1])
    with pytest.raises(ValueError, match="trailing shape"):
        mf.proju(x[:, :1], xi)
    with pytest.raises(TypeError, match="dtype"):
        mf.retr(x, xi.float())
    with pytest.raises(ValueError, match="meta"):
        mf.transp(x, x, torch.empty_like(xi, device="meta"))
    with pytest.raises(TypeError, match="floating"):
        mf.proju(x, xi.long())
    with pytest.raises(ValueError, match="trailing shape"):
        mf.proj_dense(x, torch.zeros(5, 6, dtype=F64))
    with pytest.raises(ValueError, match="same number of columns"):
        mf.proj_lowrank(x, torch.zeros(6, 2, dtype=F64), torch.zeros(5, 3, dtype=F64))
    bad = xi.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mf.pack(*mf.unpack(bad))
    with pytest.raises(ValueError, match="non-finite"):
        mf.from_dense(torch.full((6, 5), float("inf"), dtype=F64))
    with pytest.raises(ValueError, match="rank < 2"):
        mf.from_dense(torch.ones(6, 5, dtype=F64))
    with pytest.raises(Exception, match="non-finite"):
        mf.retr(x, bad)  # the SVD refuses; the point is not touched
    # every operation is out of place
    for call in (mf.proju, mf.egrad2rgrad, mf.retr, lambda a, b: mf.transp(a, a, b)):
        call(x, xi)
    mf.projx(x)
    assert torch.equal(x, x_copy) and torch.equal(xi, xi_copy)


def test_from_dense_and_to_dense_round_trip():
    mf = FixedRankManifold(9, 7, 3)
    a = randn((9, 3), 0) @ randn((3, 7), 1)
    x = mf.from_dense(a)
    assert isinstance(x, geoopt.ManifoldTensor) and mf.check_point_on_manifold(x, atol=1e-12)
    assert (mf.to_dense(x) - a).abs().max() < 1e-12
    noisy = a + 1e-3 * randn((9, 7), 2)
    assert (mf.to_dense(mf.from_dense(noisy)) - truncated_svd(noisy, 3)).abs().max() < 1e-12
    xr = x.clone().requires_grad_(True)
    mf.to_dense(xr).sum().backward()  # differentiable
    assert xr.grad is not None and xr.grad.shape == x.shape


def test_dist_says_what_to_use_instead():
    mf = FixedRankManifold(6, 5, 2)
    x, y = mf.random(), mf.random()
    with pytest.raises(NotImplementedError, match="no closed form.*to_dense"):
        mf.dist(x, y)


def test_every_method_names_a_bad_argument():
    """Shapes, dtypes, devices and batch shapes are checked with the argument named (inner
    checked nothing; a batch mismatch was a raw broadcasting error)."""
    mf = FixedRankManifold(6, 5, 2)
    x = mf.random(2, *mf.packed_shape)
    u = torch.randn(3, *mf.packed_shape)
    for call in (lambda: mf.proju(x, u), lambda: mf.retr(x, u), lambda: mf.inner(x, u),
                 lambda: mf.egrad2rgrad(x, u), lambda: mf.transp(x, x, u), lambda: mf.component_inner(x, u)):
        with pytest.raises(ValueError, match="batch shape"):
            call()
    rows = FixedRankManifold(6, 5, 2, second_moment="rows")
    with pytest.raises(ValueError, match="batch shape"):
        rows.component_inner(x, u)
    with pytest.raises(ValueError, match="trailing shape"):
        mf.inner(x, torch.randn(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        mf.inner(x, x.double())
    with pytest.raises(TypeError, match="dtype"):
        mf.inner(x, x, x.double())
    for dtype in (torch.int64, torch.complex64, torch.bool):
        with pytest.raises(TypeError, match="real floating dtype"):
            mf.random(dtype=dtype)
