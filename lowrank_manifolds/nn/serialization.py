r"""Save the low-rank state of a model and load it into a freshly built base model.

The analogue of ``peft``'s ``save_pretrained`` / ``from_pretrained`` for the layers of
:mod:`lowrank_manifolds.nn`. What is saved, per layer (tensors in a ``safetensors`` file, the
rest as JSON in its metadata):

- :class:`LowRankLinear` / :class:`LowRankConv2d`: the packed point ``[U; S; V]`` (static
  shape ``(m + R + n, R)``, inactive part exactly zero), the bias; the capacity ``R``, the
  nominal and the active rank, the truncation policy of the manifold (``tol``, ``relative``,
  ``min_rank``), the retraction, the second moment and the dense type the layer replaced;
- :class:`LowRankAdapterLinear`: the correction ``delta`` and, for adapters made by
  :func:`~lowrank_manifolds.nn.add_adapters`, the initial correction :math:`\Delta_0` that was
  folded into the base (:math:`W_0 \leftarrow W_0 - \Delta_0`, so that the adapted model starts
  as the base model); the base weights themselves are not saved. An adapter built directly
  with ``exact_init=True`` does not know its :math:`\Delta_0`; its (modified) base weight and
  bias are then saved instead.
- with ``extra="trainable"`` (default) every other parameter that requires a gradient (the
  embeddings, norms and head of a compressed model trained whole; nothing for frozen
  adapters); ``"all"`` saves the rest of the ``state_dict`` too, ``"none"`` nothing else.

Loading rebuilds each layer at its qualified name of the fresh model (which must hold the
dense layer of the recorded type and shape there), copies the saved tensors, and recomputes
the base offset :math:`W_0 - \Delta_0` of the adapters with the same operation as at wrapping
time. If the fresh model has the base weights of the saved one (same checkpoint or same seed),
the loaded model computes bit-identical outputs. Neither direction forms an ``m x n`` matrix
except :math:`\Delta_0` (one per adapter, the cost of wrapping it).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple, Union

import geoopt
import torch
from torch import Tensor, nn

from ._common import active_rank_int, is_lowrank_layer
from .adapter import LowRankAdapterLinear
from .layers import LowRankConv2d, LowRankLinear
from .registry import linear_kind, origin_type, set_origin_type, type_name

__all__ = [
    "lowrank_state_dict",
    "load_lowrank_state_dict",
    "save_lowrank",
    "load_lowrank",
    "record_initial_correction",
    "fold_initial_correction",
]

FORMAT = "lowrank_manifolds.lowrank/1"
_META_KEY = "lowrank_manifolds"
_INIT = "delta_init"
_UNTOUCHED = "_lowrank_base_untouched"


# ------------------------------------------------------------------ the adapters' initial offset
def record_initial_correction(adapter: LowRankAdapterLinear, folded: bool = True) -> None:
    r"""Keep the current correction as :math:`\Delta_0` (a non-persistent buffer ``delta_init``:
    not in the ``state_dict``, moved by ``.to()``), so that :func:`save_lowrank` can save it;
    ``folded=False`` records instead that the base is the untouched dense layer (nothing to keep)."""
    if folded:
        adapter.register_buffer(_INIT, adapter.delta.detach().clone().as_subclass(Tensor), persistent=False)
    else:
        adapter.__dict__[_UNTOUCHED] = True


def fold_initial_correction(adapter: LowRankAdapterLinear) -> None:
    r""":math:`W_0 \leftarrow W_0 - \Delta_0` with :math:`\Delta_0 = U_0 S_0 V_0^\top` from the recorded
    ``delta_init`` (packed, zero padded): the adapted layer then computes the base layer's map
    (to rounding). Cost :math:`O(mnR)`; the one operation both the wrapping and the loading use,
    so a loaded base is bit-identical to the wrapped one."""
    init = getattr(adapter, _INIT)
    with torch.no_grad():
        adapter.base.weight.sub_(adapter.manifold.to_dense(init))


# ------------------------------------------------------------------ the base's fingerprint
_PROBES = 4


def _base_probes(weight: Tensor, correction=None) -> Tuple[list, float]:
    r"""``([a_k^T W_0 b_k], scale)`` in float64 for ``_PROBES`` fixed random unit vectors ``a_k``,
    ``b_k`` (seeded by the shape: the same at saving and loading), where :math:`W_0` is
    ``weight`` plus the folded correction ``(U, S, V)`` if given (applied in factored form), and
    ``scale`` bounds :math:`\|W_0\|_F`. Two bases that differ by ``E`` differ in a probe by about
    :math:`\|E\|_F / \sqrt{mn}`; rounding moves one by a few ``eps * scale``. One pass over the
    weight, at saving and loading only."""
    m, n = weight.shape
    g = torch.Generator().manual_seed(m * 1_000_003 + n)
    a = torch.randn(m, _PROBES, generator=g, dtype=torch.float64)
    b = torch.randn(n, _PROBES, generator=g, dtype=torch.float64)
    a, b = ((t / t.norm(dim=0)).to(weight.device) for t in (a, b))
    w = weight.detach().to(torch.float64)
    probes, scale = (a * (w @ b)).sum(0), w.norm()
    if correction is not None:
        u, s, v = (t.detach().to(torch.float64) for t in correction)
        probes = probes + ((a.T @ u) @ s * (b.T @ v)).sum(-1)
        scale = scale + s.norm()
    return probes.tolist(), float(scale)


def _check_base(name: str, spec: Dict[str, Any], weight: Tensor) -> None:
    """Raise if the base weight of an adapter's layer is not the one it was saved with (to
    ``32 eps`` of its dtype, relative to its norm: bit-identical bases pass on any device)."""
    if "base_probes" not in spec:  # a file written before the fingerprint
        return
    got, scale = _base_probes(weight)
    tol = 32 * torch.finfo(weight.dtype).eps * max(scale, spec["base_scale"])
    if any(abs(x - y) > tol for x, y in zip(got, spec["base_probes"])):
        raise ValueError(
            f"{name}: the model's base weight is not the one these adapters were trained on (its "
            "fingerprint differs): load them into the same pretrained base model, or pass "
            "check_base=False to load them anyway")


# ------------------------------------------------------------------ saving
def _plain(t: Tensor) -> Tensor:
    return t.detach().as_subclass(Tensor).clone().contiguous()


def _truncation(mf) -> Dict[str, Any]:
    tr = mf.truncation
    return {"tol": float(tr.tol), "relative": bool(tr.relative), "min_rank": int(tr.min_rank)}


def _retraction_name(mf) -> str:
    if not isinstance(mf.retraction, str):
        raise TypeError("a layer whose manifold retracts with an integrator instance cannot be saved: "
                        "its retraction is not a name")
    return mf.retraction


def _layer_spec(layer: nn.Module) -> Dict[str, Any]:
    mf = layer.manifold
    spec: Dict[str, Any] = {
        "class": type(layer).__name__,
        "origin": type_name(nn.Conv2d if isinstance(layer, LowRankConv2d) else origin_type(layer)),
        "m": mf.m,
        "n": mf.n,
        "rank": mf.rank,
        "capacity": mf.capacity,
        "adaptive": bool(mf.adaptive),
        "active_rank": active_rank_int(mf, layer.delta if isinstance(layer, LowRankAdapterLinear) else layer.weight),
        "retraction": _retraction_name(mf),
        "second_moment": mf.second_moment,
        "dtype": str((layer.delta if isinstance(layer, LowRankAdapterLinear) else layer.weight).dtype),
    }
    if mf.adaptive:
        spec.update(_truncation(mf))
    return spec


def _our_layers(model: nn.Module):
    """``(name, layer)`` of this library's layers, outermost only."""
    found = []
    for name, mod in model.named_modules():
        if is_lowrank_layer(mod) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, mod))
    return found


def lowrank_state_dict(model: nn.Module, extra: str = "trainable") -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(tensors, metadata)``: the low-rank state of ``model`` (see the module docstring).

    ``extra``: ``"trainable"`` (default), ``"all"`` or ``"none"``: which other entries of the
    ``state_dict`` are saved. The tensors are detached copies (plain ``torch.Tensor``)."""
    if extra not in ("trainable", "all", "none"):
        raise ValueError(f"extra must be 'trainable', 'all' or 'none', got {extra!r}")
    tensors: Dict[str, Tensor] = {}
    layers: Dict[str, Any] = {}
    found = _our_layers(model)
    for name, layer in found:
        spec = _layer_spec(layer)
        pre = f"{name}." if name else ""
        if isinstance(layer, LowRankAdapterLinear):
            tensors[pre + "delta"] = _plain(layer.delta)
            init = getattr(layer, _INIT, None)
            untouched = init is None and layer.__dict__.get(_UNTOUCHED, False)
            spec["init"] = "delta_init" if init is not None else ("none" if untouched else "base")
            spec["bias"] = layer.base.bias is not None
            spec["init_scale"] = layer.init_scale
            if init is not None or untouched:  # the base is not saved: its fingerprint is
                spec["base_probes"], spec["base_scale"] = _base_probes(
                    layer.base.weight, None if untouched else layer.manifold.unpack(init))
            if init is not None:
                tensors[pre + _INIT] = _plain(init)
            elif not untouched:
                tensors[pre + "base.weight"] = _plain(layer.base.weight)
                if layer.base.bias is not None:
                    tensors[pre + "base.bias"] = _plain(layer.base.bias)
        else:
            tensors[pre + "weight"] = _plain(layer.weight)
            spec["bias"] = layer.bias is not None
            if layer.bias is not None:
                tensors[pre + "bias"] = _plain(layer.bias)
        layers[name] = spec
    if extra != "none":
        inside = [n for n, _ in found]

        def ours(key: str) -> bool:
            return any(n == "" or key.startswith(n + ".") for n in inside)

        if extra == "trainable":
            items = ((k, p) for k, p in model.named_parameters() if p.requires_grad)
        else:
            items = model.state_dict(keep_vars=True).items()
        seen = set()
        for key, t in items:
            if ours(key) or id(t) in seen:
                continue
            seen.add(id(t))
            tensors[key] = _plain(t)
    return tensors, {"format": FORMAT, "layers": layers, "extra": extra}


def save_lowrank(model: nn.Module, path: Union[str, os.PathLike], extra: str = "trainable",
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Write :func:`lowrank_state_dict` to a ``safetensors`` file (needs ``safetensors``): ``path``
    itself if it ends in ``.safetensors``, else ``path/lowrank.safetensors`` (the folder is
    created). ``metadata``: more string pairs for the file's header."""
    from safetensors.torch import save_file

    tensors, meta = lowrank_state_dict(model, extra)
    path = _file(path, create=True)
    header = dict(metadata or {})
    header[_META_KEY] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)


def _file(path, create: bool = False) -> str:
    """A path ending in ``.safetensors`` is the file; any other is a folder holding
    ``lowrank.safetensors`` (created when saving)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return path
    if create:
        os.makedirs(path, exist_ok=True)
    return os.path.join(path, "lowrank.safetensors")


# ------------------------------------------------------------------ loading
def _build_lowrank(spec: Dict[str, Any], dense: nn.Module, name: str) -> nn.Module:
    kw = dict(max_rank=spec["capacity"] if spec["adaptive"] else None, tol=spec.get("tol", 0.0),
              retraction=spec["retraction"], second_moment=spec.get("second_moment", "scalar"))
    if spec["class"] == "LowRankConv2d":
        if type(dense) is not nn.Conv2d:
            raise TypeError(f"{name}: the saved layer replaced an nn.Conv2d, the model has a {type(dense).__name__}")
        w = dense.weight
        layer = torch.nn.utils.skip_init(
            LowRankConv2d, dense.in_channels, dense.out_channels, dense.kernel_size, spec["rank"],
            stride=dense.stride, padding=dense.padding, dilation=dense.dilation, bias=dense.bias is not None,
            padding_mode=dense.padding_mode, dtype=w.dtype, device=w.device, **kw)
    else:
        kind = linear_kind(dense)
        if kind is None:
            raise TypeError(f"{name}: {type(dense).__name__} is not a registered linear type")
        shape = _linear_shape(dense, kind)
        w = next(dense.parameters())
        layer = torch.nn.utils.skip_init(
            LowRankLinear, shape[1], shape[0], spec["rank"], bias=spec["bias"], dtype=w.dtype, device=w.device, **kw)
        set_origin_type(layer, type(dense))
    layer.train(dense.training)
    return layer


def _linear_shape(dense: nn.Module, kind) -> Tuple[int, int]:
    if isinstance(dense, nn.Linear):
        return dense.out_features, dense.in_features
    if hasattr(dense, "nf") and hasattr(dense, "nx"):  # transformers' Conv1D, without a copy
        return int(dense.nf), int(dense.nx)
    lin = kind.to_linear(dense)
    return lin.out_features, lin.in_features


def _build_adapter(spec: Dict[str, Any], dense: nn.Module, name: str) -> LowRankAdapterLinear:
    kind = linear_kind(dense)
    if kind is None:
        raise TypeError(f"{name}: {type(dense).__name__} is not a registered linear type")
    base = kind.to_linear(dense)
    adapter = LowRankAdapterLinear(base, spec["rank"], max_rank=spec["capacity"] if spec["adaptive"] else None,
                                   tol=spec.get("tol", 0.0), init_scale=spec["init_scale"], exact_init=False,
                                   second_moment=spec.get("second_moment", "scalar"))
    set_origin_type(adapter, type(dense))
    adapter.train(dense.training)
    return adapter


def _check_spec(name: str, spec: Dict[str, Any], layer: nn.Module, dense: nn.Module) -> None:
    if type_name(type(dense)) != spec["origin"]:
        raise TypeError(f"{name}: the saved layer replaced a {spec['origin']}, the model has a "
                        f"{type_name(type(dense))}")
    mf = layer.manifold
    if (mf.m, mf.n) != (spec["m"], spec["n"]):
        raise ValueError(f"{name}: saved for a {spec['m']} x {spec['n']} weight, the model's is {mf.m} x {mf.n}")
    if mf.adaptive and _truncation(mf) != {k: spec[k] for k in ("tol", "relative", "min_rank")}:
        raise ValueError(f"{name}: the saved truncation policy {spec} cannot be rebuilt by the layer "
                         "constructors (non-default relative/min_rank)")


def _copy_point(param: geoopt.ManifoldParameter, saved: Tensor, name: str) -> None:
    if tuple(saved.shape) != tuple(param.shape):
        raise ValueError(f"{name}: saved point of shape {tuple(saved.shape)}, the layer's is {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(saved)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_lowrank_state_dict(model: nn.Module, tensors: Dict[str, Tensor], metadata: Dict[str, Any],
                            freeze: Optional[bool] = None, check_base: bool = True) -> nn.Module:
    """Rebuild the saved layers in the fresh ``model`` (in place) and copy the saved tensors.

    ``freeze``: with adapters in the file, freeze every other parameter (as
    :func:`~lowrank_manifolds.nn.add_adapters` does); default: when the file holds adapters and no
    other trainable entries. ``check_base``: for adapters whose base weights are not in the file,
    compare the fresh model's base with the fingerprint saved with them (a few fixed random
    projections and the norm, after the initial correction is folded in as at wrapping time) and
    raise ``ValueError`` before the model is changed if it differs; exact for float32/float64
    bases, to their precision for half-precision ones. Returns ``model``."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a low-rank state of this library (format {metadata.get('format')!r})")
    tensors = dict(tensors)
    has_adapters = False
    if check_base:  # all of them before anything is changed
        for name, spec in metadata["layers"].items():
            if spec["class"] == "LowRankAdapterLinear" and name:
                dense = model.get_submodule(name)
                kind = linear_kind(dense)
                if kind is not None:
                    _check_base(name, spec, kind.to_linear(dense).weight)
    for name, spec in metadata["layers"].items():
        if not name:
            raise ValueError("the saved model was itself one layer: load it with load_state_dict")
        dense = model.get_submodule(name)
        pre = name + "."
        if spec["class"] == "LowRankAdapterLinear":
            has_adapters = True
            layer = _build_adapter(spec, dense, name)
            _check_spec(name, spec, layer, dense)
            if spec["init"] == "delta_init":
                init = tensors.pop(pre + _INIT)
                _copy_point(layer.delta, init, name)
                record_initial_correction(layer)
                fold_initial_correction(layer)
            elif spec["init"] == "none":
                record_initial_correction(layer, folded=False)
            else:
                with torch.no_grad():
                    layer.base.weight.copy_(tensors.pop(pre + "base.weight"))
                    if layer.base.bias is not None:
                        layer.base.bias.copy_(tensors.pop(pre + "base.bias"))
            _copy_point(layer.delta, tensors.pop(pre + "delta"), name)
        else:
            layer = _build_lowrank(spec, dense, name)
            _check_spec(name, spec, layer, dense)
            _copy_point(layer.weight, tensors.pop(pre + "weight"), name)
            if layer.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(tensors.pop(pre + "bias"))
        got = active_rank_int(layer.manifold, layer.delta if spec["class"] == "LowRankAdapterLinear" else layer.weight)
        if got != spec["active_rank"]:
            raise ValueError(f"{name}: the loaded point has active rank {got}, saved with {spec['active_rank']}")
        _set_child(model, name, layer)
    if tensors:
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"entries of the file the model does not have: {result.unexpected_keys[:8]}")
    if freeze is None:
        freeze = has_adapters and not tensors
    if freeze:
        deltas = {id(m.delta) for m in model.modules() if isinstance(m, LowRankAdapterLinear)}
        for p in model.parameters():
            if id(p) not in deltas:
                p.requires_grad_(False)
    return model


def load_lowrank(model: nn.Module, path: Union[str, os.PathLike], freeze: Optional[bool] = None,
                 device: Union[str, torch.device, None] = None, check_base: bool = True) -> nn.Module:
    """Load a file written by :func:`save_lowrank` into the fresh ``model`` (in place; returned).

    ``device``: where the tensors are read to (default: the CPU; they are copied into the
    model's layers, which keep the device and dtype of the model's dense layers). ``freeze``,
    ``check_base``: as :func:`load_lowrank_state_dict` (by default a model whose base weights are
    not those the adapters were saved with is refused, unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _file(path)
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if _META_KEY not in header:
        raise ValueError(f"{path} holds no low-rank state of this library")
    tensors = load_file(path, device=str(device) if device is not None else "cpu")
    return load_lowrank_state_dict(model, tensors, json.loads(header[_META_KEY]), freeze=freeze,
                                   check_base=check_base)
