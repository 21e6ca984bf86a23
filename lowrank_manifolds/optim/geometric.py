r"""Geometry-aware heavy ball and Adam for low-rank weights: :class:`GeometricSGD`, :class:`GeometricAdam`.

The heavy ball and Adam of Schotthöfer, Klein and Kusch, "A geometric framework
for momentum-based optimizers for low-rank training" (NeurIPS 2025). One step:

1. Riemannian gradient from one backward pass (pseudo-inverse of ``S`` on the
   active block, so zero padding is allowed):
   :math:`GV = dU\,S^{+\top}`, :math:`G^\top U = dV\,S^{+}`.
2. Basis augmentation :math:`\hat U = [U, Q_U]`, :math:`\hat V = [V, Q_V]` (``2R``
   columns) from the Householder QRs :math:`[U, GV] = \hat U R`,
   :math:`[V, G^\top U] = \hat V R'` (signs fixed so that the first ``R`` columns are
   ``U``, ``V`` re-orthonormalised). In these bases the point is
   :math:`\hat S_0 = \operatorname{diag}(S, 0)` and the Riemannian gradient
   :math:`P_X G` has the coefficients :math:`\hat G = \begin{bmatrix} dS & C_V^\top
   \\ C_U & 0 \end{bmatrix}` (up to the placement of inactive columns), where
   :math:`C_U = Q_U^\top GV` and :math:`C_V = Q_V^\top G^\top U` are read off the QRs'
   triangular factors (upper triangular). Every coefficient that is zero in exact
   arithmetic (the normal block, below the triangles, inactive rows and columns) is
   exactly zero, so Adam's entrywise division never meets a rounding-level one.
3. The moments live in coefficient space of the current bases (``R x R``). The old
   directions come first in the augmented bases, so the transport is the embedding
   :math:`m \to \operatorname{diag}(m, 0)` for both moments.
4. Heavy ball (``torch.optim.SGD`` convention) or Adam on the coefficients:
   :math:`\hat S = \hat S_0 - \eta D`.
5. Truncation :math:`\hat S = P \operatorname{diag}(s) Q^\top`, new rank
   :math:`r_1` (fixed: the current active rank; or by the tolerance
   the weight's truncation, :func:`~lowrank_manifolds.integrators.truncation_rank`),
   :math:`U_1 = \hat U P_{r_1}`, :math:`S_1 = \operatorname{diag}(s_{:r_1})`,
   :math:`V_1 = \hat V Q_{r_1}`, and :math:`m_1 \to P_{r_1}^\top m_1 Q_{r_1}`,
   :math:`m_2 \to (P_{r_1}^{\circ 2})^\top m_2\, Q_{r_1}^{\circ 2}` (see
   :class:`GeometricAdam`'s ``m2_transport``).

Since :math:`\hat U \hat S \hat V^\top = X - \eta\,\xi` with a tangent
:math:`\xi`, step 5 is the metric-projection retraction (plus adaptive rank). Cost
per step and weight: **one forward and one backward pass** (shared by the whole
network), two QRs (``m x 2R``, ``n x 2R``), one ``2R x 2R`` SVD, two ``R x R``
solves: :math:`O((m + n) R^2 + R^3)`; no host synchronisation. States:
``R x R`` (one for heavy ball, two for Adam) instead of the ``(m + R + n) x R`` of
geoopt's Riemannian optimizers.

The conventions (low-rank weights and ordinary parameters in one optimizer, capacities,
notation) are those of :mod:`lowrank_manifolds.optim._base`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from .._linalg import cat_last, mT
from ..manifold import FixedRankManifold
from ._base import (
    LowRankOptimizer,
    adam_update,
    capacity_policy,
    check_betas,
    core_adam_step,
    cycle_phase,
    rank_policy,
    riemannian_parts,
    sgd_update,
    truncate,
    transport_moments,
    truncation_options,
)
from .._args import nonneg, positive_int, unit_interval

__all__ = ["GeometricSGD", "GeometricAdam"]


def _augmented_basis(u: Tensor, gv: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``(U^, C)`` from the Householder QR :math:`[U, GV] = QR` (``m x 2R``).

    The signs are fixed so that ``R`` has a non-negative diagonal (the unique QR, continuous
    in its input): on the active columns :math:`\hat U_{:, :R} = U R_{11}^{-1}` is ``U``
    re-orthonormalised (``R_11 = I`` up to ``U``'s own rounding; the optimizers take it as
    exactly ``I``), and the new columns are the unique QR basis of :math:`(I - UU^\top) GV`.
    ``C`` (``2R x R``) is ``R[:, R:]`` with the rows of ``U``'s active
    columns zeroed: the coefficients of :math:`(I - UU^\top)GV` in ``U^`` (the zeroed rows
    hold :math:`U^\top GV`, which belongs to the core block). Its zeros are the QR's
    exact ones, never rounding: below the diagonal of the lower block, the rows of the
    old directions, and everything that an inactive (zero) column of ``U`` or ``GV`` touches.
    (With ``m < 2R`` the basis has ``k = m`` columns instead of ``2R``.)
    """
    q, r = torch.linalg.qr(cat_last(u, gv))
    cap, k = u.shape[-1], q.shape[-1]
    sign = torch.where(torch.diagonal(r[..., :, :k], dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    new = torch.cat([~mask, mask.new_ones(*mask.shape[:-1], k - cap)], -1)
    return q * sign.unsqueeze(-2), r[..., :, cap:] * (sign * new).unsqueeze(-1)


def _tangent_support(mask: Tensor, k_u: int, k_v: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Boolean masks ``(core, up, vp)`` (``k_u x k_v``, ``2R x 2R`` unless ``m`` or ``n`` is
    smaller) of the blocks of a tangent vector's
    coefficients in the augmented bases of :func:`_augmented_basis` (rows: ``U^``,
    columns: ``V^``): ``core`` = old x old directions; ``up`` = new x old, upper triangular
    in the lower block (``C_U``); ``vp`` = old x new, its transpose pattern (``C_V^T``).
    Everything else, the normal block new x new included, is a structural zero. The masks
    depend only on the active columns and on indices, never on rounding."""
    cap = mask.shape[-1]
    old_u = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], k_u - cap)], -1)
    old_v = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], k_v - cap)], -1)
    i = torch.arange(k_u, device=mask.device).unsqueeze(-1)
    j = torch.arange(k_v, device=mask.device)
    core = old_u.unsqueeze(-1) & old_v.unsqueeze(-2)
    up = ~old_u.unsqueeze(-1) & old_v.unsqueeze(-2) & (j >= i - cap)  # C_U: R's upper triangle
    vp = old_u.unsqueeze(-1) & ~old_v.unsqueeze(-2) & (i >= j - cap)  # C_V^T
    return core, up, vp


def _embed(c: Tensor, k_u: int, k_v: int) -> Tensor:
    r"""``R x R`` coefficients in the old bases as ``k_u x k_v`` ones in the augmented bases
    (the old directions come first: :math:`\hat U^\top U = [I; 0]`)."""
    return nn.functional.pad(c, (0, k_v - c.shape[-1], 0, k_u - c.shape[-2]))



def _augment(p: Tensor, grad: Tensor, manifold: FixedRankManifold):
    r"""Augmented bases and the coefficients of :math:`\hat S_0` and of the Riemannian
    gradient (steps 1-2 of the module docstring), with the block structure exact.

    :func:`_augmented_basis` gives :math:`\hat U = [U, Q_U]`, :math:`\hat V = [V, Q_V]`
    (``U``, ``V`` re-orthonormalised) and the coefficients :math:`C_U = \hat U^\top
    (I - UU^\top) GV`, :math:`C_V = \hat V^\top (I - VV^\top) G^\top U` from the QRs'
    triangular factors, so :math:`\hat S_0 = \operatorname{diag}(S, 0)` and
    :math:`\hat G = \begin{bmatrix} dS & 0 \\ 0 & 0 \end{bmatrix} + [C_U, 0] +
    [C_V, 0]^\top`. Entries outside ``support`` (:func:`_tangent_support`) are zero
    by construction and set to zero explicitly, so no rounding-level coefficient
    reaches Adam's entrywise division. Returns ``(U^, V^, S^_0, G^, mask, support)``
    with ``support = (core, up, vp)``."""
    u, s, v, mask, ds, gv, gtu = riemannian_parts(p, grad, manifold)
    mask = mask > 0
    uh, cu = _augmented_basis(u, gv, mask)
    vh, cv = _augmented_basis(v, gtu, mask)
    cap, k_u, k_v = manifold.capacity, uh.shape[-1], vh.shape[-1]
    support = _tangent_support(mask, k_u, k_v)
    gh = _embed(ds, k_u, k_v) + nn.functional.pad(cu, (0, k_v - cap)) + nn.functional.pad(mT(cv), (0, 0, 0, k_u - cap))
    gh = gh * (support[0] | support[1] | support[2])
    return uh, vh, _embed(s, k_u, k_v), gh, mask, support


class GeometricSGD(LowRankOptimizer):
    r"""Geometry-aware heavy ball (SGD with momentum) for low-rank weights.

    Schotthöfer, Klein, Kusch, "A geometric framework for momentum-based optimizers
    for low-rank training" (NeurIPS 2025): a discretisation of the DLRT momentum flow
    :math:`\dot W = P_W \mathcal V`, :math:`\dot{\mathcal V} + \gamma \mathcal V = -P_W \nabla L`.
    The momentum buffer is a tangent vector held as an ``R x R`` coefficient matrix in
    the current bases, transported through basis augmentation and truncation (module
    docstring, steps 1-5); the buffer update follows ``torch.optim.SGD``
    (``buf = momentum * buf + (1 - dampening) * g``, first step ``buf = g``;
    Nesterov: direction ``g + momentum * buf``).

    Parameters
    ----------
    params : iterable
        Parameters or param groups; low-rank weights and ordinary parameters may mix.
    lr : float
    momentum, dampening : float
        As ``torch.optim.SGD``; ``momentum`` in ``[0, 1)``.
    nesterov : bool
    weight_decay : float
        Adds ``weight_decay * W`` to the gradient (for low-rank weights: to the
        coefficients, i.e. the Riemannian gradient of :math:`\tfrac{\lambda}{2}\|W\|_F^2`).
    tol, relative, min_rank : optional
        Override the weights' own truncation (their manifold's ``tol``, ``relative``,
        ``min_rank``; ``None``, the default, keeps each): the augmented core is truncated
        by this tolerance, within the capacity ``R`` (rank-adaptive weights only).
    fixed_rank : bool
        Keep each rank-adaptive weight at its current active rank (the fixed-rank method).
    rank_tol, rank_relative
        Deprecated names of ``tol`` and ``relative``.

    Cost per step and low-rank weight: one forward + one backward pass (for the whole
    model), two QRs (``m x 2R``, ``n x 2R``), one ``2R x 2R`` SVD, two ``R x R`` solves;
    state ``R x R``. No host synchronisation. Ordinary parameters: ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        tol: Optional[float] = None, relative: Optional[bool] = None, min_rank: Optional[int] = None,
        fixed_rank: bool = False,
        **deprecated: Any,
    ):
        defaults = dict(
            truncation_options(type(self).__name__, tol, relative, min_rank, fixed_rank, deprecated),
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        unit_interval(group["momentum"], "momentum")
        nonneg(group["dampening"], "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")

    def _euclidean_step(self, p, grad, group, state):
        sgd_update(
            p, grad, state, group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"]
        )

    def _lowrank_step(self, p, grad, group, state):
        manifold = p.manifold
        uh, vh, s0, gh, mask, _ = _augment(p, grad, manifold)
        if group["weight_decay"]:
            gh = gh + group["weight_decay"] * s0
        mom = group["momentum"]
        if mom:
            buf = state.get("momentum_buffer")
            if buf is None:
                bh = gh.clone()
            else:
                bh = _embed(buf, *gh.shape[-2:])
                bh.mul_(mom).add_(gh, alpha=1 - group["dampening"])
            direction = gh + mom * bh if group["nesterov"] else bh
        else:
            direction = gh
        sh = s0 - group["lr"] * direction
        u1, s1, v1, p_r, q_r = truncate(uh, sh, vh, *rank_policy(group, mask, manifold))
        if mom:
            state["momentum_buffer"] = mT(p_r) @ bh @ q_r
        self._write(p, u1, s1, v1)


class GeometricAdam(LowRankOptimizer):
    r"""Geometry-aware Adam / AdamW for low-rank weights (Schotthöfer, Klein, Kusch 2025).

    First and second moments are ``R x R`` coefficient matrices in the current bases.
    Per step (module docstring): Riemannian gradient coefficients :math:`\hat G` in the
    augmented bases, moments embedded,
    :math:`m_1 \leftarrow \beta_1 m_1 + (1-\beta_1)\hat G`,
    :math:`m_2 \leftarrow \beta_2 m_2 + (1-\beta_2)\hat G^{\circ 2}`, bias-corrected
    direction :math:`D = \hat m_1 / (\sqrt{\hat m_2} + \epsilon)` (zero in the
    lower-right block, hence tangent), :math:`\hat S = \hat S_0 - \eta D`, truncation,
    moments truncated with the same singular vectors.

    Parameters
    ----------
    params, lr, betas, eps
        As ``torch.optim.Adam``.
    weight_decay : float
    decoupled_weight_decay : bool
        ``False``: L2 (added to the gradient, as ``Adam``). ``True``: AdamW, the weight
        is scaled by ``1 - lr * weight_decay`` (for low-rank weights: ``S`` is).
    tol, relative, min_rank, fixed_rank
        As :class:`GeometricSGD` (the weights' own truncation by default).
    perp_second_moment : {"entrywise", "scalar"}
        ``"entrywise"`` (default, the paper's): entrywise second moment in all blocks.
        ``"scalar"``: one scalar second moment for each basis-rotation block (``Up``,
        ``Vp``; their coordinates are fresh basis columns every step, so entrywise history
        is zero there and the step is a memoryless ~3.2 lr sign step). Fixes the O(lr)
        plateau at fixed rank (docs/training.md, limit (iii)); slower basis rotation.
    m2_transport : {"squared", "sqrt"}
        Transport of the second moment through the truncation's singular vectors.
        ``"squared"`` (default): :math:`(P_r^{\circ 2})^\top m_2 Q_r^{\circ 2}`, a convex
        combination of the old entries (the columns of :math:`P_r^{\circ 2}`,
        :math:`Q_r^{\circ 2}` sum to one): it cannot cancel, so
        :math:`|m_1| / \sqrt{m_2}` stays within ``2R`` times Adam's own bound (Cauchy-Schwarz).
        ``"sqrt"``: the paper's :math:`(P_r^\top \sqrt{m_2} Q_r)^{\circ 2}`, floored by the
        squared transport; unlike that one it depends on the signs of the basis columns
        (fixed here by the unique QR of step 2). Unfloored, its sums of positive entries with signed weights
        cancel (measured: ``|D|`` up to 282, error 2.99 on the 50 %-observed completion
        problem of the tests); floored, the positive cross terms remain (first order in
        the rotation, where the squared transport is second order) and inflate ``m_2``:
        on the planted 20 x 16 problem of the tests, loss 0.36 after 150 steps
        against 0.07 with ``"squared"``. (Before the exact block structure of step 2 the
        paper's transport was the default; its 0.04 there came from rounding-level
        coefficients turned into full steps.)

    augment_every : int
        The schedule. ``1`` (default): augment and truncate at every step, as above.
        ``k > 1``: the cycle of the authors' training code (RobustDLRT's augmented-BUG
        layers: augment every ``num_local_iter`` batches, AdamW on the augmented core in
        between, then truncate)::

            step 0 of a cycle:  augment as above, Adam step on S^, keep the leading R singular
                                directions (no tolerance: the new directions survive)
            steps 1 .. k-1:     bases fixed; G_S = U^T G V (autograd's dS, all blocks, the
                                new x new one included, so the rank grows at first order);
                                Adam on S with the moments in these bases (no transport)
            step k-1 also:      truncate S by the weight's policy, moments transported

        Between augmentations the weight is held in the augmented bases with a general
        (not diagonal, possibly singular) core. Needs ``fixed_rank=False``.

    Cost as :class:`GeometricSGD`; two ``R x R`` states and a step counter. Ordinary
    parameters: ``torch.optim.Adam`` / ``AdamW`` formulas. A core-only step costs
    :math:`O(R^3)` (an ``R x R`` SVD on the cycle's last step only).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        tol: Optional[float] = None, relative: Optional[bool] = None, min_rank: Optional[int] = None,
        fixed_rank: bool = False,
        m2_transport: str = "squared",
        perp_second_moment: str = "entrywise",
        augment_every: int = 1,
        **deprecated: Any,
    ):
        defaults = dict(
            truncation_options(type(self).__name__, tol, relative, min_rank, fixed_rank, deprecated),
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, m2_transport=m2_transport,
            perp_second_moment=perp_second_moment, augment_every=augment_every,
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        check_betas(group["betas"])
        nonneg(group["eps"], "eps")
        group.setdefault("m2_transport", "squared")
        if group["m2_transport"] not in ("sqrt", "squared"):
            raise ValueError(f"m2_transport must be 'sqrt' or 'squared', got {group['m2_transport']!r}")
        group.setdefault("augment_every", 1)
        positive_int(group["augment_every"], "augment_every")
        if group["augment_every"] > 1 and group["fixed_rank"]:
            raise ValueError("augment_every > 1 grows the rank inside a cycle: it needs fixed_rank=False")
        group.setdefault("perp_second_moment", "entrywise")
        if group["perp_second_moment"] not in ("entrywise", "scalar"):
            raise ValueError(
                f"perp_second_moment must be 'entrywise' or 'scalar', got {group['perp_second_moment']!r}"
            )

    def _euclidean_step(self, p, grad, group, state):
        adam_update(
            p, grad, state, group["lr"], group["betas"], group["eps"], group["weight_decay"],
            group["decoupled_weight_decay"],
        )

    def _lowrank_step(self, p, grad, group, state):
        k = group["augment_every"]
        phase = cycle_phase(group, state)
        if phase > 0:
            return core_adam_step(p, grad, group, state, phase == k - 1)
        manifold = p.manifold
        lr, wd = group["lr"], group["weight_decay"]
        b1, b2 = group["betas"]
        if wd and group["decoupled_weight_decay"]:
            manifold.unpack(p)[1].mul_(1 - lr * wd)  # S (a view)
            wd = 0.0
        uh, vh, s0, gh, mask, (core, up, vp) = _augment(p, grad, manifold)
        if wd:
            gh = gh + wd * s0
        if "step" not in state:
            state["step"] = 0
            cap = manifold.capacity
            state["exp_avg"] = p.new_zeros(*p.shape[:-2], cap, cap)
            state["exp_avg_sq"] = p.new_zeros(*p.shape[:-2], cap, cap)
        scalar_perp = group.get("perp_second_moment", "entrywise") == "scalar"
        if scalar_perp and "exp_avg_sq_perp" not in state:
            state["exp_avg_sq_perp"] = p.new_zeros(*p.shape[:-2], 2)
        state["step"] += 1
        step = state["step"]
        squared = group["m2_transport"] == "squared"
        # Augmentation transport is the embedding (the old directions are the first ones
        # of the augmented bases), exact for either m2 transport; m1 and m2 vanish outside
        # the support because gh does and the transported states live in the core.
        m1 = _embed(state["exp_avg"], *gh.shape[-2:]).lerp_(gh, 1 - b1)
        m2 = _embed(state["exp_avg_sq"], *gh.shape[-2:]).mul_(b2).addcmul_(gh, gh, value=1 - b2)
        c2, eps = math.sqrt(1 - b2**step), group["eps"]
        if not scalar_perp:  # the paper's entrywise second moment in all blocks
            denom = (m2.sqrt() / c2).add_(eps)
        else:
            # The basis-rotation blocks Up (new x old directions) and Vp (old x new) have
            # as rows (columns) the fresh columns of orth[U, GV] (orth[V, G^T U]): new
            # directions at every step, so an entrywise second moment has no history there
            # (the transported state is zero on them). They get one scalar second moment
            # each, the EMA of the mean square of their gradient coefficients: invariant
            # under the choice of those columns, hence carried.
            count = mask.sum(-1).clamp(min=1).to(gh.dtype).square()
            sq = gh.square()
            ms = torch.stack([(sq * up).sum((-2, -1)), (sq * vp).sum((-2, -1))], -1) / count.unsqueeze(-1)
            v_perp = state["exp_avg_sq_perp"]
            v_perp.mul_(b2).add_(ms, alpha=1 - b2)
            rms_perp = (v_perp.sqrt() / c2 + eps).unsqueeze(-1).unsqueeze(-1)
            denom = torch.where(up, rms_perp[..., 0, :, :], rms_perp[..., 1, :, :])
            denom = torch.where(core, m2.sqrt() / c2 + eps, denom)
        # Exactly zero outside the tangent support (also for eps = 0, where 0 / 0 would be NaN).
        direction = torch.where(core | up | vp, m1 / denom, 0.0)
        sh = s0 - (lr / (1 - b1**step)) * direction
        # a cycle's first step keeps every direction the capacity holds: truncated at its end
        policy = rank_policy(group, mask, manifold) if k == 1 else (capacity_policy(manifold), None)
        u1, s1, v1, p_r, q_r = truncate(uh, sh, vh, *policy)
        transport_moments(state, m1, m2, p_r, q_r, squared)
        self._write(p, u1, s1, v1)
