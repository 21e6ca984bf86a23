"""Float32 robustness: float64 cores, orthonormal bases over long runs, projx on any finite
input, zero singular values, gradients through the retractions, non-finite gradients."""
import math
import warnings
import pathlib

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_reference import dense_point, tangent_projector, truncated_svd
from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds._linalg import qr_positive, svd_core
from lowrank_manifolds.integrators import (
    ABCPSI,
    BUG,
    KSL,
    AugmentedBUG,
    CallableField,
    NaiveEuler,
    ParallelBUG,
    RetractionStep,
    Truncation,
    truncation_rank,
)
from lowrank_manifolds.testing import make_point, make_tangent

F32, F64 = torch.float32, torch.float64
DATA = pathlib.Path(__file__).parent / "data"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=gen(seed), dtype=F64).to(dtype)


# ----------------------------------------------------------- float64 cores
@pytest.fixture
def nan_float32_svd(monkeypatch):
    """torch.linalg.svd / svdvals that return NaN for float32 input, as the float32 CPU gesdd
    did on the stored core on another machine."""
    svd, svdvals = torch.linalg.svd, torch.linalg.svdvals

    def bad_svd(a, *args, **kwargs):
        out = svd(a, *args, **kwargs)
        return tuple(torch.full_like(t, float("nan")) for t in out) if a.dtype == F32 else out

    def bad_svdvals(a, *args, **kwargs):
        out = svdvals(a, *args, **kwargs)
        return torch.full_like(out, float("nan")) if a.dtype == F32 else out

    monkeypatch.setattr(torch.linalg, "svd", bad_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", bad_svdvals)


def test_stored_core_decomposes_in_float64(nan_float32_svd):
    core = torch.load(DATA / "svd_nan_core_f32.pt")
    assert core.dtype == F32 and core.shape == (64, 64) and torch.isfinite(core).all()
    p, s, qh = svd_core(core)
    assert all(t.dtype == F32 and torch.isfinite(t).all() for t in (p, s, qh))
    ref = torch.linalg.svdvals(core.double())
    assert (s.double() - ref).abs().max() <= 1e-6 * ref[0]
    assert ((p * s) @ qh - core).abs().max() <= 1e-5 * ref[0]
    u1, s1, v1 = Truncation(min_rank=8, max_rank=8)(torch.eye(64), core, torch.eye(64))
    err = (u1 @ s1 @ v1.T).double() - truncated_svd(core.double(), 8)
    assert torch.isfinite(err).all() and err.abs().max() <= 1e-5 * ref[0]


@pytest.mark.parametrize("kwargs", [dict(), dict(retraction="orthographic"), dict(max_rank=6, tol=1e-2)])
def test_float32_retraction_and_projx_never_use_a_float32_svd(nan_float32_svd, kwargs):
    m, n, r = 30, 20, 4
    mf = FixedRankManifold(m, n, r, **kwargs)
    mf64 = FixedRankManifold(m, n, r)
    x64 = make_point(mf64, 3, spectrum="graded", smallest=1e-3)
    xi64 = make_tangent(mf64, x64, 4, scale=0.3)
    if mf.adaptive:
        x64, xi64 = mf.pad(*mf64.unpack(x64)), mf.pad(*mf64.unpack(xi64))
    y = mf.retr(x64.float(), xi64.float())
    assert torch.isfinite(y).all() and mf.check_point_on_manifold(y)
    # dense float64 reference: the truncated SVD of X + xi, at the rank the tolerance keeps
    z = dense_point(x64, m, mf.capacity) + mf.tangent_to_dense(x64, xi64)
    if mf.adaptive:
        sz = torch.linalg.svdvals(z)
        tails = torch.stack([sz[j:].norm() for j in range(len(sz))])
        r = min(int((tails > 1e-2 * sz.norm()).sum()), mf.capacity)
        assert int(mf.active_rank(y)) == r
    if kwargs.get("retraction") == "orthographic":  # (X + xi) V (U^T (X + xi) V)^{-1} U^T (X + xi)
        u, _, v = mf64.unpack(x64)
        ref = z @ v @ torch.linalg.inv(u.T @ z @ v) @ u.T @ z
    else:
        ref = truncated_svd(z, r)
    assert (mf.to_dense(y).double() - ref).abs().max() <= 2e-5 * ref.abs().max()
    g = randn(mf.packed_shape, 5, F32)
    p = mf.projx(g)
    assert torch.isfinite(p).all()
    u, s, v = mf.unpack(g.double())
    assert (mf.to_dense(p).double() - u @ s @ v.T).abs().max() <= 1e-4 * (u @ s @ v.T).abs().max()


def test_truncation_rank_decides_in_float64():
    # s^2 overflows float32 here: the float32 tail would be inf and keep nothing
    s = torch.tensor([3e20, 2e20, 1e19, 1e10], dtype=F32)
    s64 = s.double()
    tail = torch.stack([s64[j:].norm() for j in range(4)])
    for tol in (0.01, 0.1, 0.5):
        expected = int((tail > tol * s64.norm()).sum())
        assert int(truncation_rank(s, tol)) == expected
    assert int(truncation_rank(s, 0.01)) == 3


# ------------------------------------------------- orthonormality over time
M_, N_, R_ = 20, 15, 3


def _rotation_field():
    g = gen(0)

    def skew(k):
        a = torch.randn(k, k, generator=g, dtype=F64)
        a = a - a.T
        return (a / torch.linalg.matrix_norm(a, 2)).float()

    w1, w2 = skew(M_), skew(N_)
    # Y' = W1 Y + Y W2^T, W skew: Y(t) = exp(t W1) Y0 exp(t W2)^T, the bases rotate for ever
    return CallableField(lambda u, s, v: (torch.cat([w1 @ u @ s, u], -1), torch.cat([v, w2 @ v @ s.mT], -1)))


_TR = Truncation(min_rank=R_, max_rank=R_)
DRIFT_INTEGRATORS = [
    KSL(), BUG(), AugmentedBUG(_TR), ParallelBUG(_TR), ABCPSI(_TR),
    RetractionStep("metric"), RetractionStep("orthographic"), NaiveEuler(),
]


def _drift(integrator, steps):
    field = _rotation_field()
    u, _ = qr_positive(randn((M_, R_), 1, F32))
    v, _ = qr_positive(randn((N_, R_), 2, F32))
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    eye = torch.eye(R_)
    with torch.no_grad():
        for _ in range(steps):
            u, s, v = integrator.step(u, s, v, field, 0.01)
    assert torch.isfinite(s).all()
    return max(float((u.T @ u - eye).abs().max()), float((v.T @ v - eye).abs().max()))


@pytest.mark.parametrize("integrator", DRIFT_INTEGRATORS, ids=repr)
def test_bases_stay_orthonormal_in_float32(integrator):
    # 1000 steps: parallel BUG that carries U0 over drifted to 4e-6 here (2e-5 after 10^4)
    assert _drift(integrator, 1000) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("integrator", DRIFT_INTEGRATORS, ids=repr)
def test_bases_stay_orthonormal_in_float32_over_ten_thousand_steps(integrator):
    assert _drift(integrator, 10_000) < 1e-5


def test_parallel_bug_keeps_its_maths():
    # constant field: the augmented result is exactly Y0 + h P_{Y0}(F), in orthonormal bases
    m, n, r = 12, 9, 3
    mf = FixedRankManifold(m, n, r)
    x = make_point(mf, 7)
    u, s, v = mf.unpack(x)
    z = randn((m, n), 8)
    uh, sh, vh = ParallelBUG().augmented_step(u, s, v, z, 0.3)
    assert (uh.T @ uh - torch.eye(2 * r, dtype=F64)).abs().max() < 1e-14
    assert (vh.T @ vh - torch.eye(2 * r, dtype=F64)).abs().max() < 1e-14
    ref = dense_point(x, m, r) + 0.3 * tangent_projector(x, m, r)(z)
    assert (uh @ sh @ vh.T - ref).abs().max() < 1e-13


# ------------------------------------------------------------------ projx
def _numerical_truncation(a, capacity, min_rank, eps):
    """Dense float64 reference: the SVD of ``a`` keeping the numerically non-zero singular
    values (> capacity * eps * s_1), at least min_rank, at most the capacity."""
    uu, ss, vh = torch.linalg.svd(a, full_matrices=False)
    k = int((ss > capacity * eps * ss[0]).sum()) if ss[0] > 0 else 0
    k = min(max(k, min_rank), capacity)
    return uu[:, :k] @ torch.diag(ss[:k]) @ vh[:k], k


def _raw_input(mf, seed, kind):
    x = randn(mf.packed_shape, seed)
    u, s, v = (t.clone() for t in mf.unpack(x))
    if kind == "zero S":
        s.zero_()
    elif kind == "singular S":
        s[:, -1] = 0.0
        s[-1] = s[0]  # rank-deficient, not diagonal
    elif kind == "repeated columns":
        u[:, -1] = u[:, 0]
    elif kind == "zero columns":
        u[:, 1:] = 0.0
    return torch.cat([u, s, v])


@settings(max_examples=60)
@given(
    st.integers(1, 12), st.integers(1, 12), st.data(), st.integers(0, 2**31 - 1),
    st.sampled_from(["gaussian", "zero S", "singular S", "repeated columns", "zero columns"]),
    st.booleans(),
)
def test_projx_returns_the_input_matrix_as_a_point(m, n, data, seed, kind, adaptive):
    cap = data.draw(st.integers(1, min(m, n)))
    rank = data.draw(st.integers(1, cap)) if adaptive else cap
    min_rank = data.draw(st.integers(1, rank)) if adaptive else rank
    mf = FixedRankManifold(m, n, rank, max_rank=cap, min_rank=min_rank, tol=0.3) if adaptive else \
        FixedRankManifold(m, n, rank)
    x = _raw_input(mf, seed, kind)
    y = mf.projx(x)
    assert torch.isfinite(y).all()
    u, s, v = mf.unpack(x)
    a = u @ s @ v.T
    ref, k = _numerical_truncation(a, cap, min_rank, torch.finfo(F64).eps)
    scale = max(1.0, float(a.abs().max()))
    assert (mf.to_dense(y) - ref).abs().max() <= 1e-10 * scale
    assert (mf.to_dense(y) - a).abs().max() <= 1e-10 * scale  # within the capacity: the matrix itself
    uy, sy, vy = mf.unpack(y)
    if adaptive:
        # A singular value near the numerical-zero threshold (cap * eps * s_1) is rounding: the
        # factored SVD and the dense one may decide it either way (a repeated column gives
        # 5.8e-17 against a threshold of 3.4e-16, which projx kept). Every value 100x clear of
        # the threshold is decided as the dense reference decides it.
        sv = torch.linalg.svdvals(a)
        threshold = cap * torch.finfo(F64).eps * sv[0]

        def ranks(t):
            return min(max(int((sv > t).sum()) if sv[0] > 0 else 0, min_rank), cap)

        assert ranks(100 * threshold) <= int(mf.active_rank(y)) <= ranks(threshold / 100), (sv, k)
    eye = torch.diag_embed(mf.active_mask(uy))
    assert (uy.T @ uy - eye).abs().max() < 1e-12 and (vy.T @ vy - eye).abs().max() < 1e-12
    assert (mf.to_dense(mf.projx(y)) - mf.to_dense(y)).abs().max() <= 1e-10 * scale  # idempotent
    if torch.linalg.svdvals(a)[min(k, len(torch.linalg.svdvals(a))) - 1] > 1e-8 * scale:
        ok, why = mf._check_point_on_manifold(y)
        assert ok, why
        # the packed tensor too, where its singular vectors are determined (min_rank can keep
        # noise-level singular values, whose vectors any rounding rotates)
        assert (mf.projx(y) - y).abs().max() <= 1e-10 * scale


@settings(max_examples=40)
@given(st.integers(2, 14), st.integers(2, 14), st.data(), st.integers(0, 2**31 - 1),
       st.sampled_from(["random", "graded", "repeated"]), st.booleans())
def test_projx_leaves_points_unchanged(m, n, data, seed, spectrum, diagonal):
    cap = data.draw(st.integers(1, min(m, n)))
    rank = data.draw(st.integers(1, cap))
    mf = FixedRankManifold(m, n, rank, max_rank=cap, tol=0.5) if data.draw(st.booleans()) else \
        FixedRankManifold(m, n, rank)
    x = mf.pad(*FixedRankManifold(m, n, rank).unpack(
        make_point(FixedRankManifold(m, n, rank), seed, spectrum=spectrum, smallest=1e-6, diagonal=diagonal)))
    assert mf.check_point_on_manifold(x)
    y = mf.projx(x)
    assert (y - x).abs().max() < 1e-12
    assert torch.equal(mf.active_rank(y), mf.active_rank(x))


def test_projx_of_gaussian_tensors_on_a_small_capacity():
    # geoopt's idiom ManifoldParameter(torch.randn(...)).proj_() on the case
    mf = FixedRankManifold(4, 30, 2, max_rank=4, tol=0.1)
    for seed in range(40):
        x = randn(mf.packed_shape, seed, F32)
        with torch.no_grad():
            p = geoopt.ManifoldParameter(x.clone(), manifold=mf).proj_()
        ok, why = mf._check_point_on_manifold(p.detach())
        assert ok, (seed, why)
        u, s, v = mf.unpack(x.double())
        assert (mf.to_dense(p.detach()).double() - u @ s @ v.T).abs().max() < 1e-4 * (u @ s @ v.T).abs().max()


# ------------------------------------------------------ zero singular values
def _point_with_zero_singular_value(mf, seed, dtype=F64):
    x = make_point(FixedRankManifold(mf.m, mf.n, mf.rank), seed).to(dtype)
    u, s, v = FixedRankManifold(mf.m, mf.n, mf.rank).unpack(x)
    s = s.clone()
    s[-1, -1] = 0.0
    return mf.pad(u, s, v)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_egrad2rgrad_with_an_exact_zero_singular_value(adaptive, diagonal):
    m, n, r = 14, 11, 4
    mf = FixedRankManifold(m, n, r, max_rank=6, tol=1e-3) if adaptive else FixedRankManifold(m, n, r)
    x = _point_with_zero_singular_value(mf, 1)
    if not diagonal:  # rotate S inside the active block: same matrix, general S
        q, _ = qr_positive(randn((r, r), 2))
        u, s, v = mf.unpack(x)
        qc = torch.eye(mf.capacity, dtype=F64)
        qc[:r, :r] = q
        x = mf.pack(u @ qc, qc.T @ s @ qc, v @ qc)
    target = randn((m, n), 3)
    xr = x.clone().requires_grad_(True)
    (0.5 * (mf.to_dense(xr) - target) ** 2).sum().backward()
    rg = mf.egrad2rgrad(x, xr.grad)
    assert torch.isfinite(rg).all()
    # dense reference: with U_a, V_a the columns of the non-zero singular values,
    # U U^T G V V^T + (I - UU^T) G V_a V_a^T + U_a U_a^T G (I - VV^T)
    u, s, v = FixedRankManifold(m, n, r).unpack(make_point(FixedRankManifold(m, n, r), 1))
    g = dense_point(x, m, mf.capacity) - target
    pu, pv = u @ u.T, v @ v.T
    ua, va = u[:, : r - 1], v[:, : r - 1]
    ref = pu @ g @ pv + (torch.eye(m, dtype=F64) - pu) @ g @ va @ va.T + ua @ ua.T @ g @ (torch.eye(n, dtype=F64) - pv)
    assert (mf.tangent_to_dense(x, rg) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_geoopt_steps_from_a_zero_singular_value(opt, adaptive):
    m, n, r = 16, 12, 3
    sm = dict(second_moment="scalar")  # Adam's rate below is the scalar moment's
    mf = FixedRankManifold(m, n, r, max_rank=5, tol=1e-2, **sm) if adaptive else FixedRankManifold(m, n, r, **sm)
    x0 = _point_with_zero_singular_value(mf, 4, F32)
    target = truncated_svd(randn((m, n), 5), r).float()
    p = geoopt.ManifoldParameter(x0.clone(), manifold=mf)
    optim = geoopt.optim.RiemannianSGD([p], lr=0.2) if opt == "sgd" else geoopt.optim.RiemannianAdam([p], lr=0.05)
    losses = []
    for _ in range(60 if opt == "sgd" else 150):
        optim.zero_grad()
        loss = 0.5 * ((mf.to_dense(p) - target) ** 2).sum()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        assert torch.isfinite(p).all()
    assert losses[-1] < 0.5 * losses[0]
    if not adaptive:  # the zero direction grew back (a rank-adaptive truncation may drop it instead)
        sv = torch.linalg.svdvals(mf.to_dense(p.detach()).double())
        assert sv[r - 1] > 1e-2


# ---------------------------------------------------- gradients through retr
RETRACTIONS = [
    ("metric", dict()),
    ("orthographic", dict(retraction="orthographic")),
    ("adaptive metric", dict(max_rank=6, tol=1e-3)),
    ("adaptive tol 0", dict(max_rank=6)),
    ("KSL", dict(retraction=KSL())),
    ("BUG", dict(retraction=BUG())),
    ("retraction step", dict(retraction=RetractionStep())),
    ("parallel BUG", dict(retraction=ParallelBUG())),
    ("adaptive parallel BUG", dict(max_rank=6, tol=1e-3, retraction=ParallelBUG())),
    ("adaptive augmented BUG", dict(max_rank=6, tol=1e-3, retraction=AugmentedBUG())),
    ("adaptive abc-PSI", dict(max_rank=6, tol=1e-3, retraction=ABCPSI())),
]


@pytest.mark.parametrize("zero", [False, True], ids=["random u", "u = 0"])
@pytest.mark.parametrize("name, kwargs", RETRACTIONS, ids=[r[0] for r in RETRACTIONS])
def test_gradient_through_every_retraction_is_finite(name, kwargs, zero):
    m, n, r = 12, 10, 3
    mf = FixedRankManifold(m, n, r, **kwargs)
    base = FixedRankManifold(m, n, r)
    x0 = make_point(base, 11)
    xi = torch.zeros_like(x0) if zero else make_tangent(base, x0, 12, scale=0.3)
    x, u = (mf.pad(*base.unpack(t)) for t in (x0, xi))
    x.requires_grad_(True)
    u.requires_grad_(True)
    w = randn((m, n), 13)
    loss = (w * mf.to_dense(mf.retr(x, u))).sum() + (mf.retr(x, u) ** 2).sum()
    gx, gu = torch.autograd.grad(loss, (x, u))
    assert torch.isfinite(gx).all() and torch.isfinite(gu).all()


@pytest.mark.parametrize("kwargs", [dict(), dict(max_rank=6, tol=1e-3)], ids=["fixed", "adaptive"])
def test_gradient_of_the_pullback_at_zero_is_the_dense_gradient(kwargs):
    # f(R_x(u)) = f(X + xi(u)) + O(|u|^2), xi(u) = U M V^T + Up V^T + U Vp^T linear in the
    # packed u: its gradient at u = 0 is [G V; U^T G V; G^T U] on the active columns.
    m, n, r = 12, 10, 3
    mf = FixedRankManifold(m, n, r, **kwargs)
    base = FixedRankManifold(m, n, r)
    x0 = make_point(base, 21)
    x = mf.pad(*base.unpack(x0))
    u = torch.zeros_like(x, requires_grad=True)
    target = randn((m, n), 22)
    loss = 0.5 * ((mf.to_dense(mf.retr(x, u)) - target) ** 2).sum()
    (gu,) = torch.autograd.grad(loss, u)
    uu, _, vv = base.unpack(x0)
    g = dense_point(x0, m, r) - target
    ref = mf.pad(g @ vv, uu.T @ g @ vv, g.T @ uu)
    assert (gu - ref).abs().max() < 1e-10


@pytest.mark.parametrize("kwargs", [dict(), dict(max_rank=6, tol=1e-3), dict(retraction="orthographic")],
                         ids=["fixed", "adaptive", "orthographic"])
def test_gradient_through_the_retraction_matches_finite_differences(kwargs):
    m, n, r = 12, 10, 3
    mf = FixedRankManifold(m, n, r, **kwargs)
    base = FixedRankManifold(m, n, r)
    x0 = make_point(base, 31, spectrum="graded", smallest=1e-2)
    x, u = mf.pad(*base.unpack(x0)), mf.pad(*base.unpack(make_tangent(base, x0, 32, scale=0.5)))
    w = randn((m, n), 33)

    def f(x, u):
        return (w * torch.sin(mf.to_dense(mf.retr(x, u)))).sum()

    xr, ur = x.clone().requires_grad_(True), u.clone().requires_grad_(True)
    gx, gu = torch.autograd.grad(f(xr, ur), (xr, ur))
    for seed, (t, g) in enumerate([(x, gx), (u, gu)]):
        d = mf.pad(*base.unpack(randn(x0.shape, 40 + seed)))
        h = 1e-6
        if t is x:
            fd = (f(x + h * d, u) - f(x - h * d, u)) / (2 * h)
        else:
            fd = (f(x, u + h * d) - f(x, u - h * d)) / (2 * h)
        assert abs(float(fd - (g * d).sum())) < 1e-6 * max(1.0, abs(float(fd)))


# ------------------------------------------------------ non-finite gradient
def test_egrad2rgrad_rejects_a_non_finite_gradient_before_adam_touches_its_state():
    mf = FixedRankManifold(10, 8, 2)
    p = geoopt.ManifoldParameter(mf.random(dtype=F32), manifold=mf)
    optim = geoopt.optim.RiemannianAdam([p], lr=1e-2)
    target = randn((10, 8), 1, F32)
    (0.5 * ((mf.to_dense(p) - target) ** 2).sum()).backward()
    optim.step()
    before = {k: v.clone() for k, v in optim.state[p].items() if torch.is_tensor(v)}
    point = p.detach().clone()
    optim.zero_grad()
    (0.5 * ((mf.to_dense(p) - target) ** 2).sum()).backward()
    p.grad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient.*egrad2rgrad.*Euclidean gradient"):
        optim.step()
    for k, v in before.items():
        assert torch.equal(optim.state[p][k], v), k
    assert torch.equal(p.detach(), point)


def test_check_finite_setting():
    x = FixedRankManifold(6, 5, 2).random()
    bad = torch.full_like(x, float("inf"))
    with pytest.raises(ValueError, match="non-finite gradient"):
        FixedRankManifold(6, 5, 2).egrad2rgrad(x, bad)
    with pytest.raises(ValueError, match="non-finite gradient"):
        FixedRankManifold(6, 5, 2, check_finite=True).egrad2rgrad(x, bad)
    out = FixedRankManifold(6, 5, 2, check_finite=False).egrad2rgrad(x, bad)  # unchecked: garbage in
    assert not torch.isfinite(out).all()
    mf = FixedRankManifold(6, 5, 2, check_finite=True)
    xm = torch.empty(x.shape, device="meta")
    assert mf.egrad2rgrad(xm, torch.empty(x.shape, device="meta")).device.type == "meta"  # never checked
    assert not mf._checks_finite(xm)
    assert not FixedRankManifold(6, 5, 2)._checks_finite(torch.empty(1, device="meta"))
    with pytest.raises(TypeError, match="check_finite"):
        FixedRankManifold(6, 5, 2, check_finite=1)


@pytest.mark.parametrize("kind", ["GeometricSGD", "GeometricAdam", "DLRT", "DLRT recorded"])
def test_our_optimizers_move_a_weight_with_an_exactly_zero_singular_value(kind):
    """S = diag(1, 0.5, 0): the step is finite (no singular solve), the loss decreases, and the
    zero singular value grows back (the target needs rank 3)."""
    from lowrank_manifolds.nn import LowRankLinear
    from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD

    torch.manual_seed(0)
    layer = LowRankLinear(8, 6, rank=3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.manifold.unpack(layer.weight)[1].copy_(torch.diag(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    target = x @ torch.randn(6, 8, generator=g, dtype=torch.float64).T
    opt = {
        "GeometricSGD": lambda: GeometricSGD(layer.parameters(), lr=0.05),
        "GeometricAdam": lambda: GeometricAdam(layer.parameters(), lr=0.02),
        "DLRT": lambda: DLRT(layer.parameters(), lr=0.05),
        "DLRT recorded": lambda: DLRT(layer.parameters(), lr=0.05, model=layer),
    }[kind]()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # DLRT without model= says it once
        for _ in range(30):
            opt.zero_grad()
            loss = ((layer(x) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert torch.isfinite(layer.weight).all()
    assert losses[-1] < 0.9 * losses[0]
    assert float(torch.linalg.svdvals(layer.dense_weight().detach())[2]) > 1e-3


@pytest.mark.parametrize("kw", [{}, {"retraction": "orthographic"}, {"max_rank": 4},
                                {"max_rank": 4, "retraction": "abc-psi"}, {"retraction": "ksl"}],
                         ids=["metric", "orthographic", "capacity", "abc-psi", "ksl"])
@pytest.mark.parametrize("big", [1e20, 1e30, 3e38])
def test_retractions_stay_finite_at_the_edge_of_float32(kw, big):
    """A finite float32 point with S = diag(big, big / 2) and a tangent vector of size big / 100:
    the retraction is finite and equals, scaled, the float64 retraction at S = diag(1, 1/2)
    (homogeneity, R_{cX}(c xi) = c R_X(xi)); at 3e38 the orthographic and integrator
    retractions used to overflow inside their products."""
    torch.manual_seed(0)
    mf = FixedRankManifold(10, 8, 2, **kw)
    x = mf.random()
    t = mf.random_tangent(x) * 0.01
    unit = x.double()
    mf.unpack(unit)[1].copy_(torch.diag_embed(torch.tensor([1.0, 0.5] + [0.0] * (mf.capacity - 2))))
    scaled = unit.float()
    mf.unpack(scaled)[1].mul_(big)
    y = mf.retr(scaled, t * big)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    ref = mf.to_dense(mf.retr(unit, t.double()))
    assert float((mf.to_dense(y.double()) / big - ref).norm() / ref.norm()) < 1e-5
