r"""The parts of the low-rank optimizer family (:class:`~lowrank_manifolds.optim.DLRT` and its
configurations) that do not depend on how the augmented bases were found.

A step of the family, for a weight :math:`X = U S V^\top` with capacity ``R``:

1. *basis update*: augmented orthonormal bases :math:`\hat U \supseteq U`,
   :math:`\hat V \supseteq V`, the point :math:`\hat S_0` and the gradient coefficients
   :math:`\hat G` in them. Here: the tangent augmentation :func:`tangent_augment`
   (:math:`\hat U = \operatorname{orth}[U, GV]`, exact block zeros) and augmented BUG's
   :func:`field_augment` (its spans, in the same coordinates);
2. *state embedding*: each ``R x R`` coefficient state of the old bases written in the
   augmented ones: the old directions come first, so :func:`embed` pads with zeros;
3. *core update* :func:`core_update`: gradient flow, heavy ball or Adam on :math:`\hat S`;
4. *truncation* and *transport* :func:`truncate_and_carry`: :math:`\hat S = P \Sigma Q^\top`,
   kept singular vectors :math:`P_r`, :math:`Q_r`, states :math:`P_r^\top m Q_r`
   (the second moment by :func:`carry`'s rule).

Steps 1-4 are pure functions of tensors, batch-first with ranks as masks: they take no
parameter, param group or state dict (:func:`core_update` takes :class:`CoreOptions` and reads
the old states; its results, like :func:`truncate_and_carry`'s, are returned, not written).
The schedule (``augment_every = k``): :func:`cycle_phase` says where a step is in its cycle;
:func:`core_cycle_step` is a step inside a cycle (bases fixed, steps 3-4 on the core alone);
it and :func:`init_state` write the (staged) state dict of the optimizer.
Nothing here forms an ``m x n`` matrix or synchronises with the host.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .._linalg import cat_last, cat_rows, mT, qr
from ..manifold import FixedRankManifold
from ._base import rank_policy, truncate

#: A state's embedding into augmented coordinates: ``embed(x, key)``.
Embedding = Callable[[Tensor, str], Tensor]  # returns a new tensor (core_update writes into it)


# ---------------------------------------------------------------------------
# the tangent augmentation (integrator="parallel-bug" with a momentum or Adam core)
# ---------------------------------------------------------------------------
def _augmented_basis(u: Tensor, gv: Tensor, mask: Tensor, adaptive: bool = True) -> Tuple[Tensor, Tensor]:
    r"""``(U^, C)`` from the Householder QR of :math:`[U, GV]` (``m x 2R``), its active columns
    first: :math:`[U_a, (GV)_a, 0] = QR` with ``U``'s active columns leading
    (:func:`~lowrank_manifolds.optim._base.active_first`) and ``mask`` marking them.

    The signs are fixed so that ``R`` has a non-negative diagonal (the unique QR, continuous
    in its input): :math:`\hat U_{:, :r} = U_a R_{11}^{-1}` is ``U`` re-orthonormalised
    (``R_11 = I`` up to ``U``'s own rounding; the optimizers take it as exactly ``I``),
    columns ``r .. 2r-1`` are the unique QR basis of :math:`(I - UU^\top) GV` and the rest
    complete the basis. ``C`` (``k x R``) holds the coefficients of :math:`(I - UU^\top)GV`
    in ``U^`` (the rows of ``U``'s active columns zeroed: they hold :math:`U^\top GV`, which
    belongs to the core block). Its zeros are the QR's exact ones, never rounding: below the
    diagonal of the new block, the rows of the old directions and of the completing ones, and
    every column of an inactive (zero) column of ``GV``. Putting the zero columns last is what
    keeps the completing directions out of every coefficient: in :math:`[U, GV]` as it stands,
    the inactive (zero) columns of ``U`` would become arbitrary directions along which ``GV``
    has components, and a point's step would depend on its capacity's headroom.
    (With ``m < 2R`` the basis has ``k = m`` columns instead of ``2R``.) ``adaptive=False``
    says every column is active (a fixed-rank point): the order is then ``[U, GV]`` as it
    stands, and the two column permutations (5% of a batched fixed-rank step) are skipped.
    """
    cap = u.shape[-1]
    old = torch.cat([mask, torch.zeros_like(mask)], -1)
    a = cat_last(u, gv)
    if adaptive:
        order = torch.argsort((~torch.cat([mask, mask], -1)).to(torch.uint8), dim=-1, stable=True)
        a = torch.gather(a, -1, order.unsqueeze(-2).expand(a.shape))
    q, r = qr(a)
    k = q.shape[-1]
    sign = torch.where(torch.diagonal(r[..., :, :k], dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    if adaptive:
        r = torch.gather(r, -1, torch.argsort(order, dim=-1).unsqueeze(-2).expand(r.shape))  # columns as in a
    return q * sign.unsqueeze(-2), r[..., :, cap:] * (sign * ~old[..., :k]).unsqueeze(-1)


def _tangent_support(mask: Tensor, k_u: int, k_v: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Boolean masks ``(core, up, vp)`` (``k_u x k_v``, ``2R x 2R`` unless ``m`` or ``n`` is
    smaller) of the blocks of a tangent vector's coefficients in the augmented bases of
    :func:`_augmented_basis` (rows: ``U^``, columns: ``V^``), ``r`` the active rank:
    ``core`` = old x old directions (``:r, :r``); ``up`` = new x old (rows ``r .. 2r-1``),
    upper triangular (``C_U``); ``vp`` = old x new, its transpose pattern (``C_V^T``).
    Everything else, the normal block new x new included, is a structural zero. The masks
    depend only on the active columns and on indices, never on rounding."""
    cap = mask.shape[-1]
    old_u = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], k_u - cap)], -1)
    old_v = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], k_v - cap)], -1)
    r = mask.sum(-1)[..., None, None]
    i = torch.arange(k_u, device=mask.device).unsqueeze(-1)
    j = torch.arange(k_v, device=mask.device)
    core = old_u.unsqueeze(-1) & old_v.unsqueeze(-2)
    up = ~old_u.unsqueeze(-1) & old_v.unsqueeze(-2) & (j >= i - r)  # C_U: R's upper triangle
    vp = old_u.unsqueeze(-1) & ~old_v.unsqueeze(-2) & (i >= j - r)  # C_V^T
    return core, up, vp


def embed(c: Tensor, k_u: int, k_v: int) -> Tensor:
    r"""``R x R`` coefficients in the old bases as ``k_u x k_v`` ones in the tangent
    augmented bases: the old directions come first (:math:`\hat U^\top U = [I; 0]`), so the
    embedding is the zero padding, exact for every state (both moments)."""
    return nn.functional.pad(c, (0, k_v - c.shape[-1], 0, k_u - c.shape[-2]))


def tangent_augment(p: Tensor, grad: Tensor, manifold: FixedRankManifold, mask: Optional[Tensor] = None):
    r"""The tangent augmentation: augmented bases and the coefficients of :math:`\hat S_0` and
    of the Riemannian gradient, with the block structure exact.

    :func:`_augmented_basis` gives :math:`\hat U = [U, Q_U]`, :math:`\hat V = [V, Q_V]`
    (``U``, ``V`` re-orthonormalised) and the coefficients :math:`C_U = \hat U^\top
    (I - UU^\top) GV`, :math:`C_V = \hat V^\top (I - VV^\top) G^\top U` from the QRs'
    triangular factors, so :math:`\hat S_0 = \operatorname{diag}(S, 0)` and
    :math:`\hat G = \begin{bmatrix} dS & 0 \\ 0 & 0 \end{bmatrix} + [C_U, 0] +
    [C_V, 0]^\top`, i.e. :math:`\hat U \hat G \hat V^\top = P_X G`. Entries outside
    ``support`` (:func:`_tangent_support`) are zero by construction and set to zero
    explicitly, so no rounding-level coefficient reaches Adam's entrywise division. ``mask``:
    the active columns of ``p`` (first; computed if not given). Returns ``(U^, V^, S^_0, G^, mask, support)`` with
    ``support = (core, up, vp)``."""
    u, s, v, ds, gv, gtu = manifold.gradient_products(p, grad)
    if mask is None:
        mask = manifold.active_mask(u)
    mask = mask > 0
    uh, cu = _augmented_basis(u, gv, mask, manifold.adaptive)
    vh, cv = _augmented_basis(v, gtu, mask, manifold.adaptive)
    cap, k_u, k_v = manifold.capacity, uh.shape[-1], vh.shape[-1]
    support = _tangent_support(mask, k_u, k_v)
    gh = embed(ds, k_u, k_v) + nn.functional.pad(cu, (0, k_v - cap)) + nn.functional.pad(mT(cv), (0, 0, 0, k_u - cap))
    gh = gh * (support[0] | support[1] | support[2])
    return uh, vh, embed(s, k_u, k_v), gh, mask, support


def field_augment(u: Tensor, s: Tensor, v: Tensor, a: Tensor, b: Tensor, mask: Tensor, tangent: bool):
    r"""Augmented BUG's augmentation for a core optimizer: the spans of
    :math:`\operatorname{orth}[K_1, U]` and :math:`\operatorname{orth}[L_1, V]`
    (:math:`K_1 = US + hFV`, :math:`L_1 = VS^\top + hF^\top U`, so the spans are those of
    :math:`[U, FV]` and :math:`[V, F^\top U]`) in the coordinates of :func:`_augmented_basis`,
    for a field :math:`F = AB^\top` (``a``, ``b``; the negative gradient, L2 term included).

    The old directions come first, so :math:`\hat S_0 = \operatorname{diag}(S, 0)` and the
    states embed by zero padding (:func:`embed`), and the zeros of the coefficients
    :math:`\hat G = -\hat U^\top F \hat V` are structural: the blocks of
    :func:`_tangent_support`, plus the normal block new x new unless ``tangent`` (a field
    :math:`-P_X G` has none). Entries outside ``support`` are set to zero. In BUG's own
    coordinates :math:`\operatorname{orth}[K_1, U]` the second block is found from a residual of
    size :math:`O(h)`, to a relative accuracy of about :math:`\epsilon / h`, and Adam's
    entrywise division turns that into steps: one step on a 24 x 16 layer at rank 4 (h = 0.01)
    differed by 1.2e-2 between float32 and float64 there, by 2e-7 here.
    Returns ``(U^, V^, S^_0, G^, support)``; ``mask``: boolean active columns, leading."""
    uh = _augmented_basis(u, a @ (mT(b) @ v), mask)[0]  # the sign of FV does not change its span
    vh = _augmented_basis(v, b @ (mT(a) @ u), mask)[0]
    k_u, k_v = uh.shape[-1], vh.shape[-1]
    core, up, vp = _tangent_support(mask, k_u, k_v)
    support = core | up | vp
    if not tangent:
        support = support | (up.any(-1, keepdim=True) & vp.any(-2, keepdim=True))
    g = -(mT(uh) @ a) @ (mT(b) @ vh)
    return uh, vh, embed(s, k_u, k_v), torch.where(support, g, 0.0), support


# ---------------------------------------------------------------------------
# states through changes of coordinates
# ---------------------------------------------------------------------------
def carry(x: Tensor, left: Tensor, right: Tensor, key: str, squared: bool) -> Tensor:
    r"""A coefficient state through the change of coordinates :math:`m \to L m R` (augmented
    BUG's embedding :math:`L = \hat U^\top U`, :math:`R = V^\top \hat V`; a truncation's
    :math:`L = P_r^\top`, :math:`R = Q_r`). Momentum and first moment: :math:`L m R`, the
    dense matrix projected on the new spans. The second moment (``key == "exp_avg_sq"``):
    ``squared`` :math:`L^{\circ 2} m_2 R^{\circ 2}`, whose weights are non-negative and sum
    to at most one per entry (orthonormal rows/columns), so it cannot cancel and
    :math:`|m_1| / \sqrt{m_2}` stays bounded (Cauchy-Schwarz); otherwise the paper's square-root
    transport :math:`(L \sqrt{m_2} R)^{\circ 2}`, floored by the squared one."""
    if key != "exp_avg_sq":
        return left @ x @ right
    sq = (left * left) @ x @ (right * right)
    return sq if squared else torch.maximum(sq, (left @ x.sqrt() @ right).square())


def truncate_and_carry(manifold: FixedRankManifold, uh: Tensor, sh: Tensor, vh: Tensor, states: Dict[str, Tensor],
                       policy, squared: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Truncate the augmented ``(U^, S^, V^)`` by ``policy`` (``(Truncation, rank)``) and carry
    ``states`` (augmented coordinates) along the kept singular vectors: the new packed point
    of ``manifold`` and the carried states."""
    u1, s1, v1, p_r, q_r = truncate(uh, sh, vh, *policy)
    left = mT(p_r)
    return manifold.pad(u1, s1, v1), {key: carry(x, left, q_r, key, squared) for key, x in states.items()}


# ---------------------------------------------------------------------------
# the core update
# ---------------------------------------------------------------------------
def gradient_decay(group: dict) -> float:
    """The weight decay that enters the gradient coefficients (L2): all of ``weight_decay``,
    unless it is decoupled (``decoupled_weight_decay`` with a momentum or Adam core, where
    :func:`core_update` scales the core instead). For the flow both are the same step."""
    if group["decoupled_weight_decay"] and group["core"] != "flow":
        return 0.0
    return group["weight_decay"]


def init_state(state: dict, group: dict, p: Tensor) -> None:
    """The core's states before its first step: Adam's step counter and zero moments
    (``R x R``; zero moments make the first update torch's), the scalar second moments of
    ``perp_second_moment="scalar"``. The heavy ball's buffer starts as the first gradient
    (``torch.optim.SGD``), so it has no initial value."""
    if group["core"] != "adam":
        return
    cap = p.manifold.capacity
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = p.new_zeros(*p.shape[:-2], cap, cap)
        state["exp_avg_sq"] = p.new_zeros(*p.shape[:-2], cap, cap)
    if group["perp_second_moment"] == "scalar" and "exp_avg_sq_perp" not in state:
        state["exp_avg_sq_perp"] = p.new_zeros(*p.shape[:-2], 2)


class CoreOptions(NamedTuple):
    """The hyperparameters of a core optimizer (:func:`core_options` reads them from a group)."""

    kind: str  # "flow", "momentum" or "adam"
    lr: float
    weight_decay: float
    decoupled: bool  # the decay scales the core (AdamW) instead of entering the gradient
    momentum: float
    dampening: float
    nesterov: bool
    betas: Tuple[float, float]
    eps: float


def core_options(group: dict) -> CoreOptions:
    """The core optimizer's hyperparameters of a param group."""
    return CoreOptions(group["core"], group["lr"], group["weight_decay"], group["decoupled_weight_decay"],
                       group["momentum"], group["dampening"], group["nesterov"], tuple(group["betas"]), group["eps"])


class CoreStep(NamedTuple):
    """What :func:`core_update` computes: the new core, the new coefficient states (augmented
    coordinates, to be truncated and transported with the core) and the new counters (the
    step count and the scalar second moments, which no change of coordinates touches)."""

    s: Tensor
    moments: Dict[str, Tensor]
    counters: Dict[str, Any]


def core_update(s0: Tensor, g: Tensor, options: CoreOptions, states: Mapping[str, Any], embedding: Embedding,
                support: Optional[Tensor] = None, perp=None) -> CoreStep:
    r"""One step of a core optimizer on the coefficients, the same for every basis: from the
    point :math:`\hat S_0` and the gradient coefficients :math:`\hat G` (L2 decay included,
    :func:`gradient_decay`) in augmented coordinates, and the old ``states`` (read only)
    written in them by ``embedding``, returns :math:`\hat S`, the new moments (augmented
    coordinates, not yet truncated) and counters (a :class:`CoreStep`)::

        decoupled decay:  S^_0 <- (1 - lr wd) S^_0                   (AdamW; momentum/adam cores)
        flow:             S^ = S^_0 - lr G^
        momentum:         b = G^ (first step) or momentum b + (1 - dampening) G^
                          D = G^ + momentum b (nesterov) or b,       S^ = S^_0 - lr D
        adam:             t += 1, m1 = b1 m1 + (1 - b1) G^, m2 = b2 m2 + (1 - b2) G^*G^
                          S^ = S^_0 - lr/(1 - b1^t) m1 / (sqrt(m2)/sqrt(1 - b2^t) + eps)

    ``support`` (optional, boolean): where the direction may be non-zero (the tangent blocks,
    or the active core inside a cycle); outside it the direction is set to exactly zero (also
    ``0 / 0`` at ``eps = 0``). ``perp = (mask, core, up, vp)``: ``perp_second_moment="scalar"``
    (:class:`~lowrank_manifolds.optim.GeometricAdam`): one scalar second moment for each of the
    basis-rotation blocks ``up``, ``vp`` (the counter ``exp_avg_sq_perp``)."""
    lr, wd, kind = options.lr, options.weight_decay, options.kind
    if wd and options.decoupled and kind != "flow":
        s0 = s0 * (1 - lr * wd)
    mom = options.momentum
    if kind == "flow" or (kind == "momentum" and not mom):
        return CoreStep(s0 - lr * g, {}, {})
    if kind == "momentum":
        buf = states.get("momentum_buffer")
        if buf is None:
            buf = g.clone()
        else:
            buf = embedding(buf, "momentum_buffer").mul_(mom).add_(g, alpha=1 - options.dampening)
        if support is not None:  # the embedded buffer is rounding-level off the support: exactly zero
            buf = torch.where(support, buf, 0.0)
        direction = g + mom * buf if options.nesterov else buf
        return CoreStep(s0 - lr * direction, {"momentum_buffer": buf}, {})
    b1, b2 = options.betas
    eps = options.eps
    step = states["step"] + 1
    counters: Dict[str, Any] = {"step": step}
    m1 = embedding(states["exp_avg"], "exp_avg").lerp_(g, 1 - b1)
    m2 = embedding(states["exp_avg_sq"], "exp_avg_sq").mul_(b2).addcmul_(g, g, value=1 - b2)
    c2 = math.sqrt(1 - b2**step)
    if perp is None:  # the paper's entrywise second moment in all blocks
        denom = (m2.sqrt() / c2).add_(eps)
    else:
        # The basis-rotation blocks Up (new x old directions) and Vp (old x new) have as rows
        # (columns) the fresh columns of orth[U, GV] (orth[V, G^T U]): new directions at every
        # step, so an entrywise second moment has no history there (the transported state is
        # zero on them). They get one scalar second moment each, the EMA of the mean square of
        # their gradient coefficients: invariant under the choice of those columns, hence carried.
        mask, core, up, vp = perp
        count = mask.sum(-1).clamp(min=1).to(g.dtype).square()
        sq = g.square()
        ms = torch.stack([(sq * up).sum((-2, -1)), (sq * vp).sum((-2, -1))], -1) / count.unsqueeze(-1)
        v_perp = counters["exp_avg_sq_perp"] = states["exp_avg_sq_perp"] * b2 + (1 - b2) * ms
        rms_perp = (v_perp.sqrt() / c2 + eps).unsqueeze(-1).unsqueeze(-1)
        denom = torch.where(up, rms_perp[..., 0, :, :], rms_perp[..., 1, :, :])
        denom = torch.where(core, m2.sqrt() / c2 + eps, denom)
    direction = m1 / denom if support is None else torch.where(support, m1 / denom, 0.0)
    return CoreStep(s0 - (lr / (1 - b1**step)) * direction, {"exp_avg": m1, "exp_avg_sq": m2}, counters)


# ---------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------
def cycle_phase(group: dict, state: dict) -> int:
    """This step's place in its augmentation cycle (the group's ``augment_every = k``): 0
    augments, ``1 .. k-1`` train the core in fixed bases; advances the weight's counter. (A
    phase saved under a longer cycle is read modulo ``k``, so changing ``k`` cannot strand a
    weight inside a cycle.)"""
    k = group["augment_every"]
    phase = state.get("phase", 0) % k
    if k > 1:
        state["phase"] = (phase + 1) % k
    return phase


def core_cycle_step(p: Tensor, grad: Tensor, group: dict, state: dict, last: bool, mask: Tensor) -> Tensor:
    r"""A step inside an augmentation cycle: the bases stay, the core optimizer
    (:func:`core_update`) runs on the core with autograd's :math:`dS = U^\top G V` (every block
    of the active core, the new x new one included: the rank grows at first order) and the
    states of these bases (the identity embedding: no transport); on the cycle's ``last`` step
    the core is truncated by the weight's policy and the states follow the kept singular
    vectors. ``mask``: the active columns of ``p`` (first). Returns the new packed point."""
    manifold = p.manifold
    u, s, v = manifold.unpack(p, check=False)
    block = (mask.unsqueeze(-1) * mask.unsqueeze(-2)) > 0
    wd = gradient_decay(group)
    g = manifold.unpack(grad, check=False)[1]
    g = torch.where(block, g + wd * s if wd else g, 0.0)
    s_new, moments, counters = core_update(s, g, core_options(group), state, lambda x, key: x.clone(), support=block)
    state.update(counters)
    if not last:
        state.update(moments)
        return cat_rows(u, s_new, v)
    point, carried = truncate_and_carry(manifold, u, s_new, v, moments, rank_policy(group, block.any(-1), manifold),
                                        group["m2_transport"] == "squared")
    state.update(carried)
    return point
