"""Capacity (max_rank), rank adaptivity and integrators as retractions of FixedRankManifold."""
import copy

import geoopt
import pytest
import torch

from dense_reference import dense_tangent, tangent_projector
from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.integrators import ABCPSI, BUG, KSL, AugmentedBUG, ParallelBUG, RetractionStep, truncation_rank

F64 = torch.float64
M, N, R = 30, 25, 6
INTEGRATORS = [KSL(), BUG(), AugmentedBUG(), ParallelBUG(), ABCPSI()]


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def planted(rank=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(M, rank, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(N, rank, generator=g, dtype=F64))
    return u @ torch.diag(torch.linspace(3.0, 1.0, rank, dtype=F64)) @ v.T


def active_factors(mf, x):
    r = int(mf.active_rank(x))
    u, s, v = mf.unpack(x)
    return u[:, :r], s[:r, :r], v[:, :r]


def test_capacity_construction_and_errors():
    mf = FixedRankManifold(M, N, 2, max_rank=R, tol=1e-3)
    x = mf.random(dtype=F64)
    assert x.shape == (M + R + N, R) and int(mf.active_rank(x)) == 2
    assert mf.check_point_on_manifold(x)
    assert "max_rank=6" in repr(mf)
    with pytest.raises(ValueError, match="max_rank"):
        FixedRankManifold(M, N, 4, max_rank=3)
    with pytest.raises(ValueError, match="max_rank"):
        FixedRankManifold(M, N, 2, max_rank=26)
    with pytest.raises(ValueError, match="need max_rank"):
        FixedRankManifold(M, N, 2, tol=1e-3)
    with pytest.raises(ValueError, match="min_rank"):
        FixedRankManifold(M, N, 2, max_rank=R, min_rank=3)
    with pytest.raises(ValueError, match="orthographic"):
        FixedRankManifold(M, N, 2, max_rank=R, retraction="orthographic")
    with pytest.raises(TypeError, match="integrator"):
        FixedRankManifold(M, N, 2, retraction=object())
    u, s, v = mf.unpack(x)
    swapped = mf.pack(u.flip(-1), s.flip(-1, -2), v.flip(-1))  # inactive columns first
    assert not mf.check_point_on_manifold(swapped)


def test_padded_operations_match_the_dense_geometry_of_the_active_part():
    mf = FixedRankManifold(M, N, 3, max_rank=R, tol=1e-10)
    x = mf.random(dtype=F64)
    u, s, v = active_factors(mf, x)
    active = torch.cat([u, s, v])  # the same matrix on a fixed-rank-3 manifold
    z = randn((M, N), 0)
    xi = mf.proj_dense(x, z)
    assert mf.check_vector_on_tangent(x, xi, atol=1e-12)
    assert (mf.tangent_to_dense(x, xi) - tangent_projector(active, M, 3)(z)).abs().max() < 1e-12
    # egrad2rgrad from autograd's gradient of the padded factors: the pseudo-inverse of S
    xr = x.detach().clone().requires_grad_(True)
    (0.5 * (mf.to_dense(xr) - z) ** 2).sum().backward()
    rgrad = mf.egrad2rgrad(x, xr.grad)
    ref = tangent_projector(active, M, 3)(mf.to_dense(x) - z)
    assert torch.isfinite(rgrad).all() and (mf.tangent_to_dense(x, rgrad) - ref).abs().max() < 1e-12
    assert mf.check_vector_on_tangent(x, rgrad, atol=1e-12)
    # a raw vector with junk in the inactive slots is cleaned by proju
    raw = randn(x.shape, 1)
    cleaned = mf.proju(x, raw)
    assert mf.check_vector_on_tangent(x, cleaned, atol=1e-12)
    assert (mf.tangent_to_dense(x, cleaned) - dense_tangent(active, torch.cat(
        [raw[:M, :3], raw[M : M + 3, :3], raw[M + R :, :3]]), M, 3)).abs().max() < 1e-12
    # metric retraction: the SVD of X + xi truncated by the tolerance, padded
    y = mf.retr(x, 0.3 * xi)
    target = mf.to_dense(x) + 0.3 * mf.tangent_to_dense(x, xi)
    sv = torch.linalg.svdvals(target)
    r1 = int(truncation_rank(sv[: 2 * 3], 1e-10))
    assert int(mf.active_rank(y)) == r1 == 6  # rank-6 X + xi fills the capacity
    assert mf.check_point_on_manifold(y, atol=1e-12)
    assert (mf.to_dense(y) - target).abs().max() < 1e-12
    # transport lands in the tangent space at y, zero outside its active rank
    w = mf.transp(x, y, xi)
    assert mf.check_vector_on_tangent(y, w, atol=1e-12)
    assert (mf.tangent_to_dense(y, w) - tangent_projector(y, M, R)(mf.tangent_to_dense(x, xi))).abs().max() < 1e-12
    # projx keeps the padding and is idempotent
    assert (mf.projx(x) - x).abs().max() < 1e-12


def test_truncation_drops_what_the_tolerance_allows():
    mf = FixedRankManifold(M, N, 4, max_rank=R, tol=1e-2)
    a = planted(4)
    tiny = 1e-4 * randn((M, 1), 2) @ randn((1, N), 3)
    x = mf.from_dense(a + tiny)
    xi = mf.proj_dense(x, -tiny)
    y = mf.retr(x, xi)
    sv = torch.linalg.svdvals(mf.to_dense(x) + mf.tangent_to_dense(x, xi))
    assert int(mf.active_rank(y)) == int(truncation_rank(sv, 1e-2))
    tail = sv[int(mf.active_rank(y)):].norm()
    assert abs((mf.to_dense(y) - mf.to_dense(x) - mf.tangent_to_dense(x, xi)).norm() - tail) < 1e-12


def test_adaptive_operations_on_the_meta_device():
    mf = FixedRankManifold(2000, 3000, 4, max_rank=8, tol=1e-3)
    x = torch.empty(*mf.packed_shape, device="meta")
    for out in (mf.proju(x, x), mf.egrad2rgrad(x, x), mf.retr(x, x), mf.transp(x, x, x), mf.projx(x)):
        assert out.device.type == "meta" and out.shape == mf.packed_shape
    assert mf.active_rank(x).device.type == "meta"
    mf_abc = FixedRankManifold(2000, 3000, 4, max_rank=8, tol=1e-3, retraction=ABCPSI())
    assert mf_abc.retr(x, x).shape == mf.packed_shape


# ------------------------------------------------------------ integrators as retractions
@pytest.mark.parametrize("integrator", INTEGRATORS, ids=lambda i: i.name)
def test_integrator_retraction_is_a_first_order_retraction(integrator):
    metric = FixedRankManifold(M, N, 3)
    mf = FixedRankManifold(M, N, 3, retraction=integrator)
    x = metric.random(dtype=F64)
    xi = metric.proju(x, randn(x.shape, 5))
    xi = xi / metric.norm(x, xi)
    assert (mf.to_dense(mf.retr(x, torch.zeros_like(x))) - mf.to_dense(x)).abs().max() < 1e-12
    errs = []
    for t in (1e-2, 1e-3):
        y = mf.retr(x, t * xi)
        assert mf.check_point_on_manifold(y, atol=1e-12)
        errs.append((mf.to_dense(y) - mf.to_dense(x) - t * mf.tangent_to_dense(x, xi)).norm().item())
    assert errs[1] < errs[0] / 50  # O(t^2)
    if integrator.rank_adaptive:  # constant tangent field: exactly the metric projection
        y, y_metric = mf.retr(x, 0.5 * xi), metric.retr(x, 0.5 * xi)
        assert (mf.to_dense(y) - mf.to_dense(y_metric)).abs().max() < 1e-12


def train(mf, make_optimizer, target, lr_steps=1000):
    x = geoopt.ManifoldParameter(mf.origin(dtype=F64, seed=0), manifold=mf)
    opt = make_optimizer([x])
    for _ in range(lr_steps):
        opt.zero_grad()
        (0.5 * (mf.to_dense(x) - target) ** 2).sum().backward()
        opt.step()
        err = ((mf.to_dense(x) - target).norm() / target.norm()).item()
        if err < 1e-6:
            break
    assert mf.check_point_on_manifold(x, atol=1e-10)
    return x, err


@pytest.mark.parametrize("retraction", ["metric"] + INTEGRATORS, ids=lambda r: getattr(r, "name", r))
@pytest.mark.parametrize("start", [1, R])
def test_rank_adaptive_training_finds_the_planted_rank(retraction, start):
    """Stock RiemannianSGD (momentum 0.5) with capacity 6: the rank grows from 1 or
    shrinks from 6 to the planted 3."""
    target = planted(3)
    mf = FixedRankManifold(M, N, start, max_rank=R, tol=1e-6, retraction=retraction)
    x, err = train(mf, lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.5), target)
    assert err < 1e-6 and int(mf.active_rank(x)) == 3


def test_rank_adaptive_adam_shrinks_to_the_planted_rank_and_resumes():
    target = planted(3)
    mf = FixedRankManifold(M, N, R, max_rank=R, tol=1e-6, second_moment="scalar")  # lr 0.05 is its rate
    x, err = train(mf, lambda p: geoopt.optim.RiemannianAdam(p, lr=0.05, betas=(0.9, 0.99)), target)
    assert err < 1e-6 and int(mf.active_rank(x)) == 3
    # state_dict round trip across the rank change: the same trajectory afterwards
    p1 = geoopt.ManifoldParameter(mf.origin(dtype=F64, seed=0), manifold=mf)
    opt1 = geoopt.optim.RiemannianAdam([p1], lr=0.05, betas=(0.9, 0.99))

    def step(p, opt):
        opt.zero_grad()
        (0.5 * (mf.to_dense(p) - target) ** 2).sum().backward()
        opt.step()

    for _ in range(300):
        step(p1, opt1)
    assert int(mf.active_rank(p1)) < R
    p2 = geoopt.ManifoldParameter(p1.detach().clone(), manifold=mf)
    opt2 = geoopt.optim.RiemannianAdam([p2], lr=0.05, betas=(0.9, 0.99))
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for state in opt2.state.values():
        state["step"] = int(state["step"])  # see docs/geometry.md: geoopt's float32 step after loading
    for _ in range(20):
        step(p1, opt1)
        step(p2, opt2)
    assert torch.equal(p1, p2)


def test_retraction_step_integrator_matches_the_builtin_retraction():
    mf = FixedRankManifold(M, N, 3)
    x = mf.random(dtype=F64)
    xi = mf.proju(x, randn(x.shape, 9))
    via = FixedRankManifold(M, N, 3, retraction=RetractionStep("metric"))
    assert (via.to_dense(via.retr(x, xi)) - mf.to_dense(mf.retr(x, xi))).abs().max() < 1e-12


@pytest.mark.parametrize("integrator", [AugmentedBUG(), ParallelBUG(), ABCPSI()], ids=lambda i: i.name)
def test_padded_rank_adaptive_integrators_equal_the_metric_retraction(integrator):
    """Constant tangent field on a padded point: the augmented result is X + xi, so
    after the same truncation the integrator and the metric retraction agree."""
    metric = FixedRankManifold(M, N, 2, max_rank=R, tol=1e-9)
    mf = FixedRankManifold(M, N, 2, max_rank=R, tol=1e-9, retraction=integrator)
    x = metric.random(dtype=F64)
    xi = metric.proju(x, randn(x.shape, 6))
    y, y_metric = mf.retr(x, 0.4 * xi), metric.retr(x, 0.4 * xi)
    assert int(mf.active_rank(y)) == int(metric.active_rank(y_metric)) == 4
    assert (mf.to_dense(y) - mf.to_dense(y_metric)).abs().max() < 1e-12
    assert mf.check_point_on_manifold(y, atol=1e-12)
