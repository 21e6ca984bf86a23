r"""The low-rank optimizer family :class:`DLRT`: a basis update, an optimizer on the core, truncation.

One step for a low-rank weight :math:`X = U S V^\top` (capacity ``R``, gradient ``G``):

* the *basis update* (``integrator=``) gives augmented orthonormal bases
  :math:`\hat U \supseteq U`, :math:`\hat V \supseteq V` and the coefficients of the point
  and of the gradient in them: the tangent augmentation
  :math:`\hat U = \operatorname{orth}[U, GV]`, :math:`\hat V = \operatorname{orth}[V, G^\top U]`
  with exact block zeros (``"parallel-bug"``; it uses only :math:`P_X G`, read from
  ``p.grad``), or one step of :class:`~lowrank_manifolds.integrators.AugmentedBUG` /
  :class:`~lowrank_manifolds.integrators.ABCPSI`, whose field takes the tangent part of
  :math:`G` from ``p.grad`` and, with ``model=``, the rest from a
  :class:`~lowrank_manifolds.optim.GradientRecorder` (the class docstring: one gradient
  channel);
* the *core optimizer* (``core=``): the integrator's own S-step (gradient flow, ``h = lr``),
  heavy ball or Adam(W) on the coefficients, with the states (``R x R``) carried into the
  augmented coordinates;
* the *truncation* by the weight's policy, the states following the kept singular vectors;
* the *schedule* (``augment_every=``): every step, or the authors' cycle of one augmentation
  and ``k - 1`` core-only steps in fixed bases.

The parts shared by every basis are in :mod:`~lowrank_manifolds.optim._core`;
:class:`~lowrank_manifolds.optim.GeometricSGD` and
:class:`~lowrank_manifolds.optim.GeometricAdam` (:mod:`~lowrank_manifolds.optim.geometric`)
are configurations of this class. The conventions are those of
:mod:`lowrank_manifolds.optim._base`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim.optimizer import _default_to_fused_or_foreach

from .._linalg import cat_last, mT, qr, qr_kept_first
from ..integrators import INTEGRATORS, MatrixField, TangentField
from ._base import (
    LowRankOptimizer,
    active_first,
    adam_update,
    capacity_policy,
    check_betas,
    is_lowrank_parameter,
    rank_policy,
    sgd_update,
    truncation_options,
)
from ._core import (
    core_cycle_step,
    core_options,
    core_update,
    cycle_phase,
    embed,
    field_augment,
    gradient_decay,
    init_state,
    tangent_augment,
    truncate_and_carry,
)
from ._faults import Layout, count, floating, pow2_scale, square_limit
from .._args import nonneg, positive_int, unit_interval, user_stacklevel
from ..manifold import FixedRankManifold
from .recorder import GradientRecorder

__all__ = ["DLRT"]

#: The integrators DLRT runs (names of :data:`~lowrank_manifolds.integrators.INTEGRATORS`):
#: the rank-adaptive ones that need the field at the current point only.
_SUPPORTED = ("abc-psi", "augmented-bug", "parallel-bug")
# One stateless instance per integrator, shared by every group and step (DLRT applies the
# weights' truncation itself, so the instances hold none).
_INSTANCES = {name: INTEGRATORS[name]() for name in _SUPPORTED}
#: The ordinary parameters' rate beside a flow core's step size (``euclidean_lr``).
_FLOW_EUCLIDEAN_LR = 1e-3


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
    r"""The low-rank optimizer family: basis update, core optimizer, truncation, schedule.

    Configurations (configuration -> algorithm -> source)::

        GeometricSGD                  tangent augmentation (parallel BUG's bases, exact zeros),
          = DLRT("parallel-bug",      heavy ball on the coefficients, truncation, transport
                 core="momentum")     -> Schotthöfer, Klein, Kusch, "A geometric framework for
                                         momentum-based optimizers for low-rank training",
                                         NeurIPS 2025 (geometric heavy ball)
        GeometricAdam                 tangent augmentation, Adam(W) on the coefficients,
          = DLRT("parallel-bug",      truncation, transport
                 core="adam")         -> Schotthöfer, Klein, Kusch, NeurIPS 2025 (geometric Adam)
        GeometricAdam(augment_every   augment every k steps, Adam(W) on the augmented core in
                      =k)             fixed bases in between, truncate at the cycle's end
                                      -> the authors' code: RobustDLRT, lr_layer_augBUG.py
                                         (augment every num_local_iter batches)
        DLRT("abc-psi")               abc-PSI step of the gradient flow, h = lr
                                      -> Kusch, Schotthöfer, Walter, arXiv:2502.03006 (2025)
        DLRT("augmented-bug")         rank-adaptive BUG step (Galerkin S-step), h = lr
                                      -> Ceruti, Kusch, Lubich, BIT 62 (2022)
        DLRT("parallel-bug")          parallel BUG = retraction of -h P_X G (GeoLoRA's step)
                                      -> Ceruti, Kusch, Lubich, SISC 46 (2024); GeoLoRA
        DLRT("augmented-bug",         augmented BUG's bases, heavy ball / Adam on the Galerkin
             core="momentum"|"adam")  coefficients in [U, new] x [V, new] coordinates
                                      -> the momentum flow of Schotthöfer et al. 2025 in BUG's
                                         bases; RobustDLRT's augmented-BUG layers (AdamW)
        ... augment_every=k           with the cycle (core-only steps in fixed bases)
                                      -> RobustDLRT, lr_layer_augBUG.py

    One step, for each low-rank weight (``U``, ``S``, ``V`` its active factors,
    :math:`\lambda` = ``weight_decay``, ``G`` the minibatch gradient)::

        basis update (integrator):
          "parallel-bug":   U^ = orth[U, GV], V^ = orth[V, G^T U]  (exact block zeros, _core)
                            S^_0 = diag(S, 0), G^ = U^^T P_X(G) V^, states embedded by zero padding
          "augmented-bug":  U^ = orth[K_1, U], V^ = orth[L_1, V]  (K_1 = US - hGV, L_1 = VS^T - hG^T U)
                            flow: its own S-step; momentum / adam: the same spans as
                            [U, orth((I-UU^T) GV)], [V, orth((I-VV^T) G^T U)] (_core.field_augment),
                            S^_0 = diag(S, 0), G^ = U^^T G V^ (every block but the exact zeros),
                            states embedded by zero padding
          "abc-psi":        abc-PSI's own step (flow only: its V^ does not contain V)
        core (coefficients, _core.core_update):
          "flow":           the integrator's own S-step, S^ = S^_0 - lr G^ (+ lambda S^_0)
          "momentum":       b = momentum b + (1 - dampening) G^     (first step b = G^; torch.optim.SGD)
                            S^ = S^_0 - lr (G^ + momentum b if nesterov else b)
          "adam":           m1 = b1 m1 + (1-b1) G^, m2 = b2 m2 + (1-b2) G^*G^, t += 1
                            S^ = S^_0 - lr/(1-b1^t) m1 / (sqrt(m2/(1-b2^t)) + eps)
          weight decay:     L2 (lambda S^_0 added to G^), or with decoupled_weight_decay
                            S^_0 <- (1 - lr lambda) S^_0 (AdamW; momentum and adam cores)
        truncation:         S^ = P diag(s) Q^T, rank by the weight's policy;
                            U1 = U^ P_r, S1 = diag(s_r), V1 = V^ Q_r
                            states m -> P_r^T m Q_r (second moment: m2_transport)
        schedule (augment_every = k > 1, momentum and adam cores):
          step 0:           as above, truncated to the capacity only (the new directions survive)
          steps 1 .. k-1:   bases fixed, the core optimizer on S with autograd's dS = U^T G V
                            (every block of the active core) and the states of these bases;
                            step k-1 truncates by the weight's policy, states transported

    Basis updates (``integrator=``; per group):

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
        the result equals the retraction of :math:`-h P_X(G)` with adaptive rank. It is
        computed by the tangent augmentation of :mod:`~lowrank_manifolds.optim._core` for
        every core (the flow is its ``S^ = S^_0 - lr G^``): the same augmented matrix as the
        integrator's, with the blocks that vanish in exact arithmetic exactly zero (Adam's
        entrywise division would turn rounding-level ones into full steps), no recorded
        field (nothing of :math:`G` beyond :math:`P_X G` is used, so no warning without
        ``model=``) and no host synchronisation. Cost: **1 forward + 1 backward**, QRs of
        ``m x 2R``, ``n x 2R``, one ``2R x 2R`` SVD.

    ``step(closure)`` calls the closure once (standard ``torch.optim`` semantics, to
    compute the loss and gradients); none of the three integrators needs another
    evaluation. A fixed-rank BUG or KSL *would* (their S-/L-steps are at weights
    different from :math:`Y_0`) and is therefore not offered here.

    The field (abc-PSI, augmented BUG): one gradient channel. With ``model=`` given, a
    :class:`GradientRecorder` is attached to it. Everything the integrators use comes from
    ``p.grad`` except the one thing ``p.grad`` cannot give: :math:`G` applied to the *new*
    directions of the augmented bases. Split :math:`G = P_X G + N`,
    :math:`N = (I - UU^\top) G (I - VV^\top)`:

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
    abc-PSI and augmented BUG only apply :math:`F` to :math:`V`, to
    :math:`U` and to bases inside :math:`\operatorname{span}[U, Q_u]` (resp.
    :math:`[V, Q_v]`), on which :math:`N' = N`: the step equals the step with the exact
    field :math:`-G` (to rounding) and keeps abc-PSI's extra descent
    :math:`\hat U\hat U^\top G - P_X G`. Under DDP (pass the ``DistributedDataParallel``
    module as ``model=``) the ranks all-reduce the pair's products (``(m + 2n) r`` numbers
    per layer, with DDP's averaging) before the check, so every rank takes the same step.
    Checking 3 is a decision: one host synchronisation per step (free on the CPU). The
    field is built at augmentation steps only (not for parallel BUG, not inside a cycle).

    Weights without a recording (no ``model``, or parameters outside the layers of
    :mod:`lowrank_manifolds.nn`) get the tangent field :math:`-P_X(G)` from ``p.grad``
    (pseudo-inverse of ``S`` on the active block); abc-PSI and augmented BUG then
    coincide with the metric retraction of :math:`-hP_X G` (they lose their extra
    descent). A warning says so once.

    Padding. Ranks are masks: abc-PSI and augmented BUG get the padded factors and the
    active columns (``augmented_step(..., active=mask)``), so each point of a weight, and
    each point of a batch of points of different active ranks, steps its active factors
    alone (its ``2r`` augmented directions lead the bases; the completing directions carry
    exactly nothing, and the core optimizer's support excludes them). No rank is read on the
    host for this; the recorded field's construction (``model=``) still reads the weight's
    active rank once per step (free on CPU), as does the consistency check it needs.

    Parameters
    ----------
    params : iterable
    lr : float
        Step size ``h`` of the integrator / learning rate of the core (and of ordinary
        parameters).
    integrator : {"abc-psi", "augmented-bug", "parallel-bug"} or an instance
        The basis update: a name of :data:`~lowrank_manifolds.integrators.INTEGRATORS` or an
        instance of its classes (``ABCPSI()``, ..., without a truncation: DLRT applies the
        group's); stored in the group as the name.
    tol, relative, min_rank, fixed_rank
        Truncation, as :class:`GeometricSGD` (the weights' own by default).
    rank_tol, rank_relative
        Deprecated names of ``tol`` and ``relative``.
    weight_decay : float
        L2: added to the field / the gradient coefficients (low-rank) and to the gradient of
        ordinary parameters (decoupled for ``euclidean="adamw"``).
    decoupled_weight_decay : bool
        With ``core="momentum"`` or ``"adam"``: the low-rank core is scaled by
        ``1 - lr * weight_decay`` instead (AdamW). For the flow both are the same step.
    euclidean : {"sgd", "adam", "adamw"}, optional
        Update of ordinary parameters (biases, dense layers): ``torch.optim.SGD`` / ``Adam`` /
        ``AdamW``, configured by ``momentum``, ``dampening``, ``nesterov``, ``betas``, ``eps``.
        Default: tied to the core, ``"sgd"`` for ``core="momentum"``, else ``"adam"``
        (``"adamw"`` with ``decoupled_weight_decay``).
    euclidean_lr : float, optional
        Learning rate of the ordinary parameters. Default: the group's ``lr``, except where
        ``lr`` is an integrator step size ``h`` (``core="flow"``) and the group holds a
        low-rank weight: there ``1e-3``, ``torch.optim.Adam``'s default (a step ``h`` of
        order 1 would throw dense weights away). A group of ordinary parameters alone takes
        its ``lr``. LR schedulers scale ``lr`` only: to schedule the ordinary parameters under
        the flow core, give them their own group.
    core : {"flow", "momentum", "adam"}
        The core optimizer (above), with ``momentum``, ``dampening``, ``nesterov`` (heavy
        ball, ``torch.optim.SGD``'s convention) or ``betas``, ``eps`` (Adam). States
        ``R x R``. ``"momentum"`` and ``"adam"`` need bases that contain ``U`` and ``V`` (so
        that :math:`\hat U \hat S_0 \hat V^\top` is the point): ``"parallel-bug"`` or
        ``"augmented-bug"``, not abc-PSI.
    momentum, dampening : float
        As ``torch.optim.SGD`` (``momentum`` in ``[0, 1)``).
    nesterov : bool
    betas, eps
        As ``torch.optim.Adam``.
    m2_transport : {"squared", "sqrt"}
        The second moment through a truncation's change of coordinates:
        :func:`~lowrank_manifolds.optim._core.carry`
        (see :class:`GeometricAdam`); ``"sqrt"`` only with ``core="adam"``. The squared
        transport is blind to the signs of the basis columns; the square-root one is not
        (its result depends on that arbitrary choice, tested with the code's convention).
    perp_second_moment : {"entrywise", "scalar"}
        :class:`GeometricAdam`'s option, for ``integrator="parallel-bug"``, ``core="adam"``
        only (its blocks are those of the tangent augmentation).
    augment_every : int
        The schedule (above); ``k > 1`` needs a momentum or Adam core and ``fixed_rank=False``.
    model : nn.Module, optional
        Attach a :class:`GradientRecorder` to this model. A
        ``torch.nn.parallel.DistributedDataParallel`` module is recorded through its
        ``module``, and its process group averages the recorded products. Only the weights
        whose next step evaluates a field are recorded (not those of parallel BUG groups, nor
        in the core-only steps of a cycle).
    grad_rtol : float, optional
        Relative tolerance of the check that ``p.grad`` is a scalar multiple of the
        recorded gradient; default ``10 * sqrt(eps)`` of the weight's dtype. Only with
        ``model=`` (refused without: it would do nothing).
    foreach : bool, optional
        As in ``torch.optim``: ``None`` (default) or ``True`` step the low-rank weights of a
        param group that share shape, dtype, device, manifold configuration and state
        layout together, as one batch (one QR, SVD, ... call per shape group instead of
        per weight; each weight keeps its own active rank, as a mask; recorded weights batch
        with those whose recorded pairs have their shape, and their fields are built and
        checked on the stacked pairs, at most :attr:`pair_stack_bytes` of pairs per batch),
        and the ordinary parameters with torch's multi-tensor SGD/Adam (on the CPU too,
        where torch's own default is its per-parameter loop); ``False`` steps them one by one
        (the reference). The results agree to rounding.
    """

    #: The most bytes of recorded pairs ``(x, dY)`` one batch of recorded weights copies when
    #: it stacks them (64 MiB): larger shape groups are stepped in several batches, so that
    #: the step's memory stays within the recorded activations plus this.
    pair_stack_bytes: int = 64 * 2**20

    def __init__(
        self,
        params,
        lr: float,
        integrator="abc-psi",
        *,
        tol: Optional[float] = None, relative: Optional[bool] = None, min_rank: Optional[int] = None,
        fixed_rank: bool = False,
        weight_decay: float = 0.0,
        euclidean: Optional[str] = None,
        euclidean_lr: Optional[float] = None,
        momentum: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        model: Optional[nn.Module] = None,
        grad_rtol: Optional[float] = None,
        core: str = "flow",
        augment_every: int = 1,
        dampening: float = 0.0,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        m2_transport: str = "squared",
        perp_second_moment: str = "entrywise",
        foreach: Optional[bool] = None,
        **deprecated: Any,
    ):
        defaults = dict(
            truncation_options(type(self).__name__, tol, relative, min_rank, fixed_rank, deprecated),
            lr=lr, integrator=integrator, weight_decay=weight_decay, euclidean=euclidean,
            euclidean_lr=euclidean_lr, momentum=momentum,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps, core=core,
            augment_every=augment_every, dampening=dampening, nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay, m2_transport=m2_transport,
            perp_second_moment=perp_second_moment, foreach=foreach,
        )
        if grad_rtol is not None and model is None:
            raise ValueError("grad_rtol is the tolerance of the check of p.grad against the gradient recorded "
                             "from model=: without model= there is nothing to check (it would do nothing)")
        super().__init__(params, defaults)
        self._process_group = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self._process_group = model.process_group
            model = model.module
        self._recorder = GradientRecorder(model) if model is not None else None
        self._group_of: Tuple[tuple, Dict[int, dict]] = ((), {})  # id(param) -> its group, for the recorder
        if self._recorder is not None:
            self._recorder.wants = self._wants_record
        self._grad_rtol = None if grad_rtol is None else nonneg(grad_rtol, "grad_rtol")
        # per step, for the recorded weights: their pairs (by weight), and for each batch of them
        # (by its first weight) the field and the stacked point, gradient and mask
        self._pairs: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._fields: Dict[int, MatrixField] = {}
        self._points: Dict[int, Tuple[tuple, Tuple[Tensor, Tensor, Tensor]]] = {}
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
        self._pairs, self._fields, self._points = {}, {}, {}
        self._group_of: Tuple[tuple, Dict[int, dict]] = ((), {})  # id(param) -> its group, for the recorder
        if self._recorder is not None:
            self._recorder.wants = self._wants_record

    @property
    def recorder(self) -> Optional[GradientRecorder]:
        """The :class:`GradientRecorder` attached to ``model`` (or None)."""
        return self._recorder

    def _loaded_group(self, saved, current):
        if "euclidean_lr" not in saved and saved.get("core", "flow") == "flow":
            # saved before the option: the ordinary parameters stepped at the group's lr
            saved = {**saved, "euclidean_lr": saved.get("lr"), "euclidean": saved.get("euclidean", "sgd")}
        return super()._loaded_group(saved, current)

    def _configure(self, group):
        if group["euclidean"] is None:  # ordinary parameters follow the core
            group["euclidean"] = ("sgd" if group["core"] == "momentum"
                                  else "adamw" if group["decoupled_weight_decay"] else "adam")

    def _check_group(self, group):
        super()._check_group(group)
        group["integrator"] = _integrator_name(group["integrator"])
        if group["euclidean"] not in ("sgd", "adam", "adamw"):
            raise ValueError(f"euclidean must be 'sgd', 'adam' or 'adamw', got {group['euclidean']!r}")
        if group["euclidean_lr"] is not None:
            nonneg(group["euclidean_lr"], "euclidean_lr")
        unit_interval(group["momentum"], "momentum")
        nonneg(group["dampening"], "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
        check_betas(group["betas"])
        nonneg(group["eps"], "eps")
        if group["core"] not in ("flow", "momentum", "adam"):
            raise ValueError(f"core must be 'flow', 'momentum' or 'adam', got {group['core']!r}")
        if group["core"] != "flow" and group["integrator"] == "abc-psi":
            raise ValueError(
                f"core={group['core']!r} trains the core in augmented bases that contain U and V: use "
                "integrator='augmented-bug' or 'parallel-bug' (abc-PSI's V^ does not contain V, so "
                "U^ S^_0 V^^T would not be the point)"
            )
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")
        positive_int(group["augment_every"], "augment_every")
        if group["augment_every"] > 1 and group["core"] == "flow":
            raise ValueError("augment_every > 1 is the cycle of core='momentum' or core='adam', not of the flow")
        if group["augment_every"] > 1 and group["fixed_rank"]:
            raise ValueError("augment_every > 1 grows the rank inside a cycle: it needs fixed_rank=False")
        if group["m2_transport"] not in ("sqrt", "squared"):
            raise ValueError(f"m2_transport must be 'sqrt' or 'squared', got {group['m2_transport']!r}")
        if group["m2_transport"] != "squared" and group["core"] != "adam":
            raise ValueError(
                f"m2_transport={group['m2_transport']!r} is the transport of Adam's second moment: it needs "
                f"core='adam' (core={group['core']!r} has none; the option would do nothing)"
            )
        if group["perp_second_moment"] not in ("entrywise", "scalar"):
            raise ValueError(
                f"perp_second_moment must be 'entrywise' or 'scalar', got {group['perp_second_moment']!r}"
            )
        if group["perp_second_moment"] == "scalar" and (group["integrator"], group["core"]) != ("parallel-bug", "adam"):
            raise ValueError(
                "perp_second_moment='scalar' is a second moment of the blocks of the tangent augmentation: "
                "it needs integrator='parallel-bug' and core='adam' (GeometricAdam)"
            )

    def _batch_key(self, p: Tensor) -> tuple:
        pair = self._pairs.get(id(p))  # recorded weights batch with those of pairs of one shape
        return super()._batch_key(p) + ((None,) if pair is None else tuple((t.shape, t.dtype) for t in pair))

    def _shape_groups(self, group: dict, params: list) -> list:
        # A batch of recorded weights stacks their pairs (x, dY): a copy of the recorded
        # activations. It is split so that no batch copies more than pair_stack_bytes.
        out = []
        for members in super()._shape_groups(group, params):
            pair = self._pairs.get(id(members[0]))
            if pair is None or len(members) == 1:
                out.append(members)
                continue
            size = max(1, self.pair_stack_bytes // sum(t.numel() * t.element_size() for t in pair))
            out += [members[i:i + size] for i in range(0, len(members), size)]
        return out

    def _euclidean_step(self, params, grads, states, group):
        foreach = group["foreach"]
        if foreach is None:
            # torch.optim's own rule (multi-tensor on CUDA), and multi-tensor on the CPU too:
            # torch's foreach Adam over 48 parameters of 128 or 1024 entries took 0.61 and 0.67 ms
            # there against 1.05 and 1.11 ms for its per-parameter loop (one thread)
            foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1] or all(
                type(p) in (Tensor, nn.Parameter) and p.device.type == "cpu" for p in params)
        lr = self._euclidean_lr(group)
        if group["euclidean"] == "sgd":
            sgd_update(params, grads, states, lr, group["momentum"], group["dampening"], group["nesterov"],
                       group["weight_decay"], foreach)
        else:
            adam_update(params, grads, states, lr, group["betas"], group["eps"], group["weight_decay"],
                        group["euclidean"] == "adamw", foreach)

    @staticmethod
    def _euclidean_lr(group) -> float:
        """The ordinary parameters' rate (the ``euclidean_lr`` option)."""
        if group["euclidean_lr"] is not None:
            return group["euclidean_lr"]
        if group["core"] == "flow" and any(is_lowrank_parameter(p) for p in group["params"]):
            return _FLOW_EUCLIDEAN_LR
        return group["lr"]

    def _begin_step(self) -> None:
        # The recorded weights' fields are built and checked against p.grad for all weights
        # first (class docstring, "one gradient channel"): a refused p.grad edit raises before
        # anything is computed or written.
        self._fields = self._recorded_fields()

    def _end_step(self) -> None:
        self._pairs, self._fields, self._points = {}, {}, {}

    def _recorded_fields(self) -> Dict[int, MatrixField]:
        """The field of every batch of recorded low-rank weights with a gradient (keyed by the
        ``id`` of the batch's first weight; the batches are :meth:`_shape_groups`', pairs of one
        shape stacked), after one check of all of them against ``p.grad`` (one host
        synchronisation)."""
        if self._recorder is None:
            return {}
        fields, checks = {}, []
        for group in self.param_groups:
            recorded = []
            for p in group["params"]:
                if p.grad is None or not is_lowrank_parameter(p) or not self._needs_field(group, p):
                    continue
                pair = self._recorder.pair(p)
                if pair is not None:
                    self._pairs[id(p)] = pair
                    recorded.append(p)
            for members in self._shape_groups(group, recorded):
                one = len(members) == 1
                x = members[0].detach() if one else torch.stack(members)
                grad = members[0].grad if one else torch.stack([p.grad for p in members])
                pair = self._pairs[id(members[0])] if one else tuple(
                    torch.stack([self._pairs[id(p)][k] for p in members]) for k in range(2))
                x, grad, mask = point = active_first(members[0].manifold, x, grad)
                self._points[id(members[0])] = (tuple(map(id, members)), point)
                field, residual = self._reconciled_field(members[0].manifold, x, grad, mask, pair,
                                                         gradient_decay(group))
                fields[id(members[0])] = field
                checks.append((members, residual.reshape(-1)))
        if checks:
            # NaN compares False: a non-finite gradient is left to the finiteness check.
            bad = torch.cat([res for _, res in checks]) > 1  # a residual per weight
            if bool(bad.any()):  # host sync: whether the step may be taken
                i = int(bad.nonzero()[0, 0])
                p = [p for members, _ in checks for p in members][i]
                raise RuntimeError(
                    f"DLRT: the gradient of the low-rank weight of shape {tuple(p.shape)} is not a "
                    "scalar multiple of the gradient recorded from the layer's forward and backward "
                    "pass (relative mismatch above grad_rtol): p.grad was edited by something other "
                    "than a uniform scaling (DDP, GradScaler, clipping are fine), e.g. a gradient hook, "
                    "a loss term on the factors, or a DDP model not passed as model=. Pass model=None "
                    "to take the step from p.grad alone (field -P_X G)."
                )
        return fields

    def _wants_record(self, param: Tensor) -> bool:
        """Whether the recorder keeps ``(x, dY)`` for ``param`` in this forward: only where the
        next step evaluates a field (:meth:`_needs_field`), so that parallel BUG and the
        core-only steps of a cycle hold no recorded activations. (A weight this optimizer does
        not hold is recorded: its pair is never read.)"""
        shape = tuple(len(g["params"]) for g in self.param_groups)
        if self._group_of[0] != shape:  # built again when the groups change
            self._group_of = (shape, {id(p): g for g in self.param_groups for p in g["params"]})
        group = self._group_of[1].get(id(param))
        return group is None or self._needs_field(group, param)

    def _needs_field(self, group: dict, p: Tensor) -> bool:
        """Whether this step of ``p`` evaluates the integrator's field: an augmentation step of
        abc-PSI or augmented BUG (parallel BUG's tangent augmentation uses ``p.grad`` alone, a
        core-only step of a cycle ``dS`` alone)."""
        k = group["augment_every"]
        return group["integrator"] != "parallel-bug" and self.state.get(p, {}).get("phase", 0) % k == 0

    def _reconciled_field(self, manifold: FixedRankManifold, x: Tensor, grad: Tensor, mask: Tensor, pair,
                          weight_decay: float):
        r"""The field :math:`-(P_X G + c N') - \lambda W` of a recorded point ``x`` (a batch
        of points allowed: ``grad``, ``mask`` and the pair stacked alike; active columns
        first) and the relative residual of :math:`p.grad \approx c \nabla_{rec}` divided by
        the tolerance, one per point (> 1 means refused). See the class docstring."""
        # the tangent part from p.grad, at the static capacity R (inactive columns exactly zero)
        u, s, v, ds, gv, gtu = manifold.gradient_products(x, grad)
        du, dv = manifold.unpack(grad, check=False)[::2]
        up, vp = gv - u @ ds, gtu - v @ mT(ds)
        # The K-step's new directions: Q_u, orthonormal and orthogonal to U (the QR of [U, Up],
        # whose first r columns are U's own; a QR of Up alone would fill a rank-deficient Up with
        # columns that are not), so that Q_u Q_u^T is a projection inside the complement of U;
        # Up = Q_u R_u. With a capacity, each point's active columns of U and then of Up go
        # first (a device-side sort; no host read of the rank) and Q_u is the r columns after
        # U's, the rest of its R columns zero.
        cap = manifold.capacity
        if manifold.adaptive:
            q = qr_kept_first(cat_last(u, up), torch.cat([mask, mask], -1) > 0)
            rank = mask.sum(-1, keepdim=True).long()
            j = torch.arange(cap, device=u.device)
            cols = (rank + j).clamp(max=q.shape[-1] - 1)
            q_u = torch.gather(q, -1, cols.unsqueeze(-2).expand(*q.shape[:-1], cap))
            q_u = q_u * ((j < rank) & (rank + j < q.shape[-1])).unsqueeze(-2).to(q.dtype)
        else:
            q_u = qr(cat_last(u, up))[0][..., cap:]
        r_u = mT(q_u) @ up
        a, b = pair
        # what only the pair knows, and its tangent products for the check
        gv_rec = a @ (mT(b) @ v)
        both = b @ (mT(a) @ cat_last(u, q_u))  # one product for both
        gtu_rec, btq = both[..., :cap], both[..., cap:]
        if self._process_group is not None:
            gv_rec, gtu_rec, btq = self._average(gv_rec, gtu_rec, btq)
        ntq = btq - v @ (mT(v) @ btq)  # N^T Q_u = (I - VV^T) B A^T Q_u
        # least squares p.grad ~ c * (G_rec V S^T, U^T G_rec V, G_rec^T U S), blockwise
        got, rec = (du, ds, dv), (gv_rec @ mT(s), mT(u) @ gv_rec, gtu_rec @ s)
        # The check sums squares of gradient entries, which overflow float32 from ~1e19 on: each
        # side is scaled by a power of two first (exactly 1 for ordinary gradients: no bit
        # changes; its own, as p.grad may be many orders of magnitude the recorded gradient),
        # c in the scaled units, then in the field's.
        limit = square_limit(x.dtype, sum(g.shape[-2] * g.shape[-1] for g in got))
        sg, sr = (pow2_scale(torch.stack([t.abs().amax((-2, -1)) for t in side]).amax(0), limit)[..., None, None]
                  for side in (got, rec))
        got, rec = [g / sg for g in got], [q / sr for q in rec]

        def dot_(a: Tensor, b: Tensor) -> Tensor:  # per point
            return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))

        dot = sum(dot_(g, q) for g, q in zip(got, rec))
        rr = sum(dot_(q, q) for q in rec)
        gg = sum(dot_(g, g) for g in got)
        tiny = torch.finfo(x.dtype).tiny
        c = torch.where(rr > 0, dot / rr.clamp(min=tiny), torch.ones_like(rr))[..., None, None]
        res2 = sum(dot_(d, d) for d in (g - c * q for g, q in zip(got, rec)))
        rtol = self._grad_rtol if self._grad_rtol is not None else 10 * math.sqrt(torch.finfo(x.dtype).eps)
        residual = res2.sqrt() / (rtol * gg.sqrt().clamp(min=tiny))
        c = c * (sg / sr)
        mm = ds + weight_decay * s if weight_decay else ds  # P_X(W) = U S V^T: only M
        # P_X G + c N' = U (M V^T + Vp^T) + Q_u (R_u V^T + c (N^T Q_u)^T): a pair of width 2R
        field = MatrixField((cat_last(u, q_u), -cat_last(v @ mT(mm) + vp, v @ mT(r_u) + c * ntq)))
        return field, residual

    def _average(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """All-reduce ``tensors`` over the DDP process group with DDP's averaging."""
        import torch.distributed as dist

        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat, group=self._process_group)
        flat /= dist.get_world_size(self._process_group)
        return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))

    def _warn_unrecorded(self) -> None:
        if not self._warned:
            warnings.warn(
                "DLRT: no recorded (x, dY) for a low-rank weight (no model= given, or not held by a layer of "
                "lowrank_manifolds.nn or lowrank_manifolds.peft); its field is -P_X(G) from autograd, "
                "with which abc-PSI and augmented BUG reduce to a retraction step",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            self._warned = True

    @staticmethod
    def _tangent_field(parts, weight_decay: float) -> TangentField:
        r""":math:`-P_X(G + \lambda W)` from :meth:`FixedRankManifold.gradient_products`."""
        up = parts.gv - parts.u @ parts.ds
        vp = parts.gtu - parts.v @ mT(parts.ds)
        mm = parts.ds + weight_decay * parts.s if weight_decay else parts.ds  # P_X(W) = U S V^T: only M
        return TangentField(parts.u, parts.v, -up, -mm, -vp)


    def _active_first(self, members, x, grad):
        ids, point = self._points.get(id(members[0]), ((), None))  # a recorded batch's, computed with its field
        return point if ids == tuple(map(id, members)) else super()._active_first(members, x, grad)

    def _lowrank_layout(self, p, group) -> Layout:
        cap = p.manifold.capacity
        square = (*p.shape[:-2], cap, cap)
        what = f"R x R coefficients of this low-rank weight of capacity R = {cap}"
        return ({"step": count, "exp_avg": floating(square, what), "exp_avg_sq": floating(square, what),
                 "exp_avg_sq_perp": floating((*p.shape[:-2], 2), "the second moments of its rotation blocks"),
                 "momentum_buffer": floating(square, what, none=True), "phase": count},
                (("step", "exp_avg", "exp_avg_sq"),))

    def _lowrank_step(self, p, grad, group, state, mask, param):
        k = group["augment_every"]
        phase = cycle_phase(group, state)
        if phase > 0:  # inside a cycle: the core optimizer on S, bases fixed
            return core_cycle_step(p, grad, group, state, phase == k - 1, mask)
        init_state(state, group, p)
        if group["integrator"] == "parallel-bug":
            uh, sh, vh, states, mask = self._tangent_update(p, grad, group, state, mask)
        else:
            uh, sh, vh, states, mask = self._integrator_update(p, grad, group, state, mask, param)
        manifold = p.manifold
        # a cycle's first step keeps every direction the capacity holds: truncated at its end
        policy = rank_policy(group, mask, manifold) if k == 1 else (capacity_policy(manifold), None)
        point, carried = truncate_and_carry(manifold, uh, sh, vh, states, policy, group["m2_transport"] == "squared")
        state.update(carried)
        return point

    @staticmethod
    def _tangent_update(p, grad, group, state, mask):
        """The tangent augmentation (``integrator="parallel-bug"``) and the core update on its
        coefficients: ``(U^, S^, V^, states, mask)``, states in the augmented coordinates."""
        uh, vh, s0, gh, mask, (core, up, vp) = tangent_augment(p, grad, p.manifold, mask)
        wd = gradient_decay(group)
        if wd:  # P_X(W) = W: the L2 term's coefficients are S^_0
            gh = gh + wd * s0
        k_u, k_v = gh.shape[-2:]
        perp = (mask, core, up, vp) if group["perp_second_moment"] == "scalar" else None
        sh, moments, counters = core_update(s0, gh, core_options(group), state, lambda x, key: embed(x, k_u, k_v),
                                            core | up | vp, perp)
        state.update(counters)
        return uh, sh, vh, moments, mask

    def _integrator_update(self, p, grad, group, state, mask, param):
        """One step of abc-PSI or augmented BUG on the weight's field: its own S-step
        (``core="flow"``), or its bases with the core update on the Galerkin coefficients:
        ``(U^, S^, V^, states, mask)``, states in the augmented coordinates."""
        manifold = p.manifold
        wd = gradient_decay(group)
        field = param_field = self._fields.get(id(param))  # a recorded batch's: checked first
        if field is None:  # the tangent field from p.grad
            parts = manifold.gradient_products(p, grad)
            u, s, v = parts[:3]
            self._warn_unrecorded()
            field = self._tangent_field(parts, wd)
        else:
            u, s, v = manifold.unpack(p, check=False)
        if group["core"] == "flow":  # ranks as masks: each point steps its active factors alone
            active = mask > 0 if manifold.adaptive else None
            uh, sh, vh = _INSTANCES[group["integrator"]].augmented_step(u, s, v, field, group["lr"], active=active)
            return uh, sh, vh, {}, mask
        a, b = field.evaluate(u, s, v, 0.0)  # F = A B^T (recorded or tangent field)
        uh, vh, s0, g, support = field_augment(u, s, v, a, b, mask > 0, tangent=param_field is None)
        k_u, k_v = uh.shape[-1], vh.shape[-1]

        def embedding(x, key):  # a state of the old bases in U^, V^: the old directions first
            return embed(x, k_u, k_v)

        sh, moments, counters = core_update(s0, g, core_options(group), state, embedding, support)
        state.update(counters)
        return uh, sh, vh, moments, mask
