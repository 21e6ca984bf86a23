"""What the optimizers check before they write: hyperparameters edited in ``param_groups``, the
gradients (non-finite, or too large for the step's values to be represented), the results of a
step computed on copies, and a checkpoint before it is loaded. Each check raises before
anything is written, naming the parameter, the param group and the key.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: The key each param group of an optimizer's ``state_dict`` carries: the optimizer's class
#: name, so that a checkpoint of another optimizer is refused by name (a state dict without it,
#: saved before, loads).
SAVED_BY = "saved_by"


# ---------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------
def check_groups(optimizer: torch.optim.Optimizer, check: Callable[[dict], None]) -> None:
    """Run ``check`` (a constructor's own validation) on every param group as it is now, so that
    a value edited in ``param_groups`` since (``lr`` set to NaN, a negative ``eps``) is refused
    before a step writes anything: the error says the param group and, from ``check``, the key.
    Python-level checks of Python numbers: no host synchronisation."""
    for g, group in enumerate(optimizer.param_groups):
        try:
            check(group)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"{type(optimizer).__name__}: param group {g}: {error}; the step was not taken (nothing was changed)"
            ) from None


# ---------------------------------------------------------------------------
# gradients and results
# ---------------------------------------------------------------------------
def square_limit(dtype: torch.dtype, count: int = 1) -> float:
    """The largest magnitude whose square, summed ``count`` times, stays below the largest
    finite value of ``dtype``."""
    return math.sqrt(torch.finfo(dtype).max / max(count, 1))


def grad_limit(dtype: torch.dtype) -> float:
    """The largest gradient entry (in magnitude) with which a step of an ordinary parameter is
    taken without first computing it on copies: half of :func:`square_limit` (9.2e18 in float32
    and bfloat16, 128 in float16). Below it Adam's ``(1 - beta2) g^2`` and every other square of
    the step stays below a quarter of the dtype's range, and so do the second moments that
    such steps wrote; above it the step is computed on copies and checked (see
    :func:`admit_step`)."""
    return square_limit(dtype) / 2


def pow2_scale(big: Tensor, limit: float) -> Tensor:
    """A power of two ``s >= 1`` (a 0-d tensor of ``big``'s dtype; no host read) with
    ``big / s <= limit``: exactly 1 while ``big <= limit``, so that dividing by it and
    multiplying back changes no bit of an ordinary result, and large enough to keep the squares
    of a computation in range otherwise (an exact scaling, unlike a division by ``big``)."""
    exponent = torch.frexp(big / limit).exponent  # big / limit = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.exp2(exponent.clamp(min=0).to(big.dtype))


def max_abs(t: Tensor) -> Tensor:
    """The largest magnitude of a non-empty ``t`` as a 0-d tensor (NaN if an entry is): one
    min-max reduction, a tenth of the cost of an inf-norm on the CPU."""
    low, high = torch.aminmax(t)
    return torch.maximum(high, -low)


def _max_abs(tensors: Sequence[Tensor]) -> List[float]:
    """The largest magnitude of each tensor (0 for an empty or meta one; inf or NaN exactly when
    an entry is): one multi-tensor max-abs kernel (on the CPU, a min-max reduction per tensor)
    and one host read per device and dtype (no overflow, unlike a 2-norm of large finite
    entries)."""
    out = [0.0] * len(tensors)
    lists: Dict[tuple, List[int]] = {}
    for k, t in enumerate(tensors):
        if t.device.type != "meta" and t.numel():
            lists.setdefault((t.device, t.dtype), []).append(k)
    for (device, _), indices in lists.items():
        group = [tensors[k] for k in indices]
        if device.type == "cpu":  # one min-max reduction per tensor, then one maximum for all
            lows, highs = zip(*(torch.aminmax(t) for t in group))
            norms = torch.maximum(torch.stack(highs), torch.stack(lows).neg())
        else:
            norms = torch.stack(torch._foreach_norm(group, math.inf))
        for k, value in zip(indices, norms.tolist()):  # host sync per list
            out[k] = value
    return out


def _grads(optimizer: torch.optim.Optimizer) -> List[Tuple[int, int, Tensor]]:
    return [(g, i, p) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])
            if p.grad is not None and not p.grad.is_sparse]


def nonfinite_gradient_error(optimizer: torch.optim.Optimizer, g: int, i: int, p: Tensor) -> FloatingPointError:
    return FloatingPointError(
        f"{type(optimizer).__name__}: the gradient of parameter {i} of param group {g} "
        f"(shape {tuple(p.shape)}) has non-finite entries; the step was not taken (parameters, "
        "states and step counters are unchanged). With mixed precision, torch.amp.GradScaler's "
        "scaler.step(optimizer) skips such steps."
    )


def admit_step(optimizer: torch.optim.Optimizer, limit: Callable[[Tensor], float],
               results: Sequence[Tensor] = (),
               stacked: Sequence[Tuple[Sequence[Tensor], Tensor]] = ()) -> Tuple[Dict[int, float], List[bool]]:
    """The decision whether a step may be taken, before it writes anything, in one host read per
    device and dtype (free on the CPU): the largest entry of every dense ``p.grad`` and of every
    tensor of ``results`` (a step computed on copies). ``stacked`` holds ``(params, grads)``
    pairs whose ``grads`` are those params' gradients stacked on a leading axis (the batch a
    step already built): each is checked as one tensor, so that a shape group costs one
    reduction however many weights it has; a parameter's own gradient is looked at only when
    its batch is not finite or above ``limit``.

    Raises ``FloatingPointError`` naming the first parameter whose gradient has a non-finite
    entry. Returns ``(over, finite)``: ``over`` maps ``id(p)`` to the largest gradient entry of
    each parameter whose gradient is finite but above ``limit(p)`` (such a step is computed on
    copies and checked before it is written), ``finite`` says for each of ``results`` whether
    it is finite."""
    grads = _grads(optimizer)
    batch_of = {id(p): k for k, (params, _) in enumerate(stacked) for p in params}
    alone = [p for _, _, p in grads if id(p) not in batch_of]
    values = _max_abs([p.grad for p in alone] + [g for _, g in stacked] + list(results))
    value_of = dict(zip(map(id, alone), values))
    batch_values = values[len(alone):len(alone) + len(stacked)]
    over = {}
    for g, i, p in grads:
        k = batch_of.get(id(p))
        value = value_of[id(p)] if k is None else batch_values[k]
        if k is not None and not value <= limit(p):  # the batch says "maybe": this weight's own entries
            value = _max_abs([p.grad])[0]
        if not math.isfinite(value):
            raise nonfinite_gradient_error(optimizer, g, i, p)
        if value > limit(p):
            over[id(p)] = value
    return over, [math.isfinite(v) for v in values[len(alone) + len(stacked):]]


def all_finite(tensors: Sequence[Tensor]) -> List[bool]:
    """Whether each tensor is finite (one host read per device and dtype)."""
    return [math.isfinite(v) for v in _max_abs(tensors)]


def where_of(optimizer: torch.optim.Optimizer, p: Tensor) -> str:
    """``"parameter i of param group g (shape ...)"`` for a parameter of ``optimizer``."""
    for g, group in enumerate(optimizer.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                return f"parameter {i} of param group {g} (shape {tuple(p.shape)})"
    raise KeyError("not a parameter of this optimizer")  # pragma: no cover - callers pass their own


def unrepresentable_error(optimizer: torch.optim.Optimizer, p: Tensor, what: str,
                          cause: Optional[str] = None) -> FloatingPointError:
    """The error of a step whose result ``what`` (e.g. "its state 'exp_avg_sq'") would not be
    finite although the gradients are: a value of the step exceeds the range of the dtype."""
    grad = "" if p.grad is None else f" (largest gradient entry {_max_abs([p.grad])[0]:.3g})"
    return FloatingPointError(
        f"{type(optimizer).__name__}: the step of {where_of(optimizer, p)}{grad} would make {what} "
        f"non-finite: a value of the step exceeds the largest {p.dtype}, {torch.finfo(p.dtype).max:.3g} "
        "(as Adam's second moment (1 - beta2) g^2 of a large gradient does)"
        + (f" [{cause}]" if cause else "")
        + "; the step was not taken (parameters, states and step counters are unchanged)"
    )


def results(value: Tensor, state: dict) -> List[Tuple[str, Tensor]]:
    """``(what, tensor)`` for the floating-point results of a step computed on copies: the new
    value of a parameter (or point) and its new states."""
    return [("its weight", value)] + [(f"its state {key!r}", v) for key, v in state.items()
                                      if isinstance(v, Tensor) and v.is_floating_point()]


def stage_on_copies(optimizer: torch.optim.Optimizer, params: List[Tensor],
                    step: Callable[[List[Tensor], List[dict]], None]) -> Dict[int, tuple]:
    """The step of ``params`` taken on copies: ``step(values, states)`` updates copies of the
    parameters and of their states in place; the results are checked (one host read per device
    and dtype) and returned as ``{id(p): (p, value, state)}`` for :func:`commit`. Raises
    ``FloatingPointError`` (:func:`unrepresentable_error`) naming the first parameter and state
    that is not finite, with nothing written."""
    values = [p.detach().clone() for p in params]
    states = [{k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()} for p in params]
    step(values, states)
    items = [(p, what, t) for p, value, state in zip(params, values, states) for what, t in results(value, state)]
    for (p, what, _), ok in zip(items, all_finite([t for _, _, t in items])):
        if not ok:
            raise unrepresentable_error(optimizer, p, what)
    return {id(p): (p, value, state) for p, value, state in zip(params, values, states)}


def commit(optimizer: torch.optim.Optimizer, staged: Dict[int, tuple]) -> None:
    """Write the steps :func:`stage_on_copies` took into the parameters and their states."""
    for p, value, state in staged.values():
        p.copy_(value)
        optimizer.state[p].update(state)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------
def tag_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """``state_dict`` with :data:`SAVED_BY` (the optimizer's class name) in each param group."""
    for group in state_dict["param_groups"]:
        group[SAVED_BY] = type(optimizer).__name__
    return state_dict


def check_finite_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Raise ``ValueError`` if a floating-point tensor of an optimizer ``state_dict`` (before
    it is loaded into ``optimizer``) has a non-finite entry, naming the state key and the
    parameter (its index in its param group and, where known, its shape)."""
    where = {}
    for g, group in enumerate(state_dict.get("param_groups", [])):
        for i, index in enumerate(group["params"]):
            where[index] = (g, i)
    for index, state in state_dict.get("state", {}).items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                g, i = where.get(index, (None, index))
                shape = ""
                if g is not None and g < len(optimizer.param_groups) and i < len(optimizer.param_groups[g]["params"]):
                    shape = f" (shape {tuple(optimizer.param_groups[g]['params'][i].shape)})"
                raise ValueError(
                    f"{type(optimizer).__name__}.load_state_dict: state {key!r} of parameter {i} of "
                    f"param group {g}{shape} has non-finite entries; nothing was loaded"
                )


#: What a state entry must be: a check ``value -> None`` (fine) or a description of what it
#: must be. Built by :func:`floating`, :func:`count` and :func:`counter`.
Expect = Callable[[object], Optional[str]]
#: ``(expected, together)``: the states an optimizer may keep for a parameter, each with its
#: check, and the groups of keys that are present together or not at all.
Layout = Tuple[Dict[str, Expect], Tuple[Tuple[str, ...], ...]]


def floating(shape: Iterable[int], what: str, none: bool = False) -> Expect:
    """A floating-point tensor of ``shape`` (``what`` says what it holds); ``None`` too with
    ``none``."""
    shape = tuple(shape)

    def check(value):
        if (value is None and none) or (
            isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == shape
        ):
            return None
        return f"a floating-point tensor of shape {shape} ({what})"
    return check


def count(value) -> Optional[str]:
    """A Python int ``>= 0`` (a step counter, a phase)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return "an int >= 0"


def counter(tensor_only: bool) -> Expect:
    """A step counter as ``torch.optim`` keeps it: a 0-d real tensor ``>= 0`` (or, unless
    ``tensor_only``, a number ``>= 0``: a checkpoint of an earlier version)."""
    def check(value):
        if isinstance(value, Tensor):
            if value.dim() == 0 and not value.is_complex() and bool(value >= 0):  # a host read, at load
                return None
        elif not tensor_only and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
            return None
        return "a 0-d tensor >= 0" + ("" if tensor_only else " (or a number >= 0)")
    return check


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _state_problem(name: str, state: dict, layout: Layout) -> Optional[str]:
    expected, together = layout
    for key, value in state.items():
        if key not in expected:
            return (f"it has a state {key!r}, which {name} does not keep for this parameter "
                    f"(its states here: {', '.join(expected) or 'none'})")
        wanted = expected[key](value)
        if wanted is not None:
            return f"its state {key!r} is {_describe(value)}; {name} keeps {wanted} there"
    for keys in together:
        present = [k for k in keys if k in state]
        if present and len(present) < len(keys):
            return f"its states {present} come without {[k for k in keys if k not in state]}"
    return None


def checked_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict,
                       loaded_group: Callable[[dict, dict], dict],
                       layout: Callable[[Tensor, dict], Layout]) -> dict:
    """The state dict to hand to ``torch.optim.Optimizer.load_state_dict``, after every check
    that loading it into ``optimizer`` makes sense, so that a refused one changes nothing:

    * its structure (param groups and their sizes, as torch's own load requires);
    * its origin: a state dict that says it was saved by another optimizer (:data:`SAVED_BY`)
      is refused by both names;
    * the finiteness of its floating-point states (:func:`check_finite_state_dict`);
    * its hyperparameters: ``loaded_group(saved, current)`` returns each saved group as it
      will be loaded (old option names renamed, missing options defaulted), after the
      constructor's own checks (an error names the param group and the key);
    * its states: for each parameter, ``layout(p, group)`` (:data:`Layout`) says which states
      the optimizer keeps for it, with which shapes (a low-rank weight's: its capacity) and
      dtypes; a foreign key, a wrong shape or an incomplete set is refused by key.

    Errors are ``ValueError`` (``TypeError`` for a hyperparameter of a wrong type)."""
    name = type(optimizer).__name__
    where = f"{name}.load_state_dict"
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: a state dict has the keys 'state' and 'param_groups'; nothing was loaded")
    saved, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(f"{where}: the state dict has {len(saved)} param groups, this optimizer "
                         f"{len(groups)}; nothing was loaded")
    for g, (s, c) in enumerate(zip(saved, groups)):
        if len(s["params"]) != len(c["params"]):
            raise ValueError(f"{where}: param group {g} of the state dict has {len(s['params'])} "
                             f"parameters, this optimizer's {len(c['params'])}; nothing was loaded")
    for s in saved:
        by = s.get(SAVED_BY)
        if by is not None and by != name:
            raise ValueError(f"{where}: this state dict was saved by {by}, not by {name}: its "
                             f"hyperparameters and states are {by}'s; nothing was loaded")
    check_finite_state_dict(optimizer, state_dict)
    loaded = []
    for g, (s, c) in enumerate(zip(saved, groups)):
        try:
            loaded.append(loaded_group({k: v for k, v in s.items() if k != SAVED_BY}, c))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: param group {g}: {error}; nothing was loaded") from None
    params = {}
    for g, (s, c) in enumerate(zip(saved, groups)):
        for i, (index, p) in enumerate(zip(s["params"], c["params"])):
            params[index] = (g, i, p)
    for index, state in state_dict["state"].items():
        if index not in params:
            continue  # torch keeps states of no parameter as they are
        g, i, p = params[index]
        problem = _state_problem(name, state, layout(p, loaded[g]))
        if problem is not None:
            raise ValueError(
                f"{where}: parameter {i} of param group {g} (shape {tuple(p.shape)}): {problem}. The "
                "state dict was saved by another optimizer or for other parameters; nothing was loaded"
            )
    return {**state_dict, "param_groups": loaded}
