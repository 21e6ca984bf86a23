"""Arguments at the public boundary: the checks every constructor shares, and renamed
arguments (the old name keeps working for a while, with a ``DeprecationWarning``)."""
from __future__ import annotations

import math
import warnings
from typing import Any


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


def renamed(old_name: str, old_value: Any, new_name: str, new_value: Any, where: str, unset: Any = None) -> Any:
    """The value of an argument renamed from ``old_name`` to ``new_name`` in ``where``:
    ``new_value``, or ``old_value`` (with a ``DeprecationWarning``) if only the old name was
    given; both at once is a ``TypeError``. ``unset`` is the default that means "not given"."""
    if old_value is unset:
        return new_value
    deprecated(f"{where}: the argument {old_name}= is deprecated, use {new_name}=", stacklevel=4)
    if new_value is not unset:
        raise TypeError(f"{where}: give {new_name}= only, not also the deprecated {old_name}=")
    return old_value


def deprecated(message: str, stacklevel: int = 3) -> None:
    """A ``DeprecationWarning`` attributed to the caller of the public function."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)
