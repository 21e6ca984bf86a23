"""FixedRankManifold(second_moment=...): the second moment of geoopt's RiemannianAdam.

"rows" must be a function of the matrix tangent vector and of the point's row and column
spaces only (so it is unchanged by the gauge rotations every retraction applies), checked
against dense float64 formulas; "scalar" must stay geoopt's default (the metric)."""
import geoopt
import pytest
import torch
from hypothesis import assume, given, strategies as st

from dense_reference import dense_tangent, factors
from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.testing import fixed_rank_manifolds, make_point, make_tangent

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def rows_manifold(mf: FixedRankManifold) -> FixedRankManifold:
    return FixedRankManifold(mf.m, mf.n, mf.rank, second_moment="rows")


def orthogonal(r, seed):
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def rotate(mf, x, u, q1, q2):
    """The same point and tangent vector in the gauge (U Q1, Q1^T S Q2, V Q2)."""
    ux, s, vx = mf.unpack(x)
    up, mm, vp = mf.unpack(u)
    return mf.pack(ux @ q1, q1.T @ s @ q2, vx @ q2), mf.pack(up @ q2, q1.T @ mm @ q2, vp @ q1)


# ------------------------------------------------------------------ invariance
@given(fixed_rank_manifolds(12), seeds, seeds, st.booleans())
def test_rows_invariant_under_gauge_rotations(mf0, seed, qseed, polar):
    mf = rows_manifold(mf0)
    x = make_point(mf, seed, diagonal=polar)
    u, v = make_tangent(mf, x, seed + 1), make_tangent(mf, x, seed + 2)
    q1, q2 = orthogonal(mf.rank, qseed), orthogonal(mf.rank, qseed + 1)
    x2, u2 = rotate(mf, x, u, q1, q2)
    _, v2 = rotate(mf, x, v, q1, q2)
    torch.testing.assert_close(mf.component_inner(x2, u2), mf.component_inner(x, u))
    torch.testing.assert_close(mf.component_inner(x2, u2, v2), mf.component_inner(x, u, v))
    # the rotated point is the same matrix and u2 the same matrix tangent vector
    torch.testing.assert_close(dense_tangent(x2, u2, mf.m, mf.rank), dense_tangent(x, u, mf.m, mf.rank))


@given(fixed_rank_manifolds(12, min_dim=2), seeds, seeds)
def test_entrywise_square_is_not_gauge_invariant(mf0, seed, qseed):
    """The control: u * u (the withdrawn per-entry moment) does change under the gauge,
    so the invariance test above can tell an invariant moment from one that is not."""
    assume(mf0.rank >= 2)
    mf = rows_manifold(mf0)
    x = make_point(mf, seed)
    u = make_tangent(mf, x, seed + 1)
    q1, q2 = orthogonal(mf.rank, qseed), orthogonal(mf.rank, qseed + 1)
    x2, u2 = rotate(mf, x, u, q1, q2)
    assert not torch.allclose(u2 * u2, u * u, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mf.component_inner(x2, u2), mf.component_inner(x, u))


@pytest.mark.parametrize("second_moment", ["scalar", "rows"])
def test_riemannian_adam_run_does_not_depend_on_the_packing(second_moment):
    """Two RiemannianAdam runs from two packings of the same point (gauge rotations Q1, Q2)
    give the same matrices step after step: the untransported second moment refers to the
    same quantities in both."""
    mf = FixedRankManifold(20, 15, 3, second_moment=second_moment)
    x0 = make_point(mf, 7)
    a = mf.to_dense(make_point(mf, 8))
    x1, _ = rotate(mf, x0, torch.zeros_like(x0), orthogonal(3, 9), orthogonal(3, 10))
    xs = [geoopt.ManifoldParameter(x.clone(), manifold=mf) for x in (x0, x1)]
    opts = [geoopt.optim.RiemannianAdam([x], lr=3e-2) for x in xs]
    for _ in range(20):
        for x, opt in zip(xs, opts):
            opt.zero_grad()
            u, s, v = mf.unpack(x)
            (0.5 * (u @ s @ v.T - a).pow(2).sum()).backward()
            opt.step()
        torch.testing.assert_close(mf.to_dense(xs[1]).detach(), mf.to_dense(xs[0]).detach(), rtol=1e-9, atol=1e-10)


@given(fixed_rank_manifolds(12), seeds)
def test_rows_against_dense_formula(mf0, seed):
    """Row i of Up has the norm of row i of (I - UU^T) xi V V^T, row j of Vp that of
    row j of (I - VV^T) xi^T U U^T, and ||M|| = ||UU^T xi VV^T||: means over the r columns."""
    mf = rows_manifold(mf0)
    m, n, r = mf.m, mf.n, mf.rank
    x = make_point(mf, seed, diagonal=False)
    u = make_tangent(mf, x, seed + 1)
    ux, _, vx = factors(x, m, r)
    xi = dense_tangent(x, u, m, r)
    pu, pv = ux @ ux.T, vx @ vx.T
    a = ((xi - pu @ xi) @ pv).pow(2).sum(1) / r
    b = ((xi.T - pv @ xi.T) @ pu).pow(2).sum(1) / r
    c = (pu @ xi @ pv).pow(2).sum() / r**2
    want = torch.cat([a[:, None].expand(m, r), c.expand(r, r), b[:, None].expand(n, r)])
    torch.testing.assert_close(mf.component_inner(x, u), want)


# ------------------------------------------------------------ shapes and default
@given(fixed_rank_manifolds(10), seeds)
def test_rows_shape_nonnegative_and_batched(mf0, seed):
    mf = rows_manifold(mf0)
    xb = make_point(mf, seed, batch=(3,))
    ub = torch.stack([make_tangent(mf, xb[i], seed + i) for i in range(3)])
    out = mf.component_inner(xb, ub)
    assert out.shape == xb.shape and bool((out >= 0).all())
    for i in range(3):
        torch.testing.assert_close(out[i], mf.component_inner(xb[i], ub[i]))
    # one tangent broadcast against a batch of points
    assert mf.component_inner(xb, ub[0]).shape == xb.shape
    # the sums of the blocks recover the metric: r * (sum of Up, Vp rows' means) + r^2 * M's
    one = mf.component_inner(xb[0], ub[0])
    up, mm, vp = mf.unpack(one)
    total = mf.rank * (up[:, 0].sum() + vp[:, 0].sum()) + mf.rank**2 * mm[0, 0]
    torch.testing.assert_close(total, mf.inner(xb[0], ub[0]))


@given(fixed_rank_manifolds(10), seeds)
def test_scalar_moment_is_the_metric_and_rows_the_default(mf, seed):
    assert mf.second_moment == "rows"  # the default, the better first try (docs/training.md)
    mf = FixedRankManifold(mf.m, mf.n, mf.rank, second_moment="scalar")
    x = make_point(mf, seed)
    u, v = make_tangent(mf, x, seed + 1), make_tangent(mf, x, seed + 2)
    assert torch.equal(mf.component_inner(x, u), mf.inner(x, u, keepdim=True))
    assert torch.equal(mf.component_inner(x, u, v), mf.inner(x, u, v, keepdim=True))
    assert mf.component_inner(x, u).shape == (1, 1)


def test_bad_second_moment():
    with pytest.raises(ValueError, match="second_moment"):
        FixedRankManifold(5, 4, 2, second_moment="entrywise")


# ------------------------------------------------------------- RiemannianAdam
def fit(second_moment, lr, steps, seed=0, m=60, n=50, r=4):
    """Fully observed regression towards A = B C^T (standard normal B, C), from a random
    point with S scaled by 0.1; the final relative error."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    mf = FixedRankManifold(m, n, r, second_moment=second_moment)
    x0 = make_point(mf, seed + 1)
    mf.unpack(x0)[1].mul_(0.1)
    x = geoopt.ManifoldParameter(x0, manifold=mf)
    opt = geoopt.optim.RiemannianAdam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        u, s, v = mf.unpack(x)
        (0.5 * (u @ s @ v.T - a).pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        return float((mf.to_dense(x) - a).norm() / a.norm())


def test_rows_converges_at_an_lr_where_scalar_does_not():
    """60 x 50 rank 4, ||A|| about 110, lr 0.3, 400 steps (measured over seeds 0-2: rows
    8e-9 to 9e-8, scalar 0.17 to 0.24; the scalar moment needs lr >= 1 here, whose steps
    have Frobenius norm lr, while the rows' steps are about lr per entry)."""
    rows, scalar = fit("rows", 0.3, 400), fit("scalar", 0.3, 400)
    assert rows < 1e-5, rows
    assert scalar > 5e-2, scalar


# ------------------------------------------------------------ capacity padding
def test_capacity_padding_stays_zero_and_follows_fixed_rank():
    """On a capacity manifold (R = 6, active rank 3) the row means are over the active
    columns, so while the rank stays 3 a RiemannianAdam run follows the fixed-rank one;
    the point's and the first moment's inactive parts stay exactly zero."""
    m, n, r, cap = 14, 11, 3, 6
    fixed = FixedRankManifold(m, n, r, second_moment="rows")
    padded = FixedRankManifold(m, n, r, max_rank=cap, tol=0.05, second_moment="rows")
    a = fixed.to_dense(make_point(fixed, 4))
    x0 = make_point(fixed, 5)
    xs = [geoopt.ManifoldParameter(x0.clone(), manifold=fixed),
          geoopt.ManifoldParameter(padded.pad(*fixed.unpack(x0)), manifold=padded)]
    opts = [geoopt.optim.RiemannianAdam([x], lr=1e-2) for x in xs]
    # component_inner on the padded point: the fixed-rank values on the active block
    u0 = make_tangent(fixed, x0, 6)
    pu = padded.pad(*fixed.unpack(u0))
    (cu, cm, cv), (fu, fm, fv) = padded.unpack(padded.component_inner(xs[1], pu)), fixed.unpack(fixed.component_inner(x0, u0))
    torch.testing.assert_close(cu[:, :r], fu)
    torch.testing.assert_close(cm[:r, :r], fm)
    torch.testing.assert_close(cv[:, :r], fv)
    # inactive entries carry their row's value (a column that becomes active inherits it)
    assert torch.equal(cu, cu[:, :1].expand(m, cap)) and torch.equal(cv, cv[:, :1].expand(n, cap))
    assert torch.equal(cm, cm[:1, :1].expand(cap, cap))
    for _ in range(15):
        for mf, x, opt in zip((fixed, padded), xs, opts):
            opt.zero_grad()
            u, s, v = mf.unpack(x)
            (0.5 * (u @ s @ v.T - a).pow(2).sum()).backward()
            opt.step()
        assert int(padded.active_rank(xs[1])) == r
        torch.testing.assert_close(padded.to_dense(xs[1]).detach(), fixed.to_dense(xs[0]).detach())
        for t in (xs[1].detach(), opts[1].state[xs[1]]["exp_avg"]):
            up, mm, vp = padded.unpack(t)
            assert not up[:, r:].any() and not vp[:, r:].any() and not mm[r:].any() and not mm[:, r:].any()
        assert padded.check_point_on_manifold(xs[1])


@pytest.mark.parametrize("cls,args", [("LowRankLinear", (12, 9, 3)), ("LowRankConv2d", (3, 5, 3, 2))])
def test_layers_take_the_second_moment_and_save_it(cls, args, tmp_path):
    pytest.importorskip("safetensors")
    from lowrank_manifolds import nn as lnn

    torch.manual_seed(0)
    layer = getattr(lnn, cls)(*args, max_rank=args[-1] + 1, tol=0.1, second_moment="rows")
    assert layer.weight.manifold.second_moment == "rows"
    assert getattr(lnn, cls)(*args).weight.manifold.second_moment == "rows"  # the default
    assert getattr(lnn, cls)(*args, second_moment="scalar").weight.manifold.second_moment == "scalar"
    model = torch.nn.Sequential(layer)
    lnn.save_lowrank(model, tmp_path)
    dense = torch.nn.Linear(args[0], args[1]) if cls == "LowRankLinear" else torch.nn.Conv2d(*args[:3])
    fresh = lnn.load_lowrank(torch.nn.Sequential(dense), tmp_path)
    assert fresh[0].weight.manifold.second_moment == "rows"
    assert torch.equal(fresh[0].weight, layer.weight)
    with pytest.raises(ValueError, match="second_moment"):
        getattr(lnn, cls)(*args, second_moment="entrywise")


def test_second_moment_reaches_every_way_of_building_layers(tmp_path):
    """docs/training.md recommends second_moment="rows" for RiemannianAdam: it is an option of
    convert_to_low_rank, add_adapters and from_dense, survives save/load, and a bad value is
    refused before any layer is touched."""
    import copy

    from lowrank_manifolds.nn import (LowRankConv2d, LowRankLinear, add_adapters, convert_to_low_rank,
                                      load_lowrank, save_lowrank)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 30))
    converted = convert_to_low_rank(copy.deepcopy(model), rank=3, second_moment="rows")
    assert [m.manifold.second_moment for m in converted if isinstance(m, LowRankLinear)] == ["rows", "rows"]
    adapted = add_adapters(copy.deepcopy(model), rank=2, second_moment="rows")
    assert [m.manifold.second_moment for m in adapted if hasattr(m, "delta")] == ["rows", "rows"]
    save_lowrank(adapted, tmp_path / "adapters")
    reloaded = load_lowrank(copy.deepcopy(model), tmp_path / "adapters")
    assert [m.manifold.second_moment for m in reloaded if hasattr(m, "delta")] == ["rows", "rows"]
    conv = LowRankConv2d.from_dense(torch.nn.Conv2d(3, 8, 3), rank=2, second_moment="rows")
    assert conv.manifold.second_moment == "rows"
    untouched = copy.deepcopy(model)
    for build in (convert_to_low_rank, add_adapters):
        with pytest.raises(ValueError, match="second_moment"):
            build(untouched, rank=2, second_moment="entrywise")
        assert all(type(m) in (torch.nn.Linear, torch.nn.ReLU) for m in untouched)
        assert all(p.requires_grad for p in untouched.parameters())
