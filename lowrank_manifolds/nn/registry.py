r"""Which dense layer types the model surgery knows, each seen as a linear map.

:func:`~lowrank_manifolds.nn.convert_to_low_rank`, :func:`~lowrank_manifolds.nn.add_adapters`,
:func:`~lowrank_manifolds.nn.export_dense` and the serialization of
:mod:`lowrank_manifolds.nn.serialization` work on any layer type registered here. A
registered type computes an affine map of its last axis,

.. math:: y = x W^\top + b, \qquad W \in \mathbb{R}^{m \times n} \ (m\ \text{outputs}, n\ \text{inputs}),

and its entry says how to read it as an ``nn.Linear`` with that ``W`` (``to_linear``) and
how to build a layer of the type back from one (``from_linear``), so that a merged or
exported model has the types (and the ``state_dict`` layout) it had before the surgery.

Built in:

- ``torch.nn.Linear`` (``to_linear`` returns the layer itself, no copy);
- ``transformers.pytorch_utils.Conv1D`` (GPT-2 and relatives), which stores its weight as
  ``in x out`` and computes :math:`y = x W_c + b`, so :math:`W = W_c^\top`. It is registered the
  first time a lookup runs while ``transformers`` is imported (it is never imported here: a
  model that holds a ``Conv1D`` has imported it already), so ``transformers`` stays optional.

Users register their own types with :func:`register_linear`. Lookups are by exact type:
a subclass of a registered type may compute something else (``nn.MultiheadAttention``'s
``out_proj`` is an ``nn.Linear`` subclass whose weight its parent reads directly), so it is
left alone until it is registered itself.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import nn

__all__ = ["LinearKind", "register_linear", "linear_kind", "registered_linear_types", "origin_type",
           "set_origin_type", "restore_layer", "type_name"]


@dataclass(frozen=True)
class LinearKind:
    """How the surgery reads and rebuilds one registered layer type.

    Attributes
    ----------
    module_type : type
        The exact ``nn.Module`` subclass.
    to_linear : callable ``(module) -> nn.Linear``
        An ``nn.Linear`` computing the module's map (the module itself for ``nn.Linear``,
        else a new layer; its weight is ``out x in``). It may share or copy the tensors.
    from_linear : callable ``(linear) -> nn.Module``
        A new module of ``module_type`` computing the map of ``linear`` (used by
        :func:`~lowrank_manifolds.nn.export_dense` to give back the model's own types).
    """

    module_type: Type[nn.Module]
    to_linear: Callable[[nn.Module], nn.Linear]
    from_linear: Callable[[nn.Linear], nn.Module]


_REGISTRY: Dict[type, LinearKind] = {}


def register_linear(
    module_type: Type[nn.Module],
    to_linear: Callable[[nn.Module], nn.Linear],
    from_linear: Callable[[nn.Linear], nn.Module],
    *,
    replace: bool = False,
) -> LinearKind:
    r"""Make the model surgery convert, wrap and export layers of ``module_type``.

    Parameters
    ----------
    module_type : type
        An ``nn.Module`` subclass whose forward is :math:`y = x W^\top + b` on the last axis
        (matched exactly, not its subclasses).
    to_linear : callable
        ``to_linear(module) -> nn.Linear`` with the same map (same dtype and device).
    from_linear : callable
        ``from_linear(linear) -> module_type`` instance with the map of ``linear``.
    replace : bool
        Allow replacing an existing entry (``ValueError`` otherwise).

    Returns
    -------
    LinearKind
        The entry.

    Example: a layer holding its weight transposed, ``y = x @ self.w + self.b``
    (``self.w`` is ``in x out``)::

        def to_linear(mod):
            lin = nn.Linear(*mod.w.shape)
            with torch.no_grad():
                lin.weight.copy_(mod.w.T)
                lin.bias.copy_(mod.b)
            return lin

        register_linear(MyDense, to_linear, lambda lin: MyDense(lin.weight.T, lin.bias))
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (callable(to_linear) and callable(from_linear)):
        raise TypeError("to_linear and from_linear must be callables")
    _register_builtins()
    if module_type in _REGISTRY and not replace:
        raise ValueError(f"{type_name(module_type)} is registered already (pass replace=True)")
    kind = LinearKind(module_type, to_linear, from_linear)
    _REGISTRY[module_type] = kind
    return kind


def linear_kind(module: nn.Module) -> Optional[LinearKind]:
    """The entry of ``type(module)`` (exact type), or ``None``."""
    _register_builtins()
    return _REGISTRY.get(type(module))


def registered_linear_types() -> Tuple[type, ...]:
    """The registered types (``transformers``' ``Conv1D`` once ``transformers`` is imported)."""
    _register_builtins()
    return tuple(_REGISTRY)


def type_name(cls: type) -> str:
    """``module.QualName`` of a class (what reports and saved metadata record)."""
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- origins
_ORIGIN = "_lowrank_dense_type"


def set_origin_type(layer: nn.Module, module_type: type) -> None:
    """Remember on a low-rank layer or adapter which dense type it replaced (a plain attribute:
    it survives ``deepcopy`` and pickling, and is not part of the ``state_dict``)."""
    layer.__dict__[_ORIGIN] = module_type


def origin_type(layer: nn.Module) -> type:
    """The dense type a layer replaced (``nn.Linear`` unless recorded otherwise)."""
    return layer.__dict__.get(_ORIGIN, nn.Linear)


def restore_layer(linear: nn.Linear, module_type: type) -> nn.Module:
    """``linear`` as a module of ``module_type`` (itself for ``nn.Linear``)."""
    if module_type is nn.Linear:
        return linear
    _register_builtins()
    kind = _REGISTRY.get(module_type)
    if kind is None:
        raise KeyError(f"{type_name(module_type)} is not registered (see register_linear)")
    out = kind.from_linear(linear)
    out.train(linear.training)
    return out


# ----------------------------------------------------------------------------- built-ins
def _linear_from(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``weight`` (``out x in``) and ``bias``."""
    m, n = weight.shape
    lin = nn.Linear(n, m, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


def _conv1d_to_linear(mod: nn.Module) -> nn.Linear:
    # Conv1D: weight (nx, nf) = (in, out), y = x W_c + b, so W = W_c^T (copied contiguous)
    lin = _linear_from(mod.weight.detach().t(), None if mod.bias is None else mod.bias.detach())
    lin.train(mod.training)
    return lin


def _conv1d_from_linear(conv1d_type: type) -> Callable[[nn.Linear], nn.Module]:
    def build(lin: nn.Linear) -> nn.Module:
        w = lin.weight
        out = conv1d_type(lin.out_features, lin.in_features)  # Conv1D(nf, nx)
        out.to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            out.weight.copy_(w.detach().t())
            if lin.bias is not None:
                out.bias.copy_(lin.bias.detach())
            else:  # Conv1D always has a bias
                out.bias.zero_()
        return out

    return build


_builtins_done = {"linear": False, "conv1d": False}


def _register_builtins() -> None:
    if not _builtins_done["linear"]:
        _REGISTRY.setdefault(nn.Linear, LinearKind(nn.Linear, lambda mod: mod, lambda lin: lin))
        _builtins_done["linear"] = True
    if not _builtins_done["conv1d"] and "transformers" in sys.modules:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - a transformers without Conv1D
            _builtins_done["conv1d"] = True
            return
        _REGISTRY.setdefault(Conv1D, LinearKind(Conv1D, _conv1d_to_linear, _conv1d_from_linear(Conv1D)))
        _builtins_done["conv1d"] = True
