r"""Dynamical low-rank training (DLRT): one step of a rank-adaptive integrator per optimizer step.

:class:`DLRT` runs :class:`~lowrank_manifolds.integrators.ABCPSI`,
:class:`~lowrank_manifolds.integrators.AugmentedBUG` or
:class:`~lowrank_manifolds.integrators.ParallelBUG` for the gradient flow
:math:`\dot W = -G` with step ``h = lr``, then truncates. Its field takes the tangent part of
:math:`G` from ``p.grad`` and, with ``model=``, the rest from a
:class:`~lowrank_manifolds.optim.GradientRecorder` (the class docstring: one gradient
channel). The conventions are those of :mod:`lowrank_manifolds.optim._base`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._linalg import cat_last, mT, pinv_core
from ..integrators import INTEGRATORS, MatrixField, TangentField
from ._base import (
    capacity_policy,
    core_adam_step,
    cycle_phase,
    LowRankOptimizer,
    adam_update,
    check_betas,

    is_lowrank_parameter,
    rank_policy,
    riemannian_parts,
    sgd_update,
    truncate,
    truncation_options,
)
from .._args import nonneg, positive_int, unit_interval
from .recorder import GradientRecorder

__all__ = ["DLRT"]

#: The integrators DLRT runs (names of :data:`~lowrank_manifolds.integrators.INTEGRATORS`):
#: the rank-adaptive ones that need the field at the current point only.
_SUPPORTED = ("abc-psi", "augmented-bug", "parallel-bug")
# One stateless instance per integrator, shared by every group and step (DLRT applies the
# weights' truncation itself, so the instances hold none).
_INSTANCES = {name: INTEGRATORS[name]() for name in _SUPPORTED}


def _integrator_name(integrator) -> str:
    """The registry name of ``integrator``: a supported name of :data:`INTEGRATORS`, or an
    instance of one of those classes without a truncation of its own (DLRT truncates by the
    weights' policy)."""
    if isinstance(integrator, str):
        if integrator not in _SUPPORTED:
            raise ValueError(f"integrator must be one of {list(_SUPPORTED)} or an instance, got {integrator!r}")
        return integrator
    for name in _SUPPORTED:
        cls = INTEGRATORS[name]
        if type(integrator) is cls:
            if integrator.truncation is not None:
                raise ValueError(
                    f"DLRT truncates by its weights' policy (or its groups' tol, relative, min_rank); pass {cls.__name__}() "
                    f"without a truncation (got {integrator!r})"
                )
            return name
    raise TypeError(
        f"integrator must be one of {list(_SUPPORTED)} or an instance of "
        f"{', '.join(INTEGRATORS[k].__name__ for k in _SUPPORTED)}, got {type(integrator).__name__}"
    )


class DLRT(LowRankOptimizer):
    r"""Dynamical low-rank training: one integrator step per optimizer step.

    For each low-rank weight, one step of size ``h = lr`` of a rank-adaptive DLRA
    integrator for the gradient flow :math:`\dot W = F(W) = -(G + \lambda W)`
    (``G`` the minibatch gradient, :math:`\lambda` = ``weight_decay``), from the current
    factors, followed by the truncation (the weight's policy, capacity ``R``, zero padded).

    Integrators (``integrator=``; per group):

    ``"abc-psi"`` (:class:`~lowrank_manifolds.integrators.ABCPSI`, default)
        :math:`K_1 = US + hFV`, :math:`\hat U = \operatorname{orth}[K_1, U]`,
        :math:`L_1 = V \tilde S^\top + h F^\top \hat U`. Both evaluations are at
        :math:`Y_0`, served by the recorded pair. Cost: **1 forward + 1 backward**,
        products with the pair :math:`O(b(m+n)R)`, QRs of ``m x 2R`` and ``n x R``, one
        ``2R x R`` SVD. Descent at least that of the Riemannian gradient step.
    ``"augmented-bug"`` (:class:`~lowrank_manifolds.integrators.AugmentedBUG`)
        K- and L-steps from :math:`Y_0`, Galerkin S-step in the augmented bases from
        :math:`\hat S_0 = (\hat U^\top U) S (V^\top \hat V)`. The S-step's field is
        :math:`F(\hat U \hat S_0 \hat V^\top)`, and :math:`\hat U \hat S_0 \hat V^\top = Y_0`
        *exactly* (``U``, ``V`` lie in the augmented spans): with the Euler substeps of
        the training codes the S-step needs the gradient at the *same* weights, which
        the recorded pair already applies to :math:`\hat U, \hat V`. So the "second
        evaluation" of DLRT's S-step costs no second forward/backward pass here
        (the original DLRT needed one because autograd on the factors gives
        :math:`G` only against the old bases). Cost: **1 forward + 1 backward**,
        QRs of ``m x 2R`` and ``n x 2R``, one ``2R x 2R`` SVD.
    ``"parallel-bug"`` (:class:`~lowrank_manifolds.integrators.ParallelBUG`, GeoLoRA)
        All substeps from :math:`Y_0`; only :math:`GV` and :math:`G^\top U` are used, so
        the result equals the retraction of :math:`-h P_X(G)` with adaptive rank.
        Cost: **1 forward + 1 backward**, QRs of ``m x 2R``, ``n x 2R``, one
        ``2R x 2R`` SVD.

    ``step(closure)`` calls the closure once (standard ``torch.optim`` semantics, to
    compute the loss and gradients); none of the three integrators needs another
    evaluation. A fixed-rank BUG or KSL *would* (their S-/L-steps are at weights
    different from :math:`Y_0`) and is therefore not offered here.

    The field: one gradient channel. With ``model=`` given, a :class:`GradientRecorder`
    is attached to it. Everything the integrators use comes from ``p.grad`` except the
    one thing ``p.grad`` cannot give: :math:`G` applied to the *new* directions of the
    augmented bases. Split :math:`G = P_X G + N`, :math:`N = (I - UU^\top) G (I - VV^\top)`:

    1. the tangent part :math:`P_X G` is read from ``p.grad``
       (:math:`GV = dU\,S^{-\top}`, :math:`G^\top U = dV\,S^{-1}`, :math:`U^\top G V = dS`),
       so DDP's all-reduce, GradScaler's unscaling, clipping, accumulation and ``p.grad``
       hooks act on it exactly as on any ``torch.optim`` step;
    2. the new directions of the K-step are :math:`Q_u`, an orthonormal basis of the
       complement of ``U`` in :math:`\operatorname{span}[U, (I - UU^\top) GV]` (the last
       columns of the QR of :math:`[U, U_p]`; from ``p.grad``, hence the same on every DDP
       rank; orthogonal to ``U`` even where :math:`U_p` is rank deficient), and the normal part enters
       only as :math:`N' = Q_u Q_u^\top N`, from the recorded pair :math:`G_{rec} = AB^\top`
       as :math:`N^\top Q_u = (I - VV^\top) B (A^\top Q_u)` (``n x r``);
    3. ``p.grad`` must be a scalar multiple :math:`c\,\nabla_{[U;S;V]}` of the gradient the
       recorded pair implies, :math:`(G_{rec} V S^\top,\ U^\top G_{rec} V,\ G_{rec}^\top U S)`;
       :math:`c` (least squares) scales :math:`N'` the same way (clipping, GradScaler's
       ``1 / scale``). Any other edit of ``p.grad`` (a hook adding noise, a regulariser on
       the factors) cannot be applied to the part only the pair knows: the step raises
       before anything is written, and ``model=None`` (the field :math:`-P_X G` from
       ``p.grad`` alone) is the way to train with it.

    The field is :math:`F = -(P_X G + c N') - \lambda W`, a factor pair of width ``2r``
    (that of the tangent field, since :math:`U_p = Q_u R_u`).
    abc-PSI, augmented BUG and parallel BUG only apply :math:`F` to :math:`V`, to
    :math:`U` and to bases inside :math:`\operatorname{span}[U, Q_u]` (resp.
    :math:`[V, Q_v]`), on which :math:`N' = N`: the step equals the step with the exact
    field :math:`-G` (to rounding) and keeps abc-PSI's extra descent
    :math:`\hat U\hat U^\top G - P_X G`. Under DDP (pass the ``DistributedDataParallel``
    module as ``model=``) the ranks all-reduce the pair's products (``(m + 2n) r`` numbers
    per layer, with DDP's averaging) before the check, so every rank takes the same step.
    Checking 3 is a decision: one host synchronisation per step (free on the CPU).

    Weights without a recording (no ``model``, or parameters outside the layers of
    :mod:`lowrank_manifolds.nn`) get the tangent field :math:`-P_X(G)` from ``p.grad``
    (pseudo-inverse of ``S`` on the active block). Parallel BUG is unaffected by this
    (it only uses :math:`P_X G`); for abc-PSI and augmented BUG the step then
    coincides with the metric retraction of :math:`-hP_X G` (they lose their extra
    descent). A warning says so once.

    Padding. The integrators know nothing of capacities; the factors are sliced to the
    largest active rank before the integrator is called (active columns are the leading
    ones after every truncation here). Reading that rank is **one host
    synchronisation per low-rank weight and step** (free on CPU).

    Parameters
    ----------
    params : iterable
    lr : float
        Step size ``h`` of the integrator (and learning rate of ordinary parameters).
    integrator : {"abc-psi", "augmented-bug", "parallel-bug"} or an instance
        A name of :data:`~lowrank_manifolds.integrators.INTEGRATORS` or an instance of its classes (``ABCPSI()``, ...,
        without a truncation: DLRT applies the group's); stored in the group as the name.
    tol, relative, min_rank, fixed_rank
        Truncation, as :class:`GeometricSGD` (the weights' own by default).
    rank_tol, rank_relative
        Deprecated names of ``tol`` and ``relative``.
    weight_decay : float
        Added to the field (low-rank) and as L2 / decoupled (ordinary parameters).
    euclidean : {"sgd", "adam", "adamw"}
        Update of ordinary parameters; ``momentum``, ``betas``, ``eps`` configure it.
    core : {"flow", "momentum", "adam"}
        The update of the low-rank weights' coefficients. ``"flow"`` (default): the
        integrator's own step, plain gradient flow with ``h = lr``. ``"momentum"`` and
        ``"adam"``: the integrator gives the augmented bases :math:`\hat U, \hat V` only,
        and the core is trained on the Galerkin coefficients of the field, as the authors'
        code trains the augmented core (RobustDLRT, augmented-BUG layers with AdamW)::

            M = U^^T U,  N = V^T V^,  S^_0 = M S N            (the point in the new bases)
            G^ = -U^^T F V^                                  (all blocks: the new x new one
                                                              grows the rank at first order)
            momentum:  b <- momentum * (M b N) + G^,         S^ = S^_0 - lr b
            adam:      m <- b1 (M m N) + (1 - b1) G^,
                       v <- b2 (M*M) v (N*N) + (1 - b2) G^*G^  (squared transport, cannot cancel)
                       S^ = S^_0 - lr m_hat / (sqrt(v_hat) + eps)
            truncate S^ = P diag(s) Q^T; states -> P_r^T . Q_r (v with P_r*P_r, Q_r*Q_r)

        with ``momentum``, ``betas``, ``eps`` as for ordinary parameters. States ``R x R``.
        With ``augment_every = k > 1`` (``core="adam"``) the authors' cycle: this step keeps
        every direction the capacity holds, the next ``k - 1`` steps run Adam on the core in
        fixed bases (autograd's ``dS``), the last of them truncates by the weight's policy
        (as :class:`GeometricAdam`'s ``augment_every``).
        Needs ``integrator="augmented-bug"``: its bases contain ``U`` and ``V`` (so
        :math:`\hat U \hat S_0 \hat V^\top` is the point) and leave no block of
        :math:`\hat G` zero only to rounding (parallel BUG's QR of ``[U, K]`` does: Adam would
        turn that rounding into full steps; :class:`GeometricAdam` is that method with exact
        zeros). abc-PSI's ``V^`` does not contain ``V``.
    model : nn.Module, optional
        Attach a :class:`GradientRecorder` to this model. A
        ``torch.nn.parallel.DistributedDataParallel`` module is recorded through its
        ``module``, and its process group averages the recorded products.
    grad_rtol : float, optional
        Relative tolerance of the check that ``p.grad`` is a scalar multiple of the
        recorded gradient; default ``10 * sqrt(eps)`` of the weight's dtype.
    """

    def __init__(
        self,
        params,
        lr: float,
        integrator="abc-psi",
        *,
        tol: Optional[float] = None, relative: Optional[bool] = None, min_rank: Optional[int] = None,
        fixed_rank: bool = False,
        weight_decay: float = 0.0,
        euclidean: str = "sgd",
        momentum: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        model: Optional[nn.Module] = None,
        grad_rtol: Optional[float] = None,
        core: str = "flow",
        augment_every: int = 1,
        **deprecated: Any,
    ):
        defaults = dict(
            truncation_options(type(self).__name__, tol, relative, min_rank, fixed_rank, deprecated),
            lr=lr, integrator=integrator, weight_decay=weight_decay, euclidean=euclidean, momentum=momentum,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps, core=core,
            augment_every=augment_every,
        )
        super().__init__(params, defaults)
        self._process_group = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self._process_group = model.process_group
            model = model.module
        self._recorder = GradientRecorder(model) if model is not None else None
        self._grad_rtol = None if grad_rtol is None else nonneg(grad_rtol, "grad_rtol")
        self._fields: Dict[int, MatrixField] = {}
        self._active: Dict[int, Tuple[Tensor, int]] = {}  # per step: mask and width of each weight
        self._warned = False

    def __getstate__(self):
        # torch.optim.Optimizer keeps only defaults, state and param_groups; a copy of a DLRT
        # keeps its recorder (which then hooks the copied layers) and its settings too.
        state = super().__getstate__()
        state.update(
            _recorder=self._recorder, _process_group=self._process_group,
            _grad_rtol=self._grad_rtol, _warned=self._warned,
        )
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fields, self._active = {}, {}

    @property
    def recorder(self) -> Optional[GradientRecorder]:
        """The :class:`GradientRecorder` attached to ``model`` (or None)."""
        return self._recorder

    def _check_group(self, group):
        super()._check_group(group)
        group["integrator"] = _integrator_name(group["integrator"])
        if group["euclidean"] not in ("sgd", "adam", "adamw"):
            raise ValueError(f"euclidean must be 'sgd', 'adam' or 'adamw', got {group['euclidean']!r}")
        unit_interval(group["momentum"], "momentum")
        group.setdefault("core", "flow")
        if group["core"] not in ("flow", "momentum", "adam"):
            raise ValueError(f"core must be 'flow', 'momentum' or 'adam', got {group['core']!r}")
        group.setdefault("augment_every", 1)
        positive_int(group["augment_every"], "augment_every")
        if group["augment_every"] > 1 and (group["core"] != "adam" or group["fixed_rank"]):
            raise ValueError("augment_every > 1 is the cycle of core='adam' (and grows the rank: not with fixed_rank)")
        if group["core"] != "flow" and group["integrator"] != "augmented-bug":
            raise ValueError(
                f"core={group['core']!r} trains the core in augmented BUG's bases: use "
                "integrator='augmented-bug' (abc-PSI's V^ does not contain V; parallel BUG's bases make "
                "blocks of G^ zero only to rounding, which Adam would turn into full steps: "
                "GeometricAdam is that method with the zeros exact)"
            )
        check_betas(group["betas"])
        nonneg(group["eps"], "eps")

    def _euclidean_step(self, p, grad, group, state):
        if group["euclidean"] == "sgd":
            sgd_update(p, grad, state, group["lr"], group["momentum"], 0.0, False, group["weight_decay"])
        else:
            adam_update(
                p, grad, state, group["lr"], group["betas"], group["eps"], group["weight_decay"],
                group["euclidean"] == "adamw",
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient; ``closure`` as in ``torch.optim``.

        The recorded weights' fields are built and checked against ``p.grad`` for all
        weights first (class docstring, "one gradient channel"), so a refused ``p.grad``
        edit raises before any parameter or state is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._fields = self._recorded_fields()
            super().step()
        finally:
            self._fields, self._active = {}, {}
        return loss

    def _recorded_fields(self) -> Dict[int, MatrixField]:
        """The field of every recorded low-rank weight with a gradient (keyed by ``id``),
        after one check of all of them against ``p.grad`` (one host synchronisation)."""
        if self._recorder is None:
            return {}
        fields, checks = {}, []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not is_lowrank_parameter(p):
                    continue
                pair = self._recorder.pair(p)
                if pair is None:
                    continue
                field, residual = self._reconciled_field(p, p.grad, pair, group["weight_decay"])
                fields[id(p)] = field
                checks.append((p, residual))
        if checks:
            # NaN compares False: a non-finite gradient is left to the finiteness check.
            bad = torch.stack([res for _, res in checks]) > 1
            if bool(bad.any()):  # host sync: whether the step may be taken
                i = int(bad.nonzero()[0, 0])
                p = checks[i][0]
                raise RuntimeError(
                    f"DLRT: the gradient of the low-rank weight of shape {tuple(p.shape)} is not a "
                    "scalar multiple of the gradient recorded from the layer's forward and backward "
                    "pass (relative mismatch above grad_rtol): p.grad was edited by something other "
                    "than a uniform scaling (DDP, GradScaler, clipping are fine), e.g. a gradient hook, "
                    "a loss term on the factors, or a DDP model not passed as model=. Pass model=None "
                    "to take the step from p.grad alone (field -P_X G)."
                )
        return fields

    def _reconciled_field(self, p: Tensor, grad: Tensor, pair, weight_decay: float):
        r"""The field :math:`-(P_X G + c N') - \lambda W` of a recorded weight and the
        relative residual of :math:`p.grad \approx c \nabla_{rec}` divided by the
        tolerance (a 0-d tensor; > 1 means refused). See the class docstring."""
        manifold = p.manifold
        r = self._active_of(p)[1]
        u, s, v = (t[..., :r, :r] if i == 1 else t[..., :r] for i, t in enumerate(manifold.unpack(p, check=False)))
        du, ds, dv = (t[..., :r, :r] if i == 1 else t[..., :r] for i, t in enumerate(manifold.unpack(grad, check=False)))
        a, b = pair
        # the tangent part from p.grad
        s_inv = pinv_core(s, manifold.pinv_rtol(s.dtype))  # as egrad2rgrad: a zero s_i freezes nothing
        gv, gtu = du @ mT(s_inv), dv @ s_inv  # G V = dU S^{+T}, G^T U = dV S^{+}
        up, vp = gv - u @ ds, gtu - v @ mT(ds)
        # The K-step's new directions: Q_u, orthonormal and orthogonal to U (the last columns of
        # the QR of [U, Up]; a QR of Up alone would fill a rank-deficient Up with columns that
        # are not), so that Q_u Q_u^T is a projection inside the complement of U; Up = Q_u R_u.
        q_u = torch.linalg.qr(cat_last(u, up))[0][..., r:]
        r_u = mT(q_u) @ up
        # what only the pair knows, and its tangent products for the check
        gv_rec = a @ (mT(b) @ v)
        both = b @ (mT(a) @ cat_last(u, q_u))  # one product for both (q_u has min(m, 2r) - r columns)
        gtu_rec, btq = both[..., :r], both[..., r:]
        if self._process_group is not None:
            gv_rec, gtu_rec, btq = self._average(gv_rec, gtu_rec, btq)
        ntq = btq - v @ (mT(v) @ btq)  # N^T Q_u = (I - VV^T) B A^T Q_u
        # least squares p.grad ~ c * (G_rec V S^T, U^T G_rec V, G_rec^T U S), blockwise
        got, rec = (du, ds, dv), (gv_rec @ mT(s), mT(u) @ gv_rec, gtu_rec @ s)
        dot = sum(torch.linalg.vecdot(g.flatten(), q.flatten()) for g, q in zip(got, rec))
        rr = sum(torch.linalg.vecdot(q.flatten(), q.flatten()) for q in rec)
        gg = sum(torch.linalg.vecdot(g.flatten(), g.flatten()) for g in got)
        tiny = torch.finfo(p.dtype).tiny
        c = torch.where(rr > 0, dot / rr.clamp(min=tiny), torch.ones_like(rr))
        res2 = sum(torch.linalg.vecdot(d.flatten(), d.flatten()) for d in (g - c * q for g, q in zip(got, rec)))
        rtol = self._grad_rtol if self._grad_rtol is not None else 10 * math.sqrt(torch.finfo(p.dtype).eps)
        residual = res2.sqrt() / (rtol * gg.sqrt().clamp(min=tiny))
        mm = ds + weight_decay * s if weight_decay else ds  # P_X(W) = U S V^T: only M
        # P_X G + c N' = U (M V^T + Vp^T) + Q_u (R_u V^T + c (N^T Q_u)^T): a pair of width 2r
        field = MatrixField((cat_last(u, q_u), -cat_last(v @ mT(mm) + vp, v @ mT(r_u) + c * ntq)))
        return field, residual

    def _average(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """All-reduce ``tensors`` over the DDP process group with DDP's averaging."""
        import torch.distributed as dist

        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat, group=self._process_group)
        flat /= dist.get_world_size(self._process_group)
        return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))

    def _active_of(self, p: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, int]:
        """``(mask, r)``: the 0/1 active columns of ``p`` (``mask`` if given) and its largest
        active rank ``r`` (the integrators take unpadded factors, active columns first), once
        per weight and step: at fixed rank the rank (no sync), with a capacity one host sync."""
        cached = self._active.get(id(p))
        if cached is not None:
            return cached
        manifold = p.manifold
        if mask is None:
            mask = manifold.active_mask(manifold.unpack(p, check=False)[0])
        r = max(int(mask.sum(-1).max()), 1) if manifold.adaptive else manifold.capacity
        self._active[id(p)] = (mask, r)
        return mask, r

    def field_for(self, p: Tensor, grad: Tensor, weight_decay: float = 0.0, rank: Optional[int] = None):
        r"""The field :math:`F = -(G + \lambda W)` of a low-rank weight at its current
        point, for the factors sliced to their first ``rank`` columns (default: all), as
        the integrators take it: the reconciled recorded field (a :class:`MatrixField`,
        class docstring) or the tangent field :math:`-P_X(G + \lambda W)` from ``p.grad``
        (a :class:`TangentField`)."""
        r = p.manifold.capacity if rank is None else rank
        field = self._fields.get(id(p))
        if field is None and self._recorder is not None:
            pair = self._recorder.pair(p)
            if pair is not None:
                field = self._reconciled_field(p, grad, pair, weight_decay)[0]
        if field is not None:
            return field
        self._warn_unrecorded()
        return self._tangent_field(riemannian_parts(p, grad, p.manifold), r, weight_decay)

    def _warn_unrecorded(self) -> None:
        if not self._warned:
            warnings.warn(
                "DLRT: no recorded (x, dY) for a low-rank weight (no model= given, or not a "
                "LowRankLinear / LowRankConv2d / LowRankAdapterLinear); its field is -P_X(G) from autograd, "
                "with which abc-PSI and augmented BUG reduce to a retraction step",
                RuntimeWarning,
                stacklevel=5,
            )
            self._warned = True

    @staticmethod
    def _tangent_field(parts, r: int, weight_decay: float) -> TangentField:
        r""":math:`-P_X(G + \lambda W)` from :func:`riemannian_parts`, sliced to ``r`` columns."""
        u, s, v, _, ds, gv, gtu = parts
        up = gv - u @ ds
        vp = gtu - v @ mT(ds)
        mm = ds + weight_decay * s if weight_decay else ds  # P_X(W) = U S V^T: only M
        return TangentField(u[..., :r], v[..., :r], -up[..., :r], -mm[..., :r, :r], -vp[..., :r])

    def _lowrank_step(self, p, grad, group, state):
        k = group["augment_every"]
        phase = cycle_phase(group, state)
        if phase > 0:  # inside a cycle of core="adam": Adam on the core, bases fixed
            return core_adam_step(p, grad, group, state, phase == k - 1)
        manifold = p.manifold
        field = self._fields.get(id(p))  # recorded: built and checked before any step
        if field is None:  # the tangent field from p.grad
            parts = riemannian_parts(p, grad, manifold)
            (u, s, v, mask), r = parts[:4], self._active_of(p, parts[3])[1]
            self._warn_unrecorded()
            field = self._tangent_field(parts, r, group["weight_decay"])
        else:
            u, s, v = manifold.unpack(p, check=False)
            mask, r = self._active_of(p)
        integrator = _INSTANCES[group["integrator"]]
        u, s, v = u[..., :r], s[..., :r, :r], v[..., :r]
        uh, sh, vh = integrator.augmented_step(u, s, v, field, group["lr"])
        if group["core"] != "flow":
            sh, states = self._core_update(u, s, v, uh, vh, field, group, state)
        policy = rank_policy(group, mask, manifold) if k == 1 else (capacity_policy(manifold), None)
        u1, s1, v1, p_r, q_r = truncate(uh, sh, vh, *policy)
        if group["core"] != "flow":
            for key, x in states.items():  # the coefficient states follow the kept directions
                sq = key == "exp_avg_sq"
                state[key] = mT(p_r * p_r if sq else p_r) @ x @ (q_r * q_r if sq else q_r)
        self._write(p, u1, s1, v1)

    @staticmethod
    def _core_update(u, s, v, uh, vh, field, group, state):
        """``core="momentum"|"adam"`` (class docstring): the augmented core ``S^`` and the
        coefficient states in the augmented bases."""
        a, b = field.evaluate(u, s, v, 0.0)  # F = A B^T (recorded or tangent field)
        mu, nv = mT(uh) @ u, mT(v) @ vh  # M = U^^T U, N = V^T V^
        s0 = mu @ s @ nv
        g = -(mT(uh) @ a) @ (mT(b) @ vh)  # G^ = -U^^T F V^
        r, lr = u.shape[-1], group["lr"]
        state["step"] = state.get("step", 0) + 1

        def embedded(key):  # a state of the old bases in the augmented ones (None on the first step)
            x = state.get(key)
            if x is None:
                return None
            sq = key == "exp_avg_sq"
            return (mu * mu if sq else mu) @ x[..., :r, :r] @ (nv * nv if sq else nv)

        if group["core"] == "momentum":
            buf = embedded("momentum_buffer")
            buf = g if buf is None else buf.mul_(group["momentum"]).add_(g)
            return s0 - lr * buf, {"momentum_buffer": buf}
        b1, b2 = group["betas"]
        t = state["step"]
        m1, m2 = embedded("exp_avg"), embedded("exp_avg_sq")
        m1 = (1 - b1) * g if m1 is None else m1.lerp_(g, 1 - b1)
        m2 = (1 - b2) * g * g if m2 is None else m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        direction = m1 / (m2.sqrt() / math.sqrt(1 - b2**t) + group["eps"])
        return s0 - (lr / (1 - b1**t)) * direction, {"exp_avg": m1, "exp_avg_sq": m2}
