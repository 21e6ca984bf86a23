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
  each step shrinks or grows ``r`` inside the fixed shape, so ``copy_``, optimizer
  states and ``state_dict`` never change shape, and stock geoopt optimizers can take
  over the same weights. On a fixed-rank manifold (no ``max_rank``) the rank stays
  ``manifold.rank``.
* *ordinary parameters* (biases, dense layers, norms): ``torch.optim.SGD`` or
  ``torch.optim.Adam`` / ``AdamW``, through torch's own functional updates.

Truncation: one policy per weight, its manifold's (:attr:`FixedRankManifold.truncation`:
the ``tol`` given to the layer, relative, within ``[min_rank, max_rank]``), the one geoopt's
retractions apply too. A param group may override it (``tol``, ``relative``, ``min_rank``;
``None`` takes the manifold's value) or keep every weight at its current active rank
(``fixed_rank=True``: the fixed-rank variant of each method).

Notation: :math:`X = U S V^\top`, :math:`G = \partial L/\partial X` (never formed),
autograd's gradient on the packed factors is :math:`dU = G V S^\top`,
:math:`dS = U^\top G V`, :math:`dV = G^\top U S`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import geoopt
import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from .._args import deprecated, nonneg, positive_int, renamed, unit_interval, user_stacklevel
from ..truncation import Truncation
from ..manifold import FixedRankManifold
from ._faults import (
    Layout,
    admit_step,
    all_finite,
    check_groups,
    checked_state_dict,
    commit,
    counter,
    floating,
    grad_limit,
    results,
    stage_on_copies,
    tag_state_dict,
    unrepresentable_error,
)
from .recorder import GradientRecorder


# ---------------------------------------------------------------------------
# low-rank parameter helpers
# ---------------------------------------------------------------------------
def is_lowrank_parameter(p) -> bool:
    """Whether ``p`` is a low-rank weight: its ``manifold`` attribute is a
    :class:`FixedRankManifold`. Decided by the attribute, not by ``isinstance(p,
    geoopt.ManifoldParameter)``, which is False inside a ``torch.compile`` frame."""
    return isinstance(getattr(p, "manifold", None), FixedRankManifold)


def refuse_manifold_parameters(where: str, param_group: dict, lowrank: bool) -> None:
    """Raise ``TypeError``, before anything is changed, if a parameter of ``param_group`` lies
    on a manifold that ``where`` would step as a plain tensor (leaving the manifold): any
    ``manifold`` attribute other than :class:`geoopt.Euclidean`, and, with ``lowrank``
    (optimizers that handle low-rank weights), other than :class:`FixedRankManifold`."""
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    for i, p in enumerate(params):
        manifold = getattr(p, "manifold", None)
        if manifold is None or isinstance(manifold, geoopt.Euclidean):
            continue
        if lowrank and isinstance(manifold, FixedRankManifold):
            continue
        use = ("geoopt.optim.RiemannianAdam or RiemannianSGD" if not isinstance(manifold, FixedRankManifold)
               else "lowrank_manifolds.optim.GeometricAdam, GeometricSGD or DLRT, or "
                    "geoopt.optim.RiemannianAdam")
        handles = "FixedRankManifold weights and plain parameters" if lowrank else "plain parameters only"
        raise TypeError(
            f"{where} handles {handles}; parameter {i} of this param group lies on {manifold} and "
            f"would leave it: use {use} for it (a second optimizer over those parameters). "
            "Nothing was changed."
        )


def active_first(manifold: FixedRankManifold, x: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x, grad, mask)``: a point ``x`` of ``manifold`` (a batch of points allowed) and the
    gradient on it in the manifold's convention, active columns first, and the 0/1 mask of
    those columns (:meth:`FixedRankManifold.active_mask`, computed once here for the step).

    A point whose active columns are not first (one written by hand, say) is the same matrix
    with its columns permuted: the columns of ``U`` and ``V`` and the rows and columns of ``S``
    (and of the gradient, which follows the point) are reordered by a stable sort of the mask,
    so each step sees the valid point it denotes. No host read on an accelerator, where an
    ordered point comes back as an exact copy; on the CPU, where a read is free, as itself. Either
    way its step is unchanged. (A fixed-rank point has no inactive column.)"""
    mask = manifold.active_mask(manifold.unpack(x, check=False)[0])
    if not manifold.adaptive:
        return x, grad, mask
    ordered, order = torch.sort(mask, dim=-1, descending=True, stable=True)
    if x.device.type == "cpu" and torch.equal(ordered, mask):  # a host read is free on the CPU: no copies
        return x, grad, mask
    m, cap, n = manifold.m, manifold.capacity, manifold.n
    every = torch.arange(m + cap + n, device=x.device).expand(*order.shape[:-1], -1)
    rows = torch.cat([every[..., :m], m + order, every[..., m + cap:]], -1).unsqueeze(-1)
    cols = order.unsqueeze(-2)

    def permute(t: Tensor) -> Tensor:  # the columns of [U; S; V], then the rows of S
        t = torch.gather(t, -1, cols.expand(t.shape))
        return torch.gather(t, -2, rows.expand(t.shape))

    return permute(x), permute(grad), ordered


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
    """``(policy, rank)`` for :func:`truncate` in a group: the manifold's truncation, with the
    group's ``tol``, ``relative``, ``min_rank`` where they are set; with ``fixed_rank`` the
    current active rank (the 0/1 ``mask`` of the active columns counts it)."""
    t = manifold.truncation
    if not manifold.adaptive:
        return t, None
    if group["fixed_rank"]:
        return t, mask.sum(-1).to(torch.int64)
    tol, relative, min_rank = group["tol"], group["relative"], group["min_rank"]
    if tol is None and relative is None and min_rank is None:
        return t, None
    return _tolerance_policy(
        t.tol if tol is None else float(tol),
        t.relative if relative is None else bool(relative),
        t.min_rank if min_rank is None else int(min_rank),
        manifold.capacity,
    ), None


def capacity_policy(manifold: FixedRankManifold) -> Truncation:
    """Truncation to the capacity alone (tolerance 0: every non-zero direction it can hold);
    the manifold's own at fixed rank."""
    t = manifold.truncation
    return _tolerance_policy(0.0, t.relative, t.min_rank, manifold.capacity) if manifold.adaptive else t


#: The truncation options of a param group; ``rank_tol`` and ``rank_relative`` are their
#: deprecated names.
_RENAMED_OPTIONS = {"rank_tol": "tol", "rank_relative": "relative"}


def truncation_options(where: str, tol, relative, min_rank, fixed_rank, deprecated: dict) -> dict:
    """The truncation options of an optimizer's defaults; ``deprecated`` holds the keyword
    arguments beyond the signature, of which only the old names are accepted."""
    unknown = set(deprecated) - set(_RENAMED_OPTIONS)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(unknown)}")
    return dict(
        tol=renamed("rank_tol", deprecated.get("rank_tol"), "tol", tol, where),
        relative=renamed("rank_relative", deprecated.get("rank_relative"), "relative", relative, where),
        min_rank=min_rank,
        fixed_rank=fixed_rank,
    )


def _rename_group_options(group: dict, where: str) -> dict:
    """A param group (given by a user, or from an old checkpoint) with the deprecated option
    names replaced by the current ones."""
    old = [k for k in _RENAMED_OPTIONS if k in group]
    if not old:
        return group
    deprecated(f"{where}: the param group options {old} are deprecated, use "
               f"{[_RENAMED_OPTIONS[k] for k in old]}", stacklevel=user_stacklevel() + 1)
    group = dict(group)
    for k in old:
        if _RENAMED_OPTIONS[k] in group and group[_RENAMED_OPTIONS[k]] is not None:
            raise TypeError(f"{where}: a param group sets both {k} and {_RENAMED_OPTIONS[k]}")
        group[_RENAMED_OPTIONS[k]] = group.pop(k)
    return group


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def check_truncation_options(group: dict) -> None:
    if group["tol"] is not None:
        nonneg(group["tol"], "tol")
    if group["relative"] is not None and not isinstance(group["relative"], bool):
        raise TypeError(f"relative must be None or a bool, got {group['relative']!r}")
    if group["min_rank"] is not None:
        positive_int(group["min_rank"], "min_rank")
    if not isinstance(group["fixed_rank"], bool):
        raise TypeError(f"fixed_rank must be a bool, got {group['fixed_rank']!r}")
    if group["fixed_rank"] and (group["tol"] is not None or group["min_rank"] is not None):
        raise ValueError("fixed_rank=True keeps each weight's active rank: it takes no tol or min_rank")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    unit_interval(betas[0], "betas[0]")
    unit_interval(betas[1], "betas[1]")


# ---------------------------------------------------------------------------
# ordinary parameters: torch's own functional SGD / Adam(W)
# ---------------------------------------------------------------------------
def sgd_update(params: list, grads: list, states: list, lr, momentum, dampening, nesterov, weight_decay,
               foreach) -> None:
    """One ``torch.optim.SGD`` step of ordinary parameters (torch's functional ``sgd``; with
    ``foreach``, its multi-tensor form: one kernel per list)."""
    bufs = [state.get("momentum_buffer") for state in states]
    torch_sgd(params, grads, bufs, foreach=foreach, weight_decay=weight_decay,
              momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=False)
    if momentum:
        for state, buf in zip(states, bufs):
            state["momentum_buffer"] = buf


def adam_update(params: list, grads: list, states: list, lr, betas, eps, weight_decay, decoupled, foreach) -> None:
    """One ``torch.optim.Adam`` (``decoupled``: ``AdamW``) step of ordinary parameters
    (torch's functional ``adam``; with ``foreach``, its multi-tensor form); the state is
    torch's (``step`` a CPU scalar tensor)."""
    for p, state in zip(params, states):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not torch.is_tensor(state["step"]):  # a checkpoint of an earlier version: an int
            state["step"] = torch.tensor(float(state["step"]))
    torch_adam(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
        [s["step"] for s in states], foreach=foreach, decoupled_weight_decay=decoupled, amsgrad=False,
        beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------
def write_staged(members: list, states: list, point: Tensor, staged: dict) -> None:
    """Write a step computed on copies into the weights ``members`` and their ``states``:
    ``point`` and the tensors of ``staged`` are stacked on a leading axis when there are
    several members (one multi-tensor copy per key), the weight's own when there is one.
    States the step created get storage of their own per weight."""
    if len(members) == 1 and point.shape == members[0].shape:
        members[0].copy_(point)
        states[0].update(staged)
        return
    torch._foreach_copy_(list(members), list(point.unbind(0)))  # under no_grad: no detach (one op each)
    for key, value in staged.items():
        if not torch.is_tensor(value):
            for s in states:
                s[key] = value
        elif key in states[0]:
            torch._foreach_copy_([s[key] for s in states], list(value.unbind(0)))
        else:
            for s, v in zip(states, value.unbind(0)):
                s[key] = v.clone()


class _Staged(NamedTuple):
    """A low-rank step computed on copies (:meth:`LowRankOptimizer._stage`): the weights, their
    new point and states (stacked on a leading axis for several weights), and the gradient the
    step read (stacked likewise), which the finiteness decision checks as one tensor."""

    members: list
    point: Tensor
    states: dict
    grad: Tensor


class LowRankOptimizer(torch.optim.Optimizer):
    """Step loop shared by the optimizers: low-rank weights vs ordinary parameters.

    * All or nothing (``check_finite = True``, default; set the attribute to ``False`` to skip
      it): a step is taken with every parameter and state finite, or raises
      ``FloatingPointError`` with all of them (step counters included) bitwise unchanged, so
      the next clean step trains. A non-finite gradient is named by parameter. The steps of
      the low-rank weights are computed on copies (points and states) and written only once
      they are known to be finite: a step whose value exceeds the dtype's range although the
      gradients are finite (Adam's second moment of a gradient of 1e30 in float32, say) is
      refused naming the weight and the state. An ordinary parameter whose gradient has an
      entry above :func:`~lowrank_manifolds.optim._faults.grad_limit` (9.2e18 in float32) is
      stepped on copies and checked the same way (a gradient of 1e20 then steps as
      ``torch.optim.Adam`` does, one of 1e30, whose ``(1 - beta2) g^2`` float32 cannot hold, is
      refused); below it no square of its step comes near the dtype's range. Cost: one
      multi-tensor max-abs per device and dtype over the gradients and the low-rank results
      and one host synchronisation for each (free on the CPU), a second one only in a step
      with such a large gradient; the new points and states of the low-rank weights are held
      until they are written (at the peak, about one more copy of them). Under
      ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` skips steps with infs before this
      check is reached.
    * Hyperparameters edited in ``param_groups`` (``lr``, ``betas``, ``eps``, the core, the
      truncation options, ...) are checked at the start of every step by the constructor's
      own checks: ``ValueError`` (``TypeError`` for a wrong type) naming the param group and
      the key, before anything is written. They are Python numbers, as the constructor
      requires (a tensor is refused), so the check reads nothing from a device.
    * ``state_dict`` saves the optimizer's class name in each param group (``saved_by``);
      ``load_state_dict`` refuses, before anything is loaded, a state dict saved by another
      optimizer, hyperparameters the constructor would refuse, and states that are not this
      optimizer's for these parameters (a foreign key, a shape that is not the parameter's or,
      for a low-rank weight, the ``R x R`` of its capacity, a non-floating dtype, a non-finite
      value), each by parameter and key.
    * Points: a low-rank weight whose active columns are not first is stepped as the valid
      point it denotes (:func:`active_first`), so a hand-written point loses nothing.
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
        refuse_manifold_parameters(type(self).__name__, param_group, lowrank=True)
        super().add_param_group(_rename_group_options(param_group, type(self).__name__))
        group = self.param_groups[-1]
        try:
            self._configure(group)
            self._check_group(group)
            for p in group["params"]:
                manifold = getattr(p, "manifold", None)
                if isinstance(manifold, FixedRankManifold):
                    manifold._check_packed(p, "a low-rank weight")  # once here, not in every step
            self._check_weights(group)
        except BaseException:
            self.param_groups.pop()  # a refused group is not added
            raise

    def _configure(self, group: dict) -> None:
        """Set the options a subclass fixes (a configuration of a family, e.g. GeometricAdam's
        basis update and core) in a param group, given or loaded; the base class fixes none."""

    def _check_group(self, group: dict) -> None:
        """The constructor's checks of a group's hyperparameters (when it is added or loaded,
        and at every step)."""
        nonneg(group["lr"], "lr")
        nonneg(group["weight_decay"], "weight_decay")
        check_truncation_options(group)

    def _check_weights(self, group: dict) -> None:
        """The group's low-rank weights against its options (when it is added or loaded): a
        truncation option (``tol``, ``min_rank``, ``relative``) configures a rank-adaptive
        truncation, and on a fixed-rank weight it would do nothing."""
        given = [k for k in ("tol", "min_rank", "relative") if group[k] is not None]
        if not given:
            return
        for p in group["params"]:
            manifold = getattr(p, "manifold", None)
            if isinstance(manifold, FixedRankManifold) and not manifold.adaptive:
                what = ", ".join(f"{k}={group[k]}" for k in given)
                raise ValueError(
                    f"{what} configures a rank-adaptive truncation, but a weight lives on the "
                    f"fixed-rank {manifold}: build its layer with a capacity (max_rank=...) or "
                    f"put it in a group without {' or '.join(given)}"
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._recorder is not None:
            self._recorder.clear()

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer``'s, with the optimizer's class name in each param group
        (``"saved_by"``; :meth:`load_state_dict` removes it)."""
        return tag_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, after the checks of
        :func:`~lowrank_manifolds.optim._faults.checked_state_dict`: a state dict saved by
        another optimizer, hyperparameters the constructor refuses, and states that are not
        this optimizer's for these parameters (keys, shapes: a low-rank weight's capacity,
        dtypes, finiteness) raise ``ValueError`` naming the parameter and the key, with
        nothing loaded. A checkpoint of an earlier version loads: deprecated option names are
        renamed, and options its param groups lack (added since, e.g. the family's
        ``integrator``, ``core``, ``euclidean`` in a GeometricAdam checkpoint) take this
        optimizer's defaults."""
        super().load_state_dict(checked_state_dict(self, state_dict, self._loaded_group, self._state_layout))

    def _loaded_group(self, saved: dict, current: dict) -> dict:
        group = dict(_rename_group_options(saved, type(self).__name__))
        if "fixed_rank" not in group:  # an older checkpoint: its rank_tol=None kept the active rank
            group["fixed_rank"] = group.get("tol") is None
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._configure(group)
        self._check_group(group)
        self._check_weights({**group, "params": current["params"]})
        return group

    def _state_layout(self, p: Tensor, group: dict) -> Layout:
        """The states this optimizer keeps for ``p`` in ``group``: an ordinary parameter's are
        ``torch.optim.SGD``'s or ``Adam``'s."""
        if is_lowrank_parameter(p):
            return self._lowrank_layout(p, group)
        shape = tuple(p.shape)
        return ({"momentum_buffer": floating(shape, "SGD's momentum buffer", none=True),
                 "step": counter(tensor_only=False),
                 "exp_avg": floating(shape, "Adam's first moment"),
                 "exp_avg_sq": floating(shape, "Adam's second moment")},
                (("step", "exp_avg", "exp_avg_sq"),))

    def _lowrank_layout(self, p: Tensor, group: dict) -> Layout:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient. ``closure`` (optional)
        re-evaluates the model (zero_grad, forward, backward) and returns the loss.

        Taken whole or not at all (class docstring): the hyperparameters are checked first,
        and with ``check_finite`` (default) the gradients and the computed results before
        anything is written (one host sync per step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_groups(self, self._check_group)
        work = []
        for group in self.param_groups:
            lowrank, plain = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                (lowrank if is_lowrank_parameter(p) else plain).append(p)
            work.append((group, plain, lowrank))
        try:
            self._begin_step()
            self._take_step(work)
        finally:
            self._end_step()
        if self._recorder is not None:
            self._recorder.clear()
        return loss

    def _begin_step(self) -> None:
        """What a subclass prepares before the step's computation (a check that may refuse it);
        the base class prepares nothing."""

    def _end_step(self) -> None:
        """What a subclass releases after a step, taken or refused."""

    def _take_step(self, work: list) -> None:
        """Compute the low-rank steps on copies, decide (:func:`admit_step`), then write."""
        staged, failure, current = [], None, None
        try:
            for group, _, lowrank in work:
                for current in self._shape_groups(group, lowrank):
                    staged.append(self._stage(current, group))
        except Exception as error:  # judged once the gradients are: a non-finite one explains it
            failure = (error, current)
        euclidean = {}
        if self.check_finite:
            over, finite = admit_step(self, self._grad_limit,
                                      [t for record in staged for _, t in results(record.point, record.states)],
                                      [(r.members, r.grad) for r in staged if len(r.members) > 1])
            if failure is not None:
                self._raise_failure(*failure)
            if not all(finite):
                raise self._staged_error(staged, finite.index(False))
            if over:
                euclidean = self._stage_euclidean(work, over)
        elif failure is not None:
            raise failure[0]
        for record in staged:
            self._commit(record.members, record.point, record.states)
        for group, plain, _ in work:
            rest = [p for p in plain if id(p) not in euclidean]
            if rest:
                self._euclidean_step(rest, [p.grad for p in rest], [self.state[p] for p in rest], group)
        commit(self, euclidean)

    def _grad_limit(self, p: Tensor) -> float:
        # a low-rank weight's step is always computed on copies and checked
        return math.inf if is_lowrank_parameter(p) else grad_limit(p.dtype)

    def _raise_failure(self, error: Exception, members: Optional[list]):
        """An error of a low-rank step computed from finite gradients: a factorisation that met
        a non-finite value of its own making (an overflow) is the step's range error."""
        if isinstance(error, torch.linalg.LinAlgError) and members:
            raise unrepresentable_error(self, members[0], "its weight", cause=str(error)) from error
        raise error

    def _staged_error(self, staged: list, k: int) -> FloatingPointError:
        """The error naming the ``k``-th result of ``staged`` (not finite) and its weight."""
        for members, point, states, _ in staged:
            items = results(point, states)
            if k < len(items):
                what, t = items[k]
                member = members[0]
                if len(members) > 1:  # the first weight of the batch whose row is not finite
                    rows = all_finite(list(t.unbind(0)))
                    member = members[rows.index(False)]
                return unrepresentable_error(self, member, what)
            k -= len(items)
        raise AssertionError("no such result")  # pragma: no cover

    def _stage_euclidean(self, work: list, over: dict) -> dict:
        """The steps of the ordinary parameters whose gradients exceed :meth:`_grad_limit`
        (``over``), taken on copies and checked (:func:`stage_on_copies`, one more host read)."""
        groups = [(group, [p for p in plain if id(p) in over]) for group, plain, _ in work]

        def step(values, states):
            k = 0
            for group, params in groups:
                if params:
                    n = k + len(params)
                    self._euclidean_step(values[k:n], [p.grad for p in params], states[k:n], group)
                    k = n

        return stage_on_copies(self, [p for _, params in groups for p in params], step)

    def _batch_key(self, p: Tensor) -> tuple:
        """What weights stepped as one batch share (metadata only: no host read): shape, dtype
        and device, the manifold's configuration as the step reads it (the nominal rank of a
        capacity weight, its retraction and second moment are geoopt's business, not the
        step's), and the states' keys, shapes and counters. A subclass adds what its step
        reads per weight (e.g. the shape of a recorded pair)."""
        mf, state = p.manifold, self.state[p]
        return (tuple(p.shape), p.dtype, p.device, type(mf), mf.m, mf.n, mf.capacity, mf.adaptive,
                repr(mf.truncation), mf.check_finite,
                tuple(sorted((k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v) for k, v in state.items())))

    def _shape_groups(self, group: dict, params: list) -> list:
        """The low-rank weights of a param group, as lists stepped together: weights of one
        :meth:`_batch_key`, in their order (``foreach=False``: one list per weight)."""
        if group.get("foreach") is False:
            return [[p] for p in params]
        batches: dict = {}
        for p in params:
            batches.setdefault(self._batch_key(p), []).append(p)
        return list(batches.values())

    def _active_first(self, members: list, x: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:func:`active_first` of the point(s) ``x`` of ``members``."""
        return active_first(members[0].manifold, x, grad)

    def _stage(self, members: list, group: dict) -> "_Staged":
        r"""The step of ``members`` (the weights of one :meth:`_shape_groups` list) computed on
        copies: the new packed point and states (stacked on a leading axis for several
        weights) and the gradient the step read; nothing of the weights or their states is written
        (:meth:`_commit` writes). Several weights are stepped as one batched weight: every
        stage takes a batch of points with their own active ranks (ranks are masks), equal to
        the per-weight steps to rounding (tested)."""
        states = [self.state[p] for p in members]
        if len(members) == 1:
            x, grad = members[0].detach(), members[0].grad
            staged = {k: v.clone() if torch.is_tensor(v) else v for k, v in states[0].items()}
        else:
            x = torch.stack(members)  # under no_grad: no graph, no detach (one op each)
            grad = torch.stack([p.grad for p in members])
            staged = {k: torch.stack([s[k] for s in states]) if torch.is_tensor(v) else v
                      for k, v in states[0].items()}
        stacked = grad
        x, grad, mask = self._active_first(members, x, grad)
        x.manifold = members[0].manifold  # a (batch of) point(s) of this manifold
        point = self._lowrank_step(x, grad, group, staged, mask, members[0])
        return _Staged(members, point, staged, stacked)

    def _commit(self, members: list, point: Tensor, staged: dict) -> None:
        """Write a staged step (:meth:`_stage`) into its weights and states."""
        write_staged(members, [self.state[p] for p in members], point, staged)

    def _lowrank_step(self, x: Tensor, grad: Tensor, group: dict, state: dict, mask: Tensor,
                      param: Optional[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """The new packed point of ``x`` (active columns first, ``mask`` its active columns;
        a copy or a batch of points, never a parameter) and ``grad``, updating ``state`` (the
        staged states) in place; ``param`` is the batch's first weight (the key of what the
        optimizer prepared for the batch before the step, e.g. a recorded field)."""
        raise NotImplementedError

    def _euclidean_step(self, params: list, grads: list, states: list, group: dict) -> None:  # pragma: no cover
        """One step, in place, of the ordinary parameters ``params`` with ``grads`` and
        ``states`` of ``group``."""
        raise NotImplementedError
