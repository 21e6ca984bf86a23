"""The sampled least-squares loss of lowrank_manifolds.completion against dense float64
formulas: value and gradient over random patterns (empty rows and columns, duplicate entries,
weights), no m x n tensor in a step, and a completion solved by the package's optimizers."""
import geoopt
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.completion import Observations, sampled_loss
from lowrank_manifolds.optim import GeometricSGD
from test_memory import LargestTensor

F64 = torch.float64


def dense_loss(x, mf, rows, cols, values, weights=None):
    """The definition, on the dense matrix: 0.5 sum_k w_k (X_ij - a_k)^2 / N."""
    w = torch.ones_like(values) if weights is None else weights
    return 0.5 * (w * (mf.to_dense(x)[rows, cols] - values) ** 2).sum() / values.numel()


@st.composite
def problems(draw):
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    r = draw(st.integers(1, min(m, n)))
    cap = draw(st.integers(r, min(m, n)))
    k = draw(st.integers(1, 3 * m * n))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    # a sub-grid of the rows and columns: some of them observed nowhere; repeats likely
    rows = torch.randint(0, max(1, m - draw(st.integers(0, m - 1))), (k,), generator=g)
    cols = torch.randint(0, max(1, n - draw(st.integers(0, n - 1))), (k,), generator=g)
    values = torch.randn(k, generator=g, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) if draw(st.booleans()) else None
    mf = FixedRankManifold(m, n, r, max_rank=cap) if cap > r else FixedRankManifold(m, n, r)
    torch.manual_seed(seed)
    return mf, mf.random(dtype=F64), rows, cols, values, weights


@settings(max_examples=80, deadline=None)
@given(problems())
def test_value_and_gradient_are_the_dense_formulas(case):
    mf, x0, rows, cols, values, weights = case
    x = x0.clone().requires_grad_(True)
    loss = sampled_loss(x, mf, rows, cols, values, weights)
    loss.backward()
    ref_x = x0.clone().requires_grad_(True)
    ref = dense_loss(ref_x, mf, rows, cols, values, weights)
    ref.backward()
    loss, ref = float(loss.detach()), float(ref.detach())
    assert abs(loss - ref) <= 1e-12 * max(1.0, ref)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)


def test_float32_and_reuse_of_the_pattern():
    torch.manual_seed(0)
    mf = FixedRankManifold(30, 20, 3)
    rows, cols = torch.randint(0, 30, (200,)), torch.randint(0, 20, (200,))
    values = torch.randn(200)
    obs = Observations(rows, cols, values, (30, 20))
    x = mf.random().requires_grad_(True)
    loss = obs.loss(x, mf)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    dense_loss(x64, mf, rows, cols, values.double()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(obs.loss(x, mf), loss.detach())  # the same pattern, again


def test_bad_observations_are_refused():
    mf = FixedRankManifold(4, 3, 1)
    x = mf.random()
    i = torch.tensor([0, 1])
    for args, exc in (((i, i, torch.ones(3)), ValueError), ((i.float(), i, torch.ones(2)), TypeError),
                      ((i, torch.tensor([0, 3]), torch.ones(2)), ValueError),
                      ((i, i, torch.tensor([1.0, float("nan")])), ValueError),
                      ((i[:0], i[:0], torch.ones(0)), ValueError)):
        with pytest.raises(exc):
            sampled_loss(x, mf, *args)
    with pytest.raises(ValueError, match="4 x 3"):
        Observations(i, i, torch.ones(2), (4, 3)).loss(FixedRankManifold(5, 3, 1).random(), FixedRankManifold(5, 3, 1))


def test_a_step_forms_no_dense_matrix():
    """Loss, backward and a Riemannian step on a 3000 x 2000 completion: the largest tensor is
    O(N + (m + n) r), far below m n = 6e6."""
    torch.manual_seed(0)
    m, n, r, k = 3000, 2000, 5, 20000
    mf = FixedRankManifold(m, n, r)
    obs = Observations(torch.randint(0, m, (k,)), torch.randint(0, n, (k,)), torch.randn(k), (m, n))
    x = geoopt.ManifoldParameter(mf.random(), manifold=mf)
    opt = geoopt.optim.RiemannianSGD([x], lr=1.0)
    with LargestTensor() as rec:
        obs.loss(x, mf).backward()
        opt.step()
    assert rec.largest <= 4 * k + 2 * (m + n) * r, rec.largest


def test_a_planted_completion_is_solved():
    """60 x 50, rank 3, 40 % observed: Riemannian gradient descent through the sampled loss
    reaches the planted matrix on the held-out entries (exact data). The loss is a mean over the
    N observations of 40 % of the entries, so lr = N / 0.4 would be a full step on them; lr = 2N.
    Measured: 5e-11 at 200 iterations (seed 0), 2.5e-14 (seed 1); the test asks 1e-8 at 250."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 60, 50, 3
    a = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    seen = torch.rand(m, n, generator=g) < 0.4
    rows, cols = seen.nonzero(as_tuple=True)
    test_rows, test_cols = (~seen).nonzero(as_tuple=True)
    obs = Observations(rows, cols, a[rows, cols], (m, n))
    test = Observations(test_rows, test_cols, a[test_rows, test_cols], (m, n))
    mf = FixedRankManifold(m, n, r)
    torch.manual_seed(1)
    x = geoopt.ManifoldParameter(mf.random(dtype=F64), manifold=mf)
    opt = GeometricSGD([x], lr=2.0 * rows.numel(), momentum=0.0)
    for _ in range(250):
        opt.zero_grad()
        obs.loss(x, mf).backward()
        opt.step()
    with torch.no_grad():  # the held-out loss is 0.5 ||P_test(X - A)||^2 / N_test
        err = (2 * test.loss(x, mf) * test.count).sqrt() / a[test_rows, test_cols].norm()
        dense = (mf.to_dense(x)[test_rows, test_cols] - a[test_rows, test_cols]).norm() / a[test_rows, test_cols].norm()
    assert err < 1e-8 and abs(float(err - dense)) < 1e-12, (float(err), float(dense))


@pytest.mark.cuda
def test_cuda_agrees_with_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    mf = FixedRankManifold(40, 30, 3)
    rows, cols, values = torch.randint(0, 40, (300,)), torch.randint(0, 30, (300,)), torch.randn(300, dtype=F64)
    obs = Observations(rows, cols, values, (40, 30))
    x = mf.random(dtype=F64).requires_grad_(True)
    obs.loss(x, mf).backward()
    xc = x.detach().cuda().requires_grad_(True)
    obs.loss(xc, mf).backward()
    torch.testing.assert_close(xc.grad.cpu(), x.grad)
