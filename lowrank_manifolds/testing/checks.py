"""Checks that users can run on their own retraction or integrator, in one call.

Each check measures a property against an independent dense float64 reference and
returns a :class:`CheckReport` (a list of :class:`CheckResult`) that prints as a table;
``report.raise_if_failed()`` turns it into an assertion for a test suite::

    from lowrank_manifolds.testing import check_integrator
    check_integrator(MyIntegrator(), exact=True).raise_if_failed()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .._linalg import mT
from ..integrators import Integrator, TangentField
from ..lab import MatrixODE, RankPath, integrate, observed_order
from ..manifold import FixedRankManifold
from .strategies import make_point, make_tangent

__all__ = ["CheckResult", "CheckReport", "check_retraction", "check_integrator"]

F64 = torch.float64


@dataclass
class CheckResult:
    """One measured property: ``measured`` must satisfy ``requirement``."""

    name: str
    measured: float
    requirement: str
    passed: bool


class CheckReport(List[CheckResult]):
    """The results of one check function; true when every property passed."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self)

    def __str__(self) -> str:
        rows = [f"| {r.name} | {r.measured:.3g} | {r.requirement} | {'ok' if r.passed else 'FAILED'} |" for r in self]
        return "\n".join(["| property | measured | requirement | |", "|---|---|---|---|", *rows])

    def raise_if_failed(self) -> "CheckReport":
        if not self.passed:
            raise AssertionError("property check failed:\n" + str(self))
        return self

    def _add(self, name: str, measured: float, requirement: str, ok: bool) -> None:
        self.append(CheckResult(name, float(measured), requirement, bool(ok) and not math.isnan(measured)))


def _orth_error(a: Tensor) -> float:
    """Distance of ``a^T a`` from the identity on its non-zero (active) columns."""
    gram = mT(a) @ a
    active = torch.diagonal(gram, dim1=-2, dim2=-1) > 0.5
    return float((gram - torch.diag_embed(active.to(a.dtype))).abs().max())


def check_retraction(manifold: FixedRankManifold, *, seed: int = 0) -> CheckReport:
    """Retraction axioms of ``manifold.retr`` (its own or an integrator given as
    ``retraction=``), in float64, on points with random, graded (down to 1e-12) and
    repeated singular values:

    - ``R(x, 0) = x``; the output is a point of the manifold (orthonormal bases, zero
      padding, invertible active S) and finite;
    - first order: ``||R(x, t xi) - (X + t xi)|| = O(t^2)`` (slope >= 1.8 between
      ``t = 1e-2`` and ``1e-3``).
    """
    report = CheckReport()
    worst_zero, worst_point, slopes = 0.0, 0.0, []
    fixed = FixedRankManifold(manifold.m, manifold.n, manifold.rank)
    # The O(t^2) constant grows like 1/sigma_min (the curvature), so the order is
    # measured on moderately conditioned points; ill-conditioned ones are checked for
    # landing on the manifold.
    for k, spectrum in enumerate(("random", "graded", "repeated")):
        x = make_point(fixed, seed + k, spectrum=spectrum, smallest=1e-2)
        x = manifold.pad(*fixed.unpack(x))
        xi = make_tangent(manifold, x, seed + 10 + k)
        xi = xi / manifold.norm(x, xi)
        scale = float(manifold.to_dense(x).norm())
        worst_zero = max(worst_zero, float((manifold.to_dense(manifold.retr(x, torch.zeros_like(x))) - manifold.to_dense(x)).norm()) / scale)
        ts, errs = (1e-2, 1e-3), []
        for t in ts:
            y = manifold.retr(x, t * xi)
            ok, _ = manifold.check_point_on_manifold(y, explain=True, atol=1e-10, rtol=1e-10)
            worst_point = max(worst_point, 0.0 if ok and torch.isfinite(y).all() else 1.0)
            errs.append(float((manifold.to_dense(y) - manifold.to_dense(x) - t * manifold.tangent_to_dense(x, xi)).norm()))
        slopes.append(math.inf if max(errs) <= 1e-13 * scale else observed_order(ts, errs))
    for k, spectrum in enumerate(("graded", "tiny")):
        x = make_point(fixed, seed + 5 + k, spectrum=spectrum, smallest=1e-12)
        x = manifold.pad(*fixed.unpack(x))  # padded to the capacity, if any
        y = manifold.retr(x, make_tangent(manifold, x, seed + 20 + k))
        ok, _ = manifold.check_point_on_manifold(y, explain=True, atol=1e-10, rtol=1e-10)
        worst_point = max(worst_point, 0.0 if ok and torch.isfinite(y).all() else 1.0)
    report._add("R(x, 0) = x (relative error)", worst_zero, "<= 1e-12", worst_zero <= 1e-12)
    report._add("output is a point of the manifold (1 = no)", worst_point, "== 0", worst_point == 0)
    report._add("first order: slope of ||R(x, t xi) - x - t xi||", min(slopes), ">= 1.8", min(slopes) >= 1.8)
    return report


def check_integrator(
    integrator: Integrator,
    *,
    m: int = 20,
    n: int = 15,
    rank: int = 3,
    exact: Optional[bool] = None,
    seed: int = 0,
) -> CheckReport:
    """Properties of an integrator with the ``step(U, S, V, field, h, t)`` protocol.

    - orthonormal bases and finite output, for points with singular values down to
      1e-12 and a dense field;
    - a zero step keeps the matrix;
    - along a constant tangent field the step agrees with ``X + h xi`` to ``O(h^2)``
      (consistency: it is a first-order retraction);
    - observed order >= 0.9 on the matrix ODE ``Y' = L1 Y + Y L2`` (the lab's);
    - on the rank-``rank`` path ``A(t) = exp(t W1) e^t D exp(t W2)`` with
      ``sigma_min = 1e-8``, fed the constant fields ``(A(t1) - A(t0)) / h``, the error
      after 10 steps is reported; with ``exact=True`` it must be below ``1e-10``
      (KSL, BUG, augmented BUG and abc-PSI are exact; parallel BUG is not);
    - for a rank-adaptive integrator with a truncation policy: the truncation error
      equals the discarded tail of singular values.
    """
    report = CheckReport()
    mf = FixedRankManifold(m, n, rank)
    worst_orth, finite = 0.0, True
    for k, spectrum in enumerate(("random", "graded", "tiny")):
        u, s, v = mf.unpack(make_point(mf, seed + k, spectrum=spectrum))
        z = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 20 + k), dtype=F64)
        u1, s1, v1 = integrator.step(u, s, v, z, 0.1)
        finite = finite and bool(torch.isfinite(u1).all() and torch.isfinite(s1).all() and torch.isfinite(v1).all())
        worst_orth = max(worst_orth, _orth_error(u1), _orth_error(v1))
    report._add("orthonormal bases, sigma down to 1e-12", worst_orth, "<= 1e-10", worst_orth <= 1e-10 and finite)

    x = make_point(mf, seed + 3)
    u, s, v = mf.unpack(x)
    xi = make_tangent(mf, x, seed + 4)
    xi = xi / mf.norm(x, xi)
    field = TangentField.from_packed(mf, x, xi)
    x_dense = mf.to_dense(x)
    zero = integrator.step(u, s, v, field, 0.0)
    err0 = float((zero[0] @ zero[1] @ mT(zero[2]) - x_dense).norm() / x_dense.norm())
    report._add("zero step keeps the matrix (relative error)", err0, "<= 1e-12", err0 <= 1e-12)
    hs, errs = (1e-2, 1e-3), []
    for h in hs:
        u1, s1, v1 = integrator.step(u, s, v, field, h)
        errs.append(float((u1 @ s1 @ mT(v1) - x_dense - h * mf.tangent_to_dense(x, xi)).norm()))
    # a rank-adaptive step may keep X + h xi exactly (rank <= 2r): a zero defect passes
    slope = math.inf if max(errs) <= 1e-13 * float(x_dense.norm()) else observed_order(hs, errs)
    report._add("consistent with X + h xi: slope of the defect", slope, ">= 1.8", slope >= 1.8)

    ode = MatrixODE(m, n, rank, seed=seed)
    order_hs = (0.1, 0.05, 0.025)
    order_errs = [float((lambda f: (f[0] @ f[1] @ mT(f[2]) - ode.reference(1.0)).norm())(
        integrate(integrator, ode.initial(), ode.field(), h, round(1.0 / h)))) for h in order_hs]
    order = observed_order(order_hs, order_errs)
    report._add("observed order on Y' = L1 Y + Y L2", order, ">= 0.9", order >= 0.9)

    path = RankPath(m, n, rank, sigma_min=1e-8, seed=seed)
    h, factors = 0.1, path.initial(0.0)
    for k in range(10):
        t0 = k * h
        factors = integrator.step(*factors, (path.A(t0 + h) - path.A(t0)) / h, h, t0)
    err_path = float((factors[0] @ factors[1] @ mT(factors[2]) - path.A(1.0)).norm() / path.A(1.0).norm())
    if exact is None:
        report._add("rank-r path, sigma_min 1e-8: relative error (reported)", err_path, "none", True)
    else:
        req = "<= 1e-10" if exact else "reported"
        report._add("rank-r path, sigma_min 1e-8: relative error", err_path, req, err_path <= 1e-10 or not exact)

    truncation = getattr(integrator, "truncation", None)
    if getattr(integrator, "rank_adaptive", False) and truncation is not None:
        z = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 30), dtype=F64)
        au, as_, av = integrator.augmented_step(u, s, v, z, 0.1)
        tu, ts_, tv = truncation(au, as_, av)
        sv = torch.linalg.svdvals(as_)
        kept = int((torch.diagonal(ts_, dim1=-2, dim2=-1) != 0).sum())
        gap = abs(float((au @ as_ @ mT(av) - tu @ ts_ @ mT(tv)).norm()) - float(sv[kept:].norm()))
        report._add("truncation error = discarded tail (difference)", gap, "<= 1e-10", gap <= 1e-10)
    return report
