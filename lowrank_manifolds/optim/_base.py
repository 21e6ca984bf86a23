r"""What the low-rank optimizers share: the step loop, the checks, the truncation.

Every optimizer of :mod:`lowrank_manifolds.optim` follows the ``torch.optim`` conventions (``param_groups``,
``state``, ``step(closure=None)``, ``zero_grad``, ``state_dict`` /
``load_state_dict``, learning-rate schedulers) and accepts two kinds of parameters
in the same instance:

* *low-rank weights*: a :class:`geoopt.ManifoldParameter` on a
  :class:`~lowrank_manifolds.FixedRankManifold`, packed ``[U; S; V]`` with shape
  ``(m + R + n, R)``, ``R = manifold.capacity``. The convention is the manifold's:
  on a rank-adaptive manifold (layers built with ``max_rank=R``) the *active rank*
  ``r <= R`` is the number of non-zero columns of ``U`` (active columns first; the
  inactive columns of ``U``, ``V`` and rows/columns of ``S`` are exactly zero), and
  ``rank_tol`` lets each step shrink or grow ``r`` inside the fixed shape, so ``copy_``,
  optimizer states and ``state_dict`` never change shape, and stock geoopt optimizers
  can take over the same weights. On a fixed-rank manifold (no ``max_rank``) the rank
  stays ``manifold.rank`` (``rank_tol`` must then be ``None``). The optimizers' own
  truncation tolerance is the group's ``rank_tol``, not the manifold's ``tol`` (which
  governs geoopt's retractions).
* *ordinary parameters* (biases, dense layers, norms): plain SGD with momentum or
  Adam / AdamW, with the formulas of ``torch.optim.SGD`` / ``torch.optim.Adam``.

Notation: :math:`X = U S V^\top`, :math:`G = \partial L/\partial X` (never formed),
autograd's gradient on the packed factors is :math:`dU = G V S^\top`,
:math:`dS = U^\top G V`, :math:`dV = G^\top U S`.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import geoopt
import torch
from torch import Tensor

from .._linalg import mT, pinv_core
from ..truncation import Truncation
from ..manifold import FixedRankManifold
from ._faults import check_finite_grads, check_finite_state_dict
from .recorder import GradientRecorder


# ---------------------------------------------------------------------------
# low-rank parameter helpers
# ---------------------------------------------------------------------------
def is_lowrank_parameter(p) -> bool:
    """Whether ``p`` is a low-rank weight: its ``manifold`` attribute is a
    :class:`FixedRankManifold`. Decided by the attribute, not by ``isinstance(p,
    geoopt.ManifoldParameter)``, which is False inside a ``torch.compile`` frame."""
    return isinstance(getattr(p, "manifold", None), FixedRankManifold)


def active_mask(u: Tensor, manifold: FixedRankManifold) -> Tensor:
    """Boolean ``(..., R)``: the active (leading, non-zero) columns of ``U``. No host sync."""
    return manifold.active_mask(u) > 0


def riemannian_parts(p: Tensor, grad: Tensor, manifold: FixedRankManifold):
    r"""``(U, S, V, mask, dS, GV, GtU)`` with ``GV``, ``GtU`` the products :math:`GV`,
    :math:`G^\top U` recovered from autograd's ``dU = G V S^T``, ``dV = G^T U S`` with the
    pseudo-inverse of the manifold's invertible core (``S`` itself at fixed rank; with a
    capacity, ``S`` plus ones on the inactive diagonal), singular values below the
    manifold's threshold treated as zero: the convention of
    :meth:`FixedRankManifold.egrad2rgrad`, so that an exactly zero singular value gives a
    finite step (its ``dS`` part can grow it back) instead of a singular solve."""
    u, s, v = manifold.unpack(p)
    du, ds, dv = manifold.unpack(grad)
    s_inv = pinv_core(manifold.invertible_core(u, s), manifold.pinv_rtol(s.dtype))
    gv, gtu = du @ mT(s_inv), dv @ s_inv  # dU S^{+T}, dV S^{+}
    return u, s, v, active_mask(u, manifold), ds, gv, gtu


def truncate(uh: Tensor, sh: Tensor, vh: Tensor, policy: Truncation, rank: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    r"""Truncation of an augmented result by ``policy`` (:meth:`Truncation.decompose`; ``rank``
    overrides its rank decision). Returns ``(U1, S1, V1, P_r, Q_r)`` with ``P_r``, ``Q_r``
    the kept singular vectors (zero beyond the rank), so that coefficient states transport
    as ``P_r^T m Q_r``."""
    p_r, s1, q_r = policy.decompose(sh, rank)
    return uh @ p_r, s1, vh @ q_r, p_r, q_r


@functools.lru_cache(maxsize=None)
def _tolerance_policy(tol: float, relative: bool, min_rank: int, capacity: int) -> Truncation:
    # one (immutable) policy per setting, shared by the groups and steps that use it
    return Truncation(tol, relative=relative, min_rank=min(min_rank, capacity), max_rank=capacity, pad=True)


def rank_policy(group: dict, mask: Tensor, manifold: FixedRankManifold) -> Tuple[Truncation, Optional[Tensor]]:
    """``(policy, rank)`` for :func:`truncate` in a group: the manifold's own truncation at
    fixed rank; with a capacity the group's ``rank_tol`` (``rank_relative``, ``min_rank``)
    within it, or, with ``rank_tol=None``, the current active rank kept."""
    tol = group["rank_tol"]
    if not manifold.adaptive:
        return manifold.truncation, None
    if tol is None:
        return manifold.truncation, mask.sum(-1)
    return _tolerance_policy(float(tol), bool(group["rank_relative"]), int(group["min_rank"]), manifold.capacity), None


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_unit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_rank_args(rank_tol, min_rank) -> None:
    if rank_tol is not None:
        check_nonneg(rank_tol, "rank_tol")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_unit(betas[0], "betas[0]")
    check_unit(betas[1], "betas[1]")


# ---------------------------------------------------------------------------
# Euclidean updates (formulas of torch.optim.SGD / torch.optim.Adam(W))
# ---------------------------------------------------------------------------
def sgd_update(p: Tensor, g: Tensor, state: dict, lr, momentum, dampening, nesterov, weight_decay) -> None:
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.clone()
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)


def adam_update(p: Tensor, g: Tensor, state: dict, lr, betas, eps, weight_decay, decoupled) -> None:
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    if weight_decay:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    b1, b2 = betas
    state["step"] += 1
    step = state["step"]
    state["exp_avg"].lerp_(g, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**step))


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------
class LowRankOptimizer(torch.optim.Optimizer):
    """Step loop shared by the optimizers: low-rank weights vs ordinary parameters.

    * Faults: with ``check_finite = True`` (default; set the attribute to ``False`` to
      skip it) a non-finite gradient raises ``FloatingPointError`` naming the parameter
      before any parameter, state or step counter is written, so the next clean step
      trains. It costs one ``isfinite`` reduction per gradient and one host
      synchronisation per step (free on the CPU). Under ``torch.amp.GradScaler``,
      ``scaler.step(optimizer)`` skips steps with infs before this check is reached.
      ``load_state_dict`` rejects a checkpoint with a non-finite state tensor, by name.
    * ``torch.compile``: ``step`` always runs eagerly (it is wrapped with
      ``torch.compiler.disable``, in subclasses too: a graph break). Inside a compiled
      frame a ``geoopt.ManifoldParameter`` is not recognised by ``isinstance``, and the
      step's decisions (ranks, finiteness) need host values; low-rank weights are
      recognised by their ``manifold`` attribute (:func:`is_lowrank_parameter`).
    """

    _recorder: Optional[GradientRecorder] = None
    check_finite: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = torch.compiler.disable(cls.__dict__["step"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        for p in group["params"]:
            manifold = getattr(p, "manifold", None)
            if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)) and not isinstance(
                manifold, (FixedRankManifold, geoopt.Euclidean)
            ):
                raise ValueError(
                    f"{type(self).__name__} handles FixedRankManifold weights and Euclidean "
                    f"parameters; got a parameter on {manifold}: use geoopt's optimizers for it"
                )
            if (
                isinstance(manifold, FixedRankManifold)
                and not manifold.adaptive
                and group["rank_tol"] is not None
            ):
                raise ValueError(
                    f"rank_tol={group['rank_tol']} makes the rank adaptive, but a weight lives on the "
                    f"fixed-rank {manifold}: build its layer with a capacity (max_rank=...) or "
                    "put it in a group with rank_tol=None"
                )

    def _check_group(self, group: dict) -> None:
        check_nonneg(group["lr"], "lr")
        check_nonneg(group["weight_decay"], "weight_decay")
        check_rank_args(group["rank_tol"], group["min_rank"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._recorder is not None:
            self._recorder.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, after checking that every floating-point state
        tensor is finite (a ``ValueError`` names the parameter and the state key)."""
        check_finite_state_dict(self, state_dict)
        super().load_state_dict(state_dict)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient. ``closure`` (optional)
        re-evaluates the model (zero_grad, forward, backward) and returns the loss.

        With ``check_finite`` (default) a non-finite gradient raises ``FloatingPointError``
        naming the parameter before anything is written (one host sync per step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if self.check_finite:
            check_finite_grads(self)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if is_lowrank_parameter(p):
                    self._lowrank_step(p, p.grad, group, state)
                else:
                    self._euclidean_step(p, p.grad, group, state)
        if self._recorder is not None:
            self._recorder.clear()
        return loss

    def _lowrank_step(self, p, grad, group, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def _euclidean_step(self, p, grad, group, state):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _write(p: Tensor, u1: Tensor, s1: Tensor, v1: Tensor) -> None:
        p.copy_(p.manifold.pad(u1, s1, v1))
