"""Finiteness checks shared by the optimizers: a non-finite gradient, or a non-finite value
in a loaded checkpoint, is reported by parameter before anything is written."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor


def check_finite_grads(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``FloatingPointError`` if a dense ``p.grad`` of ``optimizer`` has a non-finite
    entry, naming the first such parameter (its index in its param group and its shape).

    Cost: one multi-tensor max-abs reduction per device and dtype and one host
    synchronisation for each (free on the CPU): the decision whether the step may be taken
    needs it."""
    grads: Dict[tuple, List[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not p.grad.is_sparse and p.grad.device.type != "meta" and p.grad.numel():
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    # the largest |entry| of each gradient, one multi-tensor kernel per device and dtype: inf
    # or NaN exactly when an entry is (no overflow, unlike a 2-norm of large finite entries)
    if all(bool(torch.stack(torch._foreach_norm(g, float("inf"))).isfinite().all())  # host sync per list
           for g in grads.values()):
        return
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is not None and not p.grad.is_sparse and not bool(torch.isfinite(p.grad).all()):
                raise FloatingPointError(
                    f"{type(optimizer).__name__}: the gradient of parameter {i} of param group {g} "
                    f"(shape {tuple(p.shape)}) has non-finite entries; the step was not taken "
                    "(parameters, states and step counters are unchanged). With mixed precision, "
                    "torch.amp.GradScaler's scaler.step(optimizer) skips such steps."
                )


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
