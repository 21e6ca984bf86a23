"""Facts about the DLRA integrators and the truncation (docs/integrators.md), against dense float64 references.

The references build m x n matrices on purpose (matrix_exp paths, dense projectors,
dense truncated SVDs) and share no code with the integrators.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.integrators import (
    ABCPSI,
    BUG,
    KSL,
    AugmentedBUG,
    CallableField,
    MatrixField,
    NaiveEuler,
    ParallelBUG,
    RetractionStep,
    TangentField,
    Truncation,
    truncation_rank,
)

DT = torch.float64


def dense(U, S, V):
    return U @ S @ V.transpose(-1, -2)


def fixed(r):
    return Truncation(0.0, min_rank=r, max_rank=r)


def all_integrators(r=None):
    trunc = None if r is None else fixed(r)
    return [
        KSL(),
        BUG(),
        AugmentedBUG(trunc),
        ParallelBUG(trunc),
        ABCPSI(trunc),
        RetractionStep("metric"),
        RetractionStep("orthographic"),
        NaiveEuler(),
    ]


def ids(integrators):
    return [type(i).__name__ + ("" if not isinstance(i, RetractionStep) else "-" + i.kind) for i in integrators]


class RankPath:
    """A(t) = exp(t W1) e^t (D + eps E) exp(t W2), W1, W2 skew, D = diag(d) of rank r with
    d log-spaced from 1 to sigma_min, E Gaussian. eps = 0: a rank-r path (exactness
    tests); eps > 0: a field with a normal component (robustness tests).
    exp(t W) = Q diag(exp(-i t l)) Q^H from the eigh of the Hermitian i W, computed once."""

    def __init__(self, m, n, r, sigma_min, eps=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(m, m, generator=g, dtype=DT)
        w2 = torch.randn(n, n, generator=g, dtype=DT)
        self.w1, self.w2 = (w1 - w1.T) / 2, (w2 - w2.T) / 2
        self.e1, self.e2 = torch.linalg.eigh(1j * self.w1), torch.linalg.eigh(1j * self.w2)
        self.d = torch.logspace(0, math.log10(sigma_min), r, dtype=DT)
        self.D = torch.zeros(m, n, dtype=DT)
        self.D[range(r), range(r)] = self.d
        self.D += eps * torch.randn(m, n, generator=g, dtype=DT)
        self.r = r

    @staticmethod
    def _exp(e, t):
        lam, q = e
        return ((q * torch.exp(-1j * t * lam)) @ q.mH).real

    def A(self, t):
        return self._exp(self.e1, t) @ (math.exp(t) * self.D) @ self._exp(self.e2, t)

    def Adot(self, t):
        a = self.A(t)
        return self.w1 @ a + a + a @ self.w2

    def factors(self, t):
        """Factors of the rank-r part exp(t W1) e^t D_r exp(t W2) (= A(t) when eps = 0)."""
        q1, q2 = self._exp(self.e1, t), self._exp(self.e2, t)
        return q1[:, : self.r], torch.diag(math.exp(t) * self.d), q2[: self.r, :].T


def random_point(m, n, r, batch=(), seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=dtype))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=dtype))[0]
    s = torch.sort(1 + torch.rand(*batch, r, generator=g, dtype=dtype), descending=True).values
    return U, torch.diag_embed(s), V


def dense_proj(U, V, Z):
    pu, pv = U @ U.T, V @ V.T
    return pu @ Z + Z @ pv - pu @ Z @ pv


def best_rank(a, r):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def orth_err(Q):
    k = Q.shape[-1]
    return (Q.transpose(-1, -2) @ Q - torch.eye(k, dtype=Q.dtype)).abs().max().item()


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("sigma_min", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize(
    "integrator", [KSL(), BUG(), AugmentedBUG(), ABCPSI(), AugmentedBUG(Truncation(1e-12)), ABCPSI(fixed(4))]
)
def test_exact_on_rank_r_path(integrator, sigma_min):
    # Y' = A'(t) with exact substeps: for a field independent of Y the substep flows see
    # only A(t1) - A(t0), i.e. the constant field (A(t1) - A(t0)) / h, integrated exactly by Euler.
    path = RankPath(30, 20, 4, sigma_min)
    t0, h = 0.3, 0.1
    U, S, V = path.factors(t0)
    field = MatrixField((path.A(t0 + h) - path.A(t0)) / h)
    U1, S1, V1 = integrator.step(U, S, V, field, h, t0)
    assert (dense(U1, S1, V1) - path.A(t0 + h)).norm() < 1e-12
    assert orth_err(U1) < 1e-13 and orth_err(V1) < 1e-13


def test_exact_over_many_steps_with_tiny_singular_values():
    path = RankPath(25, 15, 5, 1e-8, seed=3)
    for integrator in (KSL(), BUG(), AugmentedBUG(fixed(5)), ABCPSI(fixed(5))):
        U, S, V = path.factors(0.0)
        h = 0.05
        for k in range(20):
            field = MatrixField((path.A((k + 1) * h) - path.A(k * h)) / h)
            U, S, V = integrator.step(U, S, V, field, h, k * h)
        assert (dense(U, S, V) - path.A(20 * h)).norm() < 1e-11, integrator


def test_parallel_bug_local_error_is_second_order_and_robust():
    def local_err(sigma_min, h):
        path = RankPath(30, 20, 4, sigma_min, seed=1)
        U, S, V = path.factors(0.2)
        field = MatrixField((path.A(0.2 + h) - path.A(0.2)) / h)
        return (dense(*ParallelBUG().augmented_step(U, S, V, field, h, 0.2)) - path.A(0.2 + h)).norm().item()

    hs = [0.04, 0.02, 0.01, 0.005]
    errs = [local_err(1e-6, h) for h in hs]
    slope = (math.log(errs[0]) - math.log(errs[-1])) / (math.log(hs[0]) - math.log(hs[-1]))
    assert 1.85 < slope < 2.15
    assert errs[-1] > 1e-10  # not exact
    # insensitive to small singular values
    e2, e8 = local_err(1e-2, 0.01), local_err(1e-8, 0.01)
    assert e8 < 2 * e2


# ----------------------------------------------------------------- identities
@pytest.mark.parametrize("lowrank", [False, True])
def test_abc_psi_identities_constant_gradient(lowrank):
    m, n, r, h = 30, 20, 4, 0.3
    U, S, V = random_point(m, n, r, seed=2)
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(m, 3, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)
    G = A @ B.T
    field = MatrixField((-A, B) if lowrank else -G, snapshot=True)  # one evaluation at Y0 is enough
    Uh, Sh, Vh = ABCPSI().augmented_step(U, S, V, field, h)
    Y0 = dense(U, S, V)
    # before truncation Y1 = Y0 - h Uh Uh^T G
    assert (dense(Uh, Sh, Vh) - (Y0 - h * Uh @ (Uh.T @ G))).norm() < 1e-12
    # U0 lies in span(Uh): this is what makes Uh S~ V0^T = Y0
    assert (U - Uh @ (Uh.T @ U)).norm() < 1e-13
    # descent guarantee ||Uh Uh^T G|| >= ||P_X G||
    assert (Uh @ (Uh.T @ G)).norm() >= dense_proj(U, V, G).norm() - 1e-12
    # with h = 0 the backward-corrected S~ reproduces Y0 exactly: Uh S~ V0^T = Y0
    assert (dense(*ABCPSI().augmented_step(U, S, V, field, 0.0)) - Y0).norm() < 1e-13


@pytest.mark.parametrize("integrator", [AugmentedBUG(), ABCPSI(), ParallelBUG()], ids=lambda i: type(i).__name__)
def test_constant_tangent_field_gives_x_plus_xi_and_metric_retraction(integrator):
    m, n, r, h = 25, 18, 3, 0.7
    M = FixedRankManifold(m, n, r)
    torch.manual_seed(0)
    x = M.random(dtype=DT)
    xi = M.random_tangent(x)
    U, S, V = M.unpack(x)
    field = TangentField.from_packed(M, x, xi)
    X, Xi = M.to_dense(x), M.tangent_to_dense(x, xi)
    assert (dense(*integrator.augmented_step(U, S, V, field, h)) - (X + h * Xi)).norm() < 1e-12
    integrator.truncation = fixed(r)
    Y1 = dense(*integrator.step(U, S, V, field, h))
    assert (Y1 - best_rank(X + h * Xi, r)).norm() < 1e-11
    assert (Y1 - M.to_dense(M.retr(x, h * xi))).norm() < 1e-11


def test_parallel_bug_constant_gradient_is_projected_step():
    m, n, r, h = 30, 20, 4, 0.2
    U, S, V = random_point(m, n, r, seed=4)
    G = torch.randn(m, n, dtype=DT, generator=torch.Generator().manual_seed(1))
    Y0 = dense(U, S, V)
    aug = ParallelBUG().augmented_step(U, S, V, -G, h)
    assert (dense(*aug) - (Y0 - h * dense_proj(U, V, G))).norm() < 1e-12
    trunc = dense(*ParallelBUG(fixed(r)).step(U, S, V, -G, h))
    retr = dense(*RetractionStep("metric").step(U, S, V, -G, h))
    assert (trunc - retr).norm() < 1e-11
    assert (trunc - best_rank(Y0 - h * dense_proj(U, V, G), r)).norm() < 1e-11


def test_dense_and_lowrank_fields_agree():
    m, n, r = 22, 17, 3
    U, S, V = random_point(m, n, r, seed=6)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(m, 5, generator=g, dtype=DT), torch.randn(n, 5, generator=g, dtype=DT)
    for integrator in all_integrators(r):
        yd = dense(*integrator.step(U, S, V, A @ B.T, 0.1))
        yl = dense(*integrator.step(U, S, V, (A, B), 0.1))
        assert (yd - yl).norm() < 1e-12, integrator


def test_callable_field_is_reevaluated_at_the_substep_points():
    m, n, r = 12, 10, 2
    U, S, V = random_point(m, n, r, seed=7)
    C = torch.randn(m, n, dtype=DT, generator=torch.Generator().manual_seed(3))
    seen = []

    def fn(u, s, v, t):  # F(Y) = C - Y, linear: the substep points matter
        seen.append((dense(u, s, v), t))
        return C - dense(u, s, v)

    field = CallableField(fn, with_time=True)
    for integrator, count in ((KSL(), 3), (BUG(), 2), (AugmentedBUG(), 2), (ParallelBUG(), 1), (ABCPSI(), 1)):
        seen.clear()
        integrator.step(U, S, V, field, 0.1, 0.5)
        assert len(seen) == count and all(t == 0.5 for _, t in seen), integrator
        assert (seen[0][0] - dense(U, S, V)).norm() < 1e-14


# ------------------------------------------------------------------ truncation
@settings(max_examples=30)
@given(
    k=st.integers(1, 10),
    tol=st.floats(0, 1),
    relative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_truncation_rank_matches_brute_force_and_error_is_the_tail(k, tol, relative, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.sort(torch.rand(k, generator=g, dtype=DT) ** 4, descending=True).values
    theta = tol * s.norm().item() if relative else tol
    expected = next(rho for rho in range(k + 1) if s[rho:].norm().item() <= theta)
    expected = max(expected, 1)
    assert int(truncation_rank(s, tol, relative=relative)) == expected
    # the Frobenius error of the truncated factors equals the discarded tail
    U = torch.linalg.qr(torch.randn(15, k, generator=g, dtype=DT))[0]
    V = torch.linalg.qr(torch.randn(12, k, generator=g, dtype=DT))[0]
    P = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=DT))[0]
    Q = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=DT))[0]
    core = P @ torch.diag(s) @ Q.T
    U1, S1, V1 = Truncation(tol, relative=relative)(U, core, V)
    assert U1.shape[-1] == expected
    err = (dense(U, core, V) - dense(U1, S1, V1)).norm().item()
    assert abs(err - s[expected:].norm().item()) < 1e-12
    assert err <= theta + 1e-12


def test_truncation_clipping_padding_and_batches():
    s = torch.tensor([[4.0, 2.0, 1e-3, 1e-9], [4.0, 3.0, 2.0, 1.0]], dtype=DT)
    assert truncation_rank(s, 1e-2).tolist() == [2, 4]
    assert truncation_rank(s, 1e-2, max_rank=3).tolist() == [2, 3]
    assert truncation_rank(s, 10.0, relative=False, min_rank=2).tolist() == [2, 2]
    assert truncation_rank(s, 1e-4, relative=False).tolist() == [3, 4]
    U, _ = torch.linalg.qr(torch.randn(2, 9, 4, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(2, 7, 4, dtype=DT))
    core = torch.diag_embed(s)
    trimmed = Truncation(1e-2)(U, core, V)
    padded = Truncation(1e-2, max_rank=6, pad=True)(U, core, V)
    assert trimmed[0].shape == (2, 9, 4) and padded[0].shape == (2, 9, 6) and padded[1].shape == (2, 6, 6)
    # columns beyond each element's rank are exactly zero
    assert (trimmed[0][0, :, 2:] == 0).all() and (padded[0][0, :, 2:] == 0).all() and (padded[2][1, :, 4:] == 0).all()
    assert (dense(*trimmed) - dense(*padded)).norm() < 1e-13
    ref = dense(U, torch.diag_embed(s * torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])), V)
    assert (dense(*trimmed) - ref).norm() < 1e-13


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("r", [2, 4, 6])
def test_fixed_rank_truncation_is_the_best_rank_r_approximation(r, pad):
    # min_rank == max_rank takes a path without rank computation or masks: it must still
    # return the Eckart-Young truncation, with zero columns where the core (k = 4) is narrower
    g = torch.Generator().manual_seed(r)
    k = 4
    U, _ = torch.linalg.qr(torch.randn(3, 9, k, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(3, 7, k, generator=g, dtype=DT))
    core = torch.randn(3, k, k, generator=g, dtype=DT)
    U1, S1, V1 = Truncation(0.0, min_rank=r, max_rank=r, pad=pad)(U, core, V)
    width = r if pad else min(r, k)
    assert U1.shape == (3, 9, width) and S1.shape == (3, width, width) and V1.shape == (3, 7, width)
    assert (U1[..., k:] == 0).all() and (V1[..., k:] == 0).all() and (S1[..., k:, :] == 0).all()
    p, s, qh = torch.linalg.svd(dense(U, core, V))
    keep = min(r, k)
    best = p[..., :keep] @ torch.diag_embed(s[..., :keep]) @ qh[..., :keep, :]
    assert (dense(U1, S1, V1) - best).norm() < 1e-12


# -------------------------------------------------------------- robustness
def test_robust_integrators_do_not_degrade_as_sigma_min_goes_to_zero():
    r, h, steps = 4, 0.02, 10

    def error(integrator, sigma_min):
        # A'(t) evaluated at the substep start (not exact) with a normal component of size eps
        path = RankPath(20, 16, r, sigma_min, eps=1e-3, seed=8)
        field = CallableField(lambda u, s, v, t: path.Adot(t), with_time=True)
        U, S, V = path.factors(0.0)
        for k in range(steps):
            U, S, V = integrator.step(U, S, V, field, h, k * h)
        return (dense(U, S, V) - path.A(steps * h)).norm().item()

    for integrator in all_integrators(r)[:-1]:
        e_big, e_small = error(integrator, 1e-2), error(integrator, 1e-8)
        assert e_small < 1.5 * e_big + 1e-12, (integrator, e_big, e_small)
    e_big, e_small = error(NaiveEuler(), 1e-2), error(NaiveEuler(), 1e-6)
    assert e_small > 50 * e_big


# ------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    U, S, V = random_point(10, 8, 2)
    G = torch.randn(10, 8, dtype=DT)
    ksl = KSL()
    with pytest.raises(ValueError, match="trailing shape"):
        ksl.step(U, S, V, torch.randn(8, 10, dtype=DT), 0.1)
    with pytest.raises(ValueError, match="S must have"):
        ksl.step(U, S[:1], V, G, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        ksl.step(U, S.float(), V, G, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        ksl.step(U, S, V, G.float(), 0.1)
    with pytest.raises(ValueError, match="meta"):
        ksl.step(U, S, V.to("meta"), G, 0.1)
    with pytest.raises(ValueError, match="meta"):
        ksl.step(U, S, V, G.to("meta"), 0.1)
    for h in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            ksl.step(U, S, V, G, h)
    with pytest.raises(TypeError, match="real Python number"):
        ksl.step(U, S, V, G, torch.tensor(0.1))
    with pytest.raises(TypeError, match="field must be"):
        ksl.step(U, S, V, "gradient", 0.1)
    with pytest.raises(ValueError, match="snapshot"):
        BUG().step(U, S, V, MatrixField(G, snapshot=True), 0.1)
    with pytest.raises(ValueError, match="factor B"):
        ABCPSI().step(U, S, V, (torch.randn(10, 3, dtype=DT), torch.randn(9, 3, dtype=DT)), 0.1)
    with pytest.raises(ValueError, match="trailing shape"):
        ABCPSI().step(U, S, V, lambda u, s, v: torch.randn(10, 10, dtype=DT), 0.1)
    with pytest.raises(ValueError, match="batch axes"):
        ksl.step(U.expand(3, -1, -1), S.expand(2, -1, -1), V, G, 0.1)
    with pytest.raises(ValueError, match="square S"):
        NaiveEuler().step(U, torch.randn(2, 3, dtype=DT), torch.linalg.qr(torch.randn(8, 3, dtype=DT))[0], G, 0.1)
    with pytest.raises(TypeError, match="Truncation"):
        ABCPSI(truncation=1e-3)
    with pytest.raises(ValueError, match="max_rank"):
        Truncation(1e-3, pad=True)
    with pytest.raises(ValueError, match="tol"):
        Truncation(-1.0)
    with pytest.raises(ValueError, match="min_rank"):
        truncation_rank(torch.ones(3), 0.1, min_rank=0)


# -------------------------------------------------------- devices, batches
@pytest.mark.parametrize(
    "integrator",
    [KSL(), BUG(), AugmentedBUG(Truncation(1e-3, max_rank=5, pad=True)), ParallelBUG(Truncation(1e-3, max_rank=5, pad=True)),
     ABCPSI(Truncation(1e-3, max_rank=5, pad=True)), RetractionStep("metric"), RetractionStep("orthographic"), NaiveEuler()],
    ids=lambda i: repr(i)[:20],
)
@pytest.mark.parametrize("lowrank", [False, True])
def test_fixed_shape_paths_run_on_meta(integrator, lowrank):
    # .item(), .cpu() or a hidden CPU tensor would fail on the meta device.
    U = torch.empty(3, 12, 3, device="meta", dtype=DT)
    S = torch.empty(3, 3, 3, device="meta", dtype=DT)
    V = torch.empty(3, 9, 3, device="meta", dtype=DT)
    F = (torch.empty(12, 4, device="meta", dtype=DT), torch.empty(9, 4, device="meta", dtype=DT)) if lowrank \
        else torch.empty(12, 9, device="meta", dtype=DT)
    U1, S1, V1 = integrator.step(U, S, V, CallableField(lambda u, s, v: F), 0.1)
    r1 = 5 if integrator.rank_adaptive else 3
    assert U1.shape == (3, 12, r1) and S1.shape == (3, r1, r1) and V1.shape == (3, 9, r1)
    assert U1.device.type == "meta"


@pytest.mark.parametrize("integrator", all_integrators(3) + [ABCPSI(Truncation(0.2))], ids=lambda i: repr(i)[:24])
def test_batched_equals_loop(integrator, device):
    U, S, V = (t.to(device) for t in random_point(14, 11, 3, batch=(2, 2), seed=9))
    G = torch.randn(2, 1, 14, 11, dtype=DT, generator=torch.Generator().manual_seed(4)).to(device)
    batched = dense(*integrator.step(U, S, V, -G, 0.3))
    for i in range(2):
        for j in range(2):
            single = dense(*integrator.step(U[i, j], S[i, j], V[i, j], -G[i, 0], 0.3))
            assert (batched[i, j] - single).norm() < 1e-12


@settings(max_examples=15)
@given(
    m=st.integers(2, 12), n=st.integers(2, 12), r=st.integers(1, 6), seed=st.integers(0, 2**16), f32=st.booleans()
)
def test_shapes_orthonormality_and_tangent_identity(m, n, r, seed, f32):
    r = min(r, m, n)
    dtype = torch.float32 if f32 else DT
    tol = 1e-4 if f32 else 1e-11
    U, S, V = random_point(m, n, r, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    Up = torch.randn(m, r, generator=g, dtype=dtype)
    Vp = torch.randn(n, r, generator=g, dtype=dtype)
    Mm = torch.randn(r, r, generator=g, dtype=dtype)
    field = TangentField(U, V, Up, Mm, Vp)
    target = dense(U, S, V) + 0.1 * (U @ Mm @ V.T + Up @ V.T + U @ Vp.T)
    for integrator in all_integrators():
        U1, S1, V1 = integrator.step(U, S, V, field, 0.1)
        assert U1.shape[:-1] == (m,) and V1.shape[:-1] == (n,) and S1.shape == (U1.shape[-1], V1.shape[-1])
        assert orth_err(U1) < tol and orth_err(V1) < tol
        if integrator.rank_adaptive:  # augmented result is X + h xi, any shapes (k = min(m, 2r) etc.)
            assert (dense(U1, S1, V1) - target).norm() < tol * (1 + target.norm())


# ------------------------------------------------------------------------ lab
def test_lab_studies_measure_order_exactness_robustness_and_rank():
    from lowrank_manifolds import lab

    integ = {"KSL": KSL(), "abc-PSI": ABCPSI(fixed(3)), "naive Euler": NaiveEuler()}
    order = lab.order_study(integ, lab.MatrixODE(14, 12, 3), hs=(0.05, 0.025, 0.0125))
    assert all(0.8 < order[name]["order"] < 1.3 for name in integ)
    exact = lab.exactness_study(integ, size=(14, 12, 3))
    assert exact["KSL"] < 1e-12 and exact["abc-PSI"] < 1e-12 and exact["naive Euler"] > 1e-6
    rob = lab.robustness_study(integ, sigmas=(1e-2, 1e-7), size=(14, 12, 3))
    assert rob["naive Euler"]["errors"][1] > 10 * rob["naive Euler"]["errors"][0]
    assert rob["KSL"]["errors"][1] < 1.5 * rob["KSL"]["errors"][0]
    ranks = lab.rank_study(integ, tols=(1e-1, 1e-3), steps=20, problem=lab.LeastSquares(14, 12, p=5, b=50))
    assert list(ranks) == ["abc-PSI"] and ranks["abc-PSI"][0]["rank"] < ranks["abc-PSI"][1]["rank"]
    assert integ["abc-PSI"].truncation.max_rank == 3  # restored after the study


def test_truncation_rank_refuses_what_is_not_a_descending_spectrum():
    for bad in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([float("nan"), 1.0]), torch.tensor([2.0, -1.0]),
                torch.tensor([float("inf"), 1.0])):
        with pytest.raises(ValueError, match="descending"):
            truncation_rank(bad, 0.1)
    with pytest.raises(TypeError, match="floating"):
        truncation_rank(torch.tensor([2, 1]), 0.1)
    with pytest.raises(TypeError, match="relative"):
        truncation_rank(torch.tensor([2.0, 1.0]), 0.1, relative="no")
    with pytest.raises(TypeError, match="relative"):
        Truncation(0.1, relative="no")  # was True through bool()
    with pytest.raises(TypeError, match="pad"):
        Truncation(0.1, max_rank=2, pad=1)
    assert int(truncation_rank(torch.tensor([3.0, 0.0, 0.0]), 0.0)) == 1  # zeros are a spectrum
