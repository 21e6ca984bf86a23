r"""The robust integrators: KSL and BUG (fixed rank); augmented BUG, parallel BUG and abc-PSI
(rank adaptive). Each docstring states its step and cites its paper (docs/integrators.md)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._linalg import cat_last, leading, mT, qr, qr_kept_first
from .base import Integrator, RankAdaptiveIntegrator
from .fields import ambient_left, ambient_right

__all__ = ["KSL", "BUG", "AugmentedBUG", "ParallelBUG", "ABCPSI"]


class KSL(Integrator):
    r"""Projector-splitting integrator, KSL order (Lubich and Oseledets 2014).

    C. Lubich, I. V. Oseledets, "A projector-splitting integrator for dynamical low-rank
    approximation", BIT 54 (2014) 171-188.

    .. math::
        K &= U_0 S_0 + h F(U_0 S_0 V_0^\top) V_0, & (U_1, \hat S) &= \operatorname{qr}(K),\\
        \tilde S &= \hat S - h U_1^\top F(U_1 \hat S V_0^\top) V_0, &&\\
        L &= V_0 \tilde S^\top + h F(U_1 \tilde S V_0^\top)^\top U_1, &
        (V_1, S_1^\top) &= \operatorname{qr}(L).

    Fixed rank; three field evaluations at three different points. Properties
    (Lubich-Oseledets Thm 4.1 and Kieri-Lubich-Walach 2016): exact when
    :math:`F = \dot A` for a rank-r :math:`A(t)` (with :math:`V(t_1)^\top V(t_0)`
    invertible), and robust: its error bounds do not depend on small singular values.
    The backward S-step is what makes it robust, and what makes it not parallel.
    """

    name = "KSL"
    needs_reevaluation = True

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        U1, S_hat = qr(U @ S + h * ambient_right(z, V))
        z = self._evaluate(field, U1, S_hat, V, t)
        S_tilde = S_hat - h * (mT(U1) @ ambient_right(z, V))
        z = self._evaluate(field, U1, S_tilde, V, t)
        V1, R = qr(V @ mT(S_tilde) + h * ambient_left(z, U1))
        return U1, mT(R), V1


class BUG(Integrator):
    r"""The basis-update & Galerkin ("unconventional") integrator, fixed rank.

    G. Ceruti, C. Lubich, "An unconventional robust integrator for dynamical low-rank
    approximation", BIT 62 (2022) 23-44.

    .. math::
        K_1 &= U_0 S_0 + h F(Y_0) V_0,\quad U_1 = \operatorname{orth}(K_1),\qquad
        L_1 = V_0 S_0^\top + h F(Y_0)^\top U_0,\quad V_1 = \operatorname{orth}(L_1),\\
        \bar S_0 &= (U_1^\top U_0) S_0 (V_0^\top V_1),\qquad
        S_1 = \bar S_0 + h U_1^\top F(U_1 \bar S_0 V_1^\top) V_1.

    Two evaluations (the K- and L-steps share the one at :math:`Y_0` and can run in
    parallel). Exact for :math:`F = \dot A` with rank-r :math:`A(t)` (Thm 4 of the
    paper), robust to small singular values, first order.
    """

    name = "BUG"
    needs_reevaluation = True

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        U1, _ = qr(U @ S + h * ambient_right(z, V))
        V1, _ = qr(V @ mT(S) + h * ambient_left(z, U))
        S0 = (mT(U1) @ U) @ S @ (mT(V) @ V1)
        z = self._evaluate(field, U1, S0, V1, t)
        return U1, S0 + h * (mT(U1) @ ambient_right(z, V1)), V1


class AugmentedBUG(RankAdaptiveIntegrator):
    r"""Rank-adaptive BUG (Ceruti, Kusch and Lubich 2022).

    G. Ceruti, J. Kusch, C. Lubich, "A rank-adaptive robust integrator for dynamical
    low-rank approximation", BIT 62 (2022) 1149-1174.

    .. math::
        \hat U &= \operatorname{orth}([K_1, U_0]),\quad \hat V = \operatorname{orth}([L_1, V_0])
        \quad (K_1, L_1 \text{ as in BUG}),\\
        \hat S_0 &= (\hat U^\top U_0) S_0 (V_0^\top \hat V),\qquad
        \hat S = \hat S_0 + h \hat U^\top F(\hat U \hat S_0 \hat V^\top) \hat V,

    then truncation (:class:`Truncation`). Since :math:`U_0 \in \operatorname{span}\hat U`
    and :math:`V_0 \in \operatorname{span}\hat V`, :math:`\hat U \hat S_0 \hat V^\top =
    Y_0`. Before truncation: exact for :math:`F = \dot A` with rank-r :math:`A(t)`; for a
    constant tangent field :math:`\xi` the result is exactly :math:`Y_0 + h\xi`, so with
    truncation to rank r it is the metric-projection retraction. Robust (error bound
    independent of small singular values), first order.
    """

    name = "augmented BUG"
    needs_reevaluation = True

    def _augmented_step(self, U, S, V, field, h, t, active=None):
        z = self._evaluate(field, U, S, V, t)
        Uh = _orth(cat_last(U @ S + h * ambient_right(z, V), U), active)
        Vh = _orth(cat_last(V @ mT(S) + h * ambient_left(z, U), V), active)
        S0 = (mT(Uh) @ U) @ S @ (mT(V) @ Vh)
        z = self._evaluate(field, Uh, S0, Vh, t)
        S1 = S0 + h * (mT(Uh) @ ambient_right(z, Vh))
        if active is not None:  # nothing on the completing directions
            S1 = S1 * _augmented(active, Uh).unsqueeze(-1) * _augmented(active, Vh).unsqueeze(-2)
        return Uh, S1, Vh


class ParallelBUG(RankAdaptiveIntegrator):
    r"""Parallel rank-adaptive BUG (Ceruti, Kusch and Lubich 2024).

    G. Ceruti, J. Kusch, C. Lubich, "A parallel rank-adaptive integrator for dynamical
    low-rank approximation", SIAM J. Sci. Comput. 46 (2024) B205-B228.

    With one evaluation :math:`F_0 = F(Y_0)`:
    :math:`K_1 = U_0 S_0 + h F_0 V_0`, :math:`L_1 = V_0 S_0^\top + h F_0^\top U_0`,
    :math:`\bar S = S_0 + h U_0^\top F_0 V_0`; :math:`\tilde U` = the last columns of the
    QR factor of :math:`[U_0, K_1]` (so :math:`\tilde U \perp U_0`), :math:`\tilde V`
    likewise; in the bases :math:`[U_0, \tilde U]`, :math:`[V_0, \tilde V]`

    .. math:: \hat S = \begin{bmatrix} \bar S & L_1^\top \tilde V \\
              \tilde U^\top K_1 & 0 \end{bmatrix},

    then truncation. All three substeps run in parallel from :math:`Y_0`. The result is
    returned in the Q factors of the two QRs, :math:`[U_0, K_1] = Q_u R_u`, i.e.
    :math:`[U_0, \tilde U] = Q_u \operatorname{diag}((R_u)_{11}, I)`, with the core
    :math:`\operatorname{diag}((R_u)_{11}, I)\, \hat S\, \operatorname{diag}((R_v)_{11}, I)^\top`:
    the same matrix, but bases orthonormal to the QR's rounding at every step (carrying
    :math:`U_0` itself over let its rounding errors accumulate, to 2e-5 after
    :math:`10^4` float32 steps of a rotating field). For a constant
    field :math:`F` the augmented result is exactly :math:`Y_0 + h P_{Y_0}(F)` (GeoLoRA's
    step), so with truncation to rank r it is the metric retraction of
    :math:`h P_{Y_0}(F)`. Not exact for :math:`\dot A`, but its local error is
    :math:`O(h^2)` with constants independent of small singular values.
    """

    name = "parallel BUG"
    needs_reevaluation = False

    def _augmented_step(self, U, S, V, field, h, t, active=None):
        z = self._evaluate(field, U, S, V, t)
        zv, ztu = ambient_right(z, V), ambient_left(z, U)
        K = U @ S + h * zv
        L = V @ mT(S) + h * ztu
        S_bar = S + h * (mT(U) @ zv)
        if active is not None:
            return self._masked_step(U, S_bar, V, K, L, active)
        ru, rv = U.shape[-1], V.shape[-1]
        Qu, Ru = qr(cat_last(U, K))
        Qv, Rv = qr(cat_last(V, L))
        Ut, Vt = Qu[..., ru:], Qv[..., rv:]
        top = cat_last(S_bar, mT(L) @ Vt)
        bottom = cat_last(mT(Ut) @ K, S.new_zeros(*S.shape[:-2], Ut.shape[-1], Vt.shape[-1]))
        # The core is S^ in the bases [U0, U~], [V0, V~]; it is returned in the Q factors
        # themselves, [U0, U~] = Qu diag(Ru11, I): the same matrix, and bases orthonormal to
        # the QR's rounding whatever U0's own drift (U0 is not carried over).
        S_hat = torch.cat([top, bottom], dim=-2)
        return Qu, _block_congruence(Ru[..., :ru, :ru], S_hat, Rv[..., :rv, :rv]), Qv

    @staticmethod
    def _masked_step(U, S_bar, V, K, L, active):
        r"""The step of padded points (``active``): with :math:`[U, K]` reordered so that each
        point's ``r`` old and ``r`` new columns lead, :math:`Q_u`'s columns ``r .. 2r`` are
        :math:`\tilde U` (``D_u`` their 0/1 selector), and in the bases :math:`Q_u, Q_v`,
        :math:`\hat S = M \bar S N + M (L^\top Q_v) D_v + D_u (Q_u^\top K) N`
        (:math:`M = Q_u^\top U`, :math:`N = V^\top Q_v`): the three blocks of the class
        docstring, nothing on the completing directions."""
        keep = cat_last(active, active)
        Qu, Qv = qr_kept_first(cat_last(U, K), keep), qr_kept_first(cat_last(V, L), keep)
        r = active.sum(-1)
        new_u = (leading(2 * r, Qu.shape[-1]) & ~leading(r, Qu.shape[-1])).to(U.dtype)
        new_v = (leading(2 * r, Qv.shape[-1]) & ~leading(r, Qv.shape[-1])).to(U.dtype)
        mu, nv = mT(Qu) @ U, mT(V) @ Qv
        S_hat = mu @ S_bar @ nv + (mu @ (mT(L) @ Qv)) * new_v.unsqueeze(-2) + new_u.unsqueeze(-1) * ((mT(Qu) @ K) @ nv)
        return Qu, S_hat * _augmented(active, Qu).unsqueeze(-1) * _augmented(active, Qv).unsqueeze(-2), Qv


def _block_congruence(a: Tensor, s: Tensor, b: Tensor) -> Tensor:
    r""":math:`\operatorname{diag}(a, I)\, s\, \operatorname{diag}(b, I)^\top` without forming
    the block diagonals (``a`` acts on the leading rows of ``s``, ``b`` on its leading columns)."""
    ka, kb = a.shape[-1], b.shape[-1]
    s = torch.cat([a @ s[..., :ka, :], s[..., ka:, :]], dim=-2)
    return torch.cat([s[..., :kb] @ mT(b), s[..., kb:]], dim=-1)


class ABCPSI(RankAdaptiveIntegrator):
    r"""Augmented backward-corrected projector-splitting integrator (abc-PSI).

    J. Kusch, S. Schotthöfer, A. Walter, "An augmented backward-corrected projector
    splitting integrator for dynamical low-rank training", 2025 (arXiv:2502.03006).

    With one evaluation :math:`F_0 = F(Y_0)`:

    .. math::
        K_1 &= U_0 S_0 + h F_0 V_0,\quad \hat U = \operatorname{orth}([K_1, U_0]),\quad
        \tilde S = \hat U^\top U_0 S_0,\\
        L_1 &= V_0 \tilde S^\top + h F_0^\top \hat U,\quad (\hat V, R) = \operatorname{qr}(L_1),
        \quad \hat S = R^\top,

    then truncation. The backward correction :math:`\tilde S` makes
    :math:`\hat U \tilde S V_0^\top = Y_0` exactly, so the L-step's field is again
    :math:`F(Y_0)` (one evaluation; for a linear layer no second backward pass). Before
    truncation :math:`Y_1 = \hat U L_1^\top = Y_0 + h \hat U \hat U^\top F_0`; for
    :math:`F_0 = -G`, :math:`\|\hat U \hat U^\top G\| \ge \|P_{Y_0} G\|` (descent at
    least that of the Riemannian gradient step), and for a constant tangent field the
    result is exactly :math:`Y_0 + h\xi`. Two QRs and one core SVD; no S-step.
    """

    name = "abc-PSI"
    needs_reevaluation = False

    def _augmented_step(self, U, S, V, field, h, t, active=None):
        z = self._evaluate(field, U, S, V, t)
        Uh = _orth(cat_last(U @ S + h * ambient_right(z, V), U), active)
        S_tilde = (mT(Uh) @ U) @ S
        L1 = V @ mT(S_tilde) + h * ambient_left(z, Uh)
        if active is not None:  # the completing columns of U^ carry nothing
            L1 = L1 * _augmented(active, Uh).unsqueeze(-2)
        Vh, R = qr(L1)
        return Uh, mT(R), Vh


def _orth(a: Tensor, active) -> Tensor:
    """An orthonormal basis of ``[K, U]`` (``r`` columns each): the QR's ``Q``; for padded
    points (``active``) the active columns of both blocks first (:func:`qr_kept_first`)."""
    if active is None:
        return qr(a)[0]
    return qr_kept_first(a, cat_last(active, active))


def _augmented(active: Tensor, basis: Tensor) -> Tensor:
    """0/1 ``(..., k)``: the leading ``2 r`` columns of an augmented basis of ``k`` columns
    (``r`` each point's active rank), the directions its step may use."""
    return leading(2 * active.sum(-1), basis.shape[-1]).to(basis.dtype)
