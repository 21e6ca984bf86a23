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

import torch
from torch import Tensor, nn

from ..integrators import INTEGRATORS
from ._common import active_rank_int, is_lowrank_layer, requires_grad_restored_on_error
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
_OLD_MOMENT = "scalar"  # the second moment of layers saved before it was recorded (then the default)


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


def _base_fingerprint(weight: Tensor, bias: Optional[Tensor], correction=None) -> Dict[str, Any]:
    r"""The fingerprint of a base layer :math:`(W_0, b_0)`, in float64:

    - ``base_probes``: :math:`a_k^\top W_0 b_k` for ``_PROBES`` fixed random unit vectors
      ``a_k``, ``b_k`` (seeded by the shape: the same at saving and loading);
    - ``base_norm``: :math:`\|W_0\|_F`;
    - with a bias, ``bias_probes`` :math:`c_k^\top b_0` and ``bias_norm`` :math:`\|b_0\|`.

    :math:`W_0` is ``weight`` plus the folded correction ``(U, S, V)`` if given, applied in
    factored form: :math:`a^\top (W + USV^\top) b = a^\top W b + (a^\top U) S (V^\top b)` and
    :math:`\|W + USV^\top\|_F^2 = \|W\|_F^2 + 2\,\langle S, U^\top W V\rangle + \|S\|_F^2`
    (orthonormal active columns, zero inactive ones). One pass over the weight, at saving and
    loading only."""
    m, n = weight.shape
    g = torch.Generator().manual_seed(m * 1_000_003 + n)
    a = torch.randn(m, _PROBES, generator=g, dtype=torch.float64)
    b = torch.randn(n, _PROBES, generator=g, dtype=torch.float64)
    c = torch.randn(m, _PROBES, generator=g, dtype=torch.float64)  # drawn after a, b: old files agree
    a, b, c = ((t / t.norm(dim=0)).to(weight.device) for t in (a, b, c))
    w = weight.detach().to(torch.float64)
    probes, sq = (a * (w @ b)).sum(0), (w * w).sum()
    if correction is not None:
        u, s, v = (t.detach().to(torch.float64) for t in correction)
        probes = probes + ((a.T @ u) @ s * (b.T @ v)).sum(-1)
        sq = sq + 2 * (s * (u.T @ (w @ v))).sum() + (s * s).sum()
    out = {"base_probes": probes.tolist(), "base_norm": float(sq.clamp(min=0).sqrt())}
    if bias is not None:
        bias = bias.detach().to(torch.float64)
        out["bias_probes"], out["bias_norm"] = (bias @ c).tolist(), float(bias.norm())
    return out


def _check_base(name: str, spec: Dict[str, Any], weight: Tensor, bias: Optional[Tensor]) -> None:
    """Raise if the base layer of an adapter is not the one it was saved with: every saved probe
    and norm must agree to ``32 eps`` of the weight's dtype times the larger norm (rounding moves
    a probe by a few ``eps`` times the norm: bit-identical bases pass on any device). Files
    written before the norms and the bias were fingerprinted are checked on what they hold."""
    if "base_probes" not in spec:  # a file written before the fingerprint
        return
    got = _base_fingerprint(weight, bias)
    eps = 32 * torch.finfo(weight.dtype).eps
    scale = eps * max(got["base_norm"], spec.get("base_norm", spec.get("base_scale", 0.0)))
    bad = [f"probe {k}" for k, (x, y) in enumerate(zip(got["base_probes"], spec["base_probes"]))
           if abs(x - y) > scale]
    if "base_norm" in spec and abs(got["base_norm"] - spec["base_norm"]) > scale:
        bad.append(f"weight norm {got['base_norm']:.9g}, saved {spec['base_norm']:.9g}")
    if "bias_norm" in spec:
        if bias is None:
            bad.append("the saved base had a bias, the model's has none")
        else:
            tol = eps * max(got["bias_norm"], spec["bias_norm"])
            if abs(got["bias_norm"] - spec["bias_norm"]) > tol or any(
                    abs(x - y) > tol for x, y in zip(got["bias_probes"], spec["bias_probes"])):
                bad.append(f"bias (norm {got['bias_norm']:.9g}, saved {spec['bias_norm']:.9g})")
    elif "base_norm" in spec and bias is not None:
        bad.append("the saved base had no bias, the model's has one")
    if bad:
        raise ValueError(
            f"{name}: the model's base layer is not the one these adapters were trained on (its "
            f"fingerprint differs: {'; '.join(bad)}): load them into the same pretrained base model, or "
            "pass check_base=False to load them anyway")


# ------------------------------------------------------------------ saving
def _plain(t: Tensor) -> Tensor:
    return t.detach().as_subclass(Tensor).clone().contiguous()


def _truncation(mf) -> Dict[str, Any]:
    tr = mf.truncation
    return {"tol": float(tr.tol), "relative": bool(tr.relative), "min_rank": int(tr.min_rank)}


def _retraction_name(mf) -> str:
    """The name the manifold's retraction is rebuilt from: ``"metric"``, ``"orthographic"``, or
    the name of an integrator with its default options (as a name given to a layer makes it)."""
    if isinstance(mf.retraction, str):
        return mf.retraction
    for name, cls in INTEGRATORS.items():
        if type(mf.retraction) is cls and vars(mf.retraction) == vars(cls()):
            return name
    raise TypeError(f"a layer whose manifold retracts with {mf.retraction!r} cannot be saved: the file "
                    "records a retraction by name, and this integrator is not one of "
                    f"{sorted(INTEGRATORS)} with its default options")


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
    """``(name, layer)`` of this library's layers, outermost only; ``TypeError`` for other
    modules holding a point (the corrections of :mod:`lowrank_manifolds.peft`, which peft saves)."""
    found = []
    for name, mod in model.named_modules():
        if is_lowrank_layer(mod) and not any(name.startswith(p + ".") for p, _ in found):
            if not isinstance(mod, (LowRankLinear, LowRankConv2d, LowRankAdapterLinear)):
                raise TypeError(f"{name}: a {type(mod).__name__} is not a layer save_lowrank can rebuild; a model "
                                "adapted through lowrank_manifolds.peft is saved with peft's "
                                "model.save_pretrained(dir) and loaded with PeftModel.from_pretrained")
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
                spec.update(_base_fingerprint(layer.base.weight, layer.base.bias,
                                              None if untouched else layer.manifold.unpack(init)))
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
    if path.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")):
        raise ValueError(f"{path}: the low-rank state is a safetensors file (no pickle): give a path "
                         "ending in .safetensors, or a folder")
    if create:
        os.makedirs(path, exist_ok=True)
    return os.path.join(path, "lowrank.safetensors")


# ------------------------------------------------------------------ loading
# The metadata a layer's spec must hold, with their JSON types (a hand-edited or corrupt file
# is refused by name before anything is built).
_SPEC_KEYS = {"class": str, "origin": str, "m": int, "n": int, "rank": int, "capacity": int,
              "adaptive": bool, "active_rank": int, "retraction": str, "bias": bool}
_ADAPTER_KEYS = {"init": str, "init_scale": (int, float)}
_CLASSES = ("LowRankLinear", "LowRankConv2d", "LowRankAdapterLinear")


def _check_spec_types(name: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"{name}: the saved layer's metadata is a {type(spec).__name__}, not a mapping")
    if spec.get("class") not in _CLASSES:
        raise ValueError(f"{name}: unknown saved layer class {spec.get('class')!r} (one of {_CLASSES})")
    need = dict(_SPEC_KEYS, **(_ADAPTER_KEYS if spec["class"] == "LowRankAdapterLinear" else {}))
    if spec["adaptive"] if isinstance(spec.get("adaptive"), bool) else False:
        need.update(tol=(int, float), relative=bool, min_rank=int)
    for key, kind in need.items():
        value = spec.get(key)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{name}: the saved metadata {key!r} must be of type "
                             f"{getattr(kind, '__name__', kind)}, got {value!r}")
    if spec["class"] == "LowRankAdapterLinear" and spec["init"] not in ("delta_init", "none", "base"):
        raise ValueError(f"{name}: unknown saved initial correction {spec['init']!r}")


def _take(tensors: Dict[str, Tensor], key: str, like: Tensor, name: str) -> Tensor:
    """The saved tensor ``key`` (removed from ``tensors``), checked to fit ``like`` and finite
    (as the layers' constructors require of a dense weight)."""
    if key not in tensors:
        raise KeyError(f"{name}: the file has no tensor {key!r}")
    t = tensors.pop(key)
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name}: the saved {key!r} must be a floating tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name}: the saved {key!r} has shape {tuple(t.shape)}, the layer's is {tuple(like.shape)}")
    t = t.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(t).all()):  # one host read per tensor, at loading only
        raise ValueError(f"{name}: the saved {key!r} contains non-finite values (nan or inf)")
    return t


def point_tolerance(dtype: torch.dtype) -> float:
    """The tolerance a loaded point's bases are checked to (``U^T U`` against the identity of
    its active columns, absolute and relative, as ``torch.allclose``): ``max(1e-5, 100 eps)``,
    a hundred times the rounding of a basis kept orthonormal by the retractions' QRs."""
    return max(1e-5, 100 * torch.finfo(dtype).eps)


def _checked_point(name: str, key: str, saved: Tensor, mf, active_rank: Optional[int]) -> Tensor:
    """``saved`` if it is a valid point of ``mf`` (finite, orthonormal bases, active columns
    first, inactive block exactly zero, active ``S`` nonsingular) of the saved active rank."""
    tol = point_tolerance(saved.dtype)
    ok, why = mf.check_point_on_manifold(saved, explain=True, atol=tol, rtol=tol)
    if not ok:
        raise ValueError(f"{name}: the saved {key!r} is not a point of its manifold: {why}")
    if active_rank is not None and active_rank_int(mf, saved) != active_rank:
        raise ValueError(f"{name}: the saved {key!r} has active rank {active_rank_int(mf, saved)}, "
                         f"the metadata says {active_rank}")
    return saved


def _build_lowrank(spec: Dict[str, Any], dense: nn.Module, name: str) -> nn.Module:
    kw = dict(max_rank=spec["capacity"] if spec["adaptive"] else None, tol=spec.get("tol", 0.0),
              retraction=spec["retraction"], second_moment=spec.get("second_moment", _OLD_MOMENT))
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


def _build_adapter(spec: Dict[str, Any], base: nn.Linear, dense: nn.Module) -> LowRankAdapterLinear:
    """The adapter around ``base`` (``dense`` read as an ``nn.Linear``; for an ``nn.Linear``,
    ``dense`` itself, which the constructor freezes and leaves otherwise unchanged)."""
    adapter = LowRankAdapterLinear(base, spec["rank"], max_rank=spec["capacity"] if spec["adaptive"] else None,
                                   tol=spec.get("tol", 0.0), init_scale=spec["init_scale"], exact_init=False,
                                   second_moment=spec.get("second_moment", _OLD_MOMENT))
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
    if mf.capacity != spec["capacity"]:
        raise ValueError(f"{name}: saved with capacity {spec['capacity']}, rebuilt with {mf.capacity}")
    if mf.adaptive and _truncation(mf) != {k: spec[k] for k in ("tol", "relative", "min_rank")}:
        raise ValueError(f"{name}: the saved truncation policy {spec} cannot be rebuilt by the layer "
                         "constructors (non-default relative/min_rank)")


def _plan(model: nn.Module, name: str, spec: Dict[str, Any], tensors: Dict[str, Tensor], check_base: bool):
    """``(new layer, writes)``: the layer saved at ``name``, built aside with its saved tensors,
    and the writes to the model's own tensors it needs (run once every layer is planned)."""
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"{name}: the model has no module of that name") from None
    pre = name + "."
    writes = []
    if spec["class"] == "LowRankAdapterLinear":
        kind = linear_kind(dense)
        if kind is None:
            raise TypeError(f"{name}: {type(dense).__name__} is not a registered linear type")
        base = kind.to_linear(dense)
        if check_base and spec["init"] != "base":
            _check_base(name, spec, base.weight, base.bias)
        if (base.bias is not None) != spec["bias"]:
            raise ValueError(f"{name}: saved {'with' if spec['bias'] else 'without'} a base bias, the model's "
                             f"layer has {'one' if base.bias is not None else 'none'}")
        layer = _build_adapter(spec, base, dense)
        _check_spec(name, spec, layer, dense)
        mf = layer.manifold
        with torch.no_grad():
            if spec["init"] == "delta_init":
                layer.delta.copy_(_checked_point(name, pre + _INIT, _take(tensors, pre + _INIT, layer.delta, name),
                                                 mf, None))
                record_initial_correction(layer)
                writes.append(lambda: fold_initial_correction(layer))
            elif spec["init"] == "none":
                record_initial_correction(layer, folded=False)
            else:
                weight = _take(tensors, pre + "base.weight", layer.base.weight, name)
                bias = None if base.bias is None else _take(tensors, pre + "base.bias", layer.base.bias, name)

                def write_base(layer=layer, weight=weight, bias=bias):
                    layer.base.weight.copy_(weight)
                    if bias is not None:
                        layer.base.bias.copy_(bias)

                writes.append(write_base)
            delta = _take(tensors, pre + "delta", layer.delta, name)
            layer.delta.copy_(_checked_point(name, pre + "delta", delta, mf, spec["active_rank"]))
    else:
        layer = _build_lowrank(spec, dense, name)
        _check_spec(name, spec, layer, dense)
        with torch.no_grad():
            weight = _take(tensors, pre + "weight", layer.weight, name)
            layer.weight.copy_(_checked_point(name, pre + "weight", weight, layer.manifold, spec["active_rank"]))
            if layer.bias is not None:
                layer.bias.copy_(_take(tensors, pre + "bias", layer.bias, name))
    return layer, writes


def _check_rest(model: nn.Module, rest: Dict[str, Tensor], replaced) -> None:
    """The entries of the file outside the saved layers must be entries of the model of the
    same shape (``load_state_dict`` would raise after copying the earlier ones)."""
    own = model.state_dict(keep_vars=True)
    for key, t in rest.items():
        target = own.get(key)
        if target is None or any(key.startswith(n + ".") for n in replaced):
            raise KeyError(f"the file holds {key!r}, an entry the model does not have")
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{key}: saved with shape {tuple(getattr(t, 'shape', ()))}, the model's is "
                             f"{tuple(target.shape)}")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_lowrank_state_dict(model: nn.Module, tensors: Dict[str, Tensor], metadata: Dict[str, Any],
                            freeze: Optional[bool] = None, check_base: bool = True) -> nn.Module:
    """Rebuild the saved layers in the fresh ``model`` (in place) and copy the saved tensors.

    All or nothing: every layer is rebuilt aside and every saved tensor checked first (its
    presence, shape and dtype; each saved point is a point of its manifold, see
    :func:`point_tolerance`; the metadata's keys and types; every other entry is one of the
    model's, of its shape; the base fingerprints): on any error the model is exactly as before
    (module types, tensors, ``requires_grad``) and the error names the layer or entry. Only then
    are the base weights written and the layers swapped in.

    ``freeze``: with adapters in the file, freeze every other parameter (as
    :func:`~lowrank_manifolds.nn.add_adapters` does); default: when the file holds adapters and no
    other trainable entries. ``check_base``: for adapters whose base weights are not in the file,
    compare the fresh model's base layer with the fingerprint saved with them (a few fixed random
    projections and the norm of the weight, the same of the bias, after the initial correction is
    folded in as at wrapping time) and raise ``ValueError`` if it differs. It detects a different
    checkpoint, a different seed, a changed bias, any change that moves a probe or a norm by more
    than ``32 eps`` of the norm; it cannot detect a change that keeps both norms and is
    orthogonal to the probes (a change that small against rounding, or built for it). Returns
    ``model``."""
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        got = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise ValueError(f"not a low-rank state of this library (format {got!r})")
    layers = metadata.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"the saved metadata 'layers' must be a mapping, got {type(layers).__name__}")
    for name, spec in layers.items():
        if not name:
            raise ValueError("the saved model was itself one layer: load it with load_state_dict")
        _check_spec_types(name, spec)
    rest = dict(tensors)
    with requires_grad_restored_on_error(model):
        planned = [(name, *_plan(model, name, spec, rest, check_base)) for name, spec in layers.items()]
        _check_rest(model, rest, layers)
    for _, _, writes in planned:
        for write in writes:
            write()
    for name, layer, _ in planned:
        _set_child(model, name, layer)
    if rest:
        model.load_state_dict(rest, strict=False)
    has_adapters = any(isinstance(layer, LowRankAdapterLinear) for _, layer, _ in planned)
    if freeze is None:
        freeze = has_adapters and not rest
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
    ``check_base``: as :func:`load_lowrank_state_dict`, which also says what is checked before the
    model is changed (a file that does not pass leaves it unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _file(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no low-rank state at {path} (save_lowrank writes a .safetensors file, or "
                                "lowrank.safetensors in a folder)")
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if _META_KEY not in header:
        raise ValueError(f"{path} holds no low-rank state of this library")
    try:
        metadata = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the low-rank metadata is not valid JSON ({err})") from None
    tensors = load_file(path, device=str(device) if device is not None else "cpu")
    return load_lowrank_state_dict(model, tensors, metadata, freeze=freeze, check_base=check_base)
