r"""Baselines for the robust integrators: a projected Euler step through a retraction, and the
non-robust explicit Euler of the factor ODEs."""
from __future__ import annotations

import functools

import torch

from .._linalg import cat_rows, mT
from ..manifold import FixedRankManifold
from .base import Integrator
from .fields import ambient_left, ambient_right

__all__ = ["RetractionStep", "NaiveEuler"]


class RetractionStep(Integrator):
    r"""Projected Euler step through a retraction of :class:`FixedRankManifold`:
    :math:`Y_1 = R_{Y_0}(h P_{Y_0} F(Y_0))`.

    ``kind="metric"``: the metric projection (truncated SVD of :math:`Y_0 + h P F`;
    Kieri and Vandereycken 2019 show this projected Euler method is robust to small
    singular values). ``kind="orthographic"``: the orthographic retraction (Absil and
    Oseledets 2015), which needs :math:`S_0 + h M` invertible. Both second-order
    retractions; the step is first order. Fixed rank; needs a square ``S``. The maths is
    the manifold's (:meth:`FixedRankManifold.proj_dense`, ``proj_lowrank``, ``retr``).
    """

    needs_reevaluation = False

    def __init__(self, kind: str = "metric"):
        if kind not in ("metric", "orthographic"):
            raise ValueError(f"kind must be 'metric' or 'orthographic', got {kind!r}")
        self.kind = kind
        self.name = f"{kind} retraction"

    def __repr__(self) -> str:
        return f"RetractionStep(kind={self.kind!r})"

    def _step(self, U, S, V, field, h, t):
        manifold = _square_core_manifold(U, S, V, self.name, retraction=self.kind)
        z = self._evaluate(field, U, S, V, t)
        x = cat_rows(U, S, V)
        xi = manifold.proj_lowrank(x, *z) if isinstance(z, tuple) else manifold.proj_dense(x, z)
        return manifold.unpack(manifold.retr(x, h * xi))


class NaiveEuler(Integrator):
    r"""Explicit Euler on the factor ODEs of Koch and Lubich (2007): the non-robust baseline.

    O. Koch, C. Lubich, "Dynamical low-rank approximation", SIAM J. Matrix Anal. Appl.
    29 (2007) 434-454:

    .. math:: \dot S = U^\top F V,\quad \dot U = (I - UU^\top) F V S^{-1},\quad
              \dot V = (I - VV^\top) F^\top U S^{-\top},

    one Euler step on each factor, then re-orthonormalisation of the bases
    (:meth:`FixedRankManifold.projx`). :math:`S^{-1}` makes the ODE stiff as the smallest
    singular value goes to 0: the step's error grows like :math:`h^2/\sigma_{\min}`
    (the failure the robust integrators avoid). Fixed rank; needs a square invertible ``S``.
    """

    name = "naive Euler"
    needs_reevaluation = False

    def _step(self, U, S, V, field, h, t):
        manifold = _square_core_manifold(U, S, V, self.name)
        z = self._evaluate(field, U, S, V, t)
        zv, ztu = ambient_right(z, V), ambient_left(z, U)
        dS = mT(U) @ zv
        dU = torch.linalg.solve(S, zv - U @ dS, left=False)  # (I - UU^T) F V S^{-1}
        dV = torch.linalg.solve(mT(S), ztu - V @ mT(dS), left=False)  # (I - VV^T) F^T U S^{-T}
        x = cat_rows(U + h * dU, S + h * dS, V + h * dV)
        return manifold.unpack(manifold.projx(x))


def _square_core_manifold(U, S, V, name: str, retraction: str = "metric") -> FixedRankManifold:
    if S.shape[-1] != S.shape[-2]:
        raise ValueError(f"{name} needs a square S, got shape {tuple(S.shape)}")
    return _manifold(U.shape[-2], V.shape[-2], S.shape[-1], retraction)


@functools.lru_cache(maxsize=64)
def _manifold(m: int, n: int, r: int, retraction: str) -> FixedRankManifold:
    # one (stateless) manifold per size, not one per step
    return FixedRankManifold(m, n, r, retraction=retraction)
