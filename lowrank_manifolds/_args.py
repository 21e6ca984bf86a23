"""Arguments at the public boundary: the checks every constructor shares, and renamed
arguments (the old name keeps working for a while, with a ``DeprecationWarning``)."""
from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int ``>= 1`` (``TypeError`` / ``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def nonneg(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def unit_interval(value: Any, name: str) -> float:
    """``value`` as a float if it is a number in ``[0, 1)`` (``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def renamed(old_name: str, old_value: Any, new_name: str, new_value: Any, where: str, *, unset: Any = None,
            stacklevel: int = 5) -> Any:
    """The value of an argument renamed from ``old_name`` to ``new_name`` in ``where``:
    ``new_value``, or ``old_value`` (with a ``DeprecationWarning``) if only the old name was
    given; both at once is a ``TypeError``. ``unset`` is the default that means "not given";
    the default ``stacklevel`` suits a helper called by the public function."""
    if old_value is unset:
        return new_value
    deprecated(f"{where}: the argument {old_name}= is deprecated, use {new_name}=", stacklevel=stacklevel)
    if new_value is not unset:
        raise TypeError(f"{where}: give {new_name}= only, not also the deprecated {old_name}=")
    return old_value


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised here to the first frame outside
    this package and torch (the user's line), however deep the call and its decorators
    (``torch.no_grad``, ``torch.compiler.disable``) are."""
    import os
    import sys

    import torch

    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def deprecated(message: str, stacklevel: int = 3) -> None:
    """A ``DeprecationWarning`` attributed to the caller of the public function."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def check_ambient(z: Any, m: int, n: int, ref: Tensor, what: str):
    """Validate a field value: dense ``(..., m, n)`` or a pair ``(A (.., m, k), B (.., n, k))``
    with the dtype and device of ``ref``. Returns it with a pair as a tuple."""
    if isinstance(z, (tuple, list)):
        if len(z) != 2:
            raise ValueError(f"{what} as low-rank factors must be a pair (A, B), got {len(z)} items")
        parts = tuple(z)
        for t, rows, name in ((parts[0], m, "A"), (parts[1], n, "B")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}: factor {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2 or t.shape[-2] != rows:
                raise ValueError(f"{what}: factor {name} must have shape (..., {rows}, k), got {tuple(t.shape)}")
        if parts[0].shape[-1] != parts[1].shape[-1]:
            raise ValueError(
                f"{what}: factors A and B need the same number of columns, "
                f"got {parts[0].shape[-1]} and {parts[1].shape[-1]}"
            )
        tensors = parts
    elif isinstance(z, Tensor):
        if z.dim() < 2 or tuple(z.shape[-2:]) != (m, n):
            raise ValueError(f"{what} must have trailing shape (m, n) = ({m}, {n}), got {tuple(z.shape)}")
        tensors = (z,)
    else:
        raise TypeError(f"{what} must be a tensor (m x n) or a pair (A, B), got {type(z).__name__}")
    for t in tensors:
        if t.dtype != ref.dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but the factors have {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{what} is on {t.device} but the factors are on {ref.device}")
    return z if isinstance(z, Tensor) else tensors
