r"""A ``peft`` method: rank-adaptive corrections on the fixed-rank manifold, for ``get_peft_model``.

Importing this module (it needs ``peft``: ``pip install "lowrank_manifolds[hf]"``; the package
itself never imports it) registers the method with ``peft``, after which peft's own API works
with it::

    import lowrank_manifolds.peft                      # registers the method
    from lowrank_manifolds.peft import LowRankConfig
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, LowRankConfig(r=4, max_rank=8, tol=0.1,
                                               target_modules=["q_proj", "v_proj"]))
    opt = DLRT([p for p in model.parameters() if p.requires_grad], lr=0.3,
               integrator="augmented-bug", model=model)   # or GeometricAdam, RiemannianAdam
    ...
    model.save_pretrained("adapter")
    again = PeftModel.from_pretrained(fresh_base, "adapter")   # bit-identical logits and ranks
    merged = model.merge_and_unload()                           # plain layers again

Each targeted layer (``nn.Linear``, ``transformers``' ``Conv1D``, ``nn.Conv2d`` with
``groups=1``) becomes a :class:`LowRankLayer` computing

.. math:: y = \mathrm{base}(x) + x\,(\Delta - \Delta_0)^\top, \qquad \Delta = U S V^\top,

with the base layer untouched and, per adapter, a :class:`LowRankCorrection`: ``delta``, a
``geoopt.ManifoldParameter`` on a :class:`~lowrank_manifolds.FixedRankManifold` (packed
``[U; S; V]`` of the static shape ``(m + R + n, R)``, capacity ``R = max_rank``, active rank
``r <= R``, inactive columns exactly zero), and ``delta_init``, the initial point
:math:`\Delta_0 = U_0 (\varepsilon I) V_0^\top` as a buffer (a rank-``r`` point cannot be zero).
Both products are computed in the forward from their factors; at initialisation
``delta == delta_init``, the two products are computed from equal tensors in the same way and
cancel to exactly zero, so the adapted model's logits are bitwise the base model's, and the
base weight is never written except by a merge: ``unload()`` and ``disable_adapter()`` give the
base model exactly. The price: two more thin products per adapted layer in the forward (no
gradient, :math:`O(b (m + n) R)`), and ``(m + n + R) R`` more numbers per layer, saved too.
For a ``Conv2d`` the products are two convolutions, as in
:class:`~lowrank_manifolds.nn.LowRankConv2d`.

**Registration.** ``peft`` 0.21.2's ``register_peft_method`` accepts only the names of its
closed ``PeftType`` enum. This module extends no enum; it writes its entries into the three
tables that function fills, ``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING`` and
``PEFT_TYPE_TO_PREFIX_MAPPING`` of ``peft.mapping``, keyed by :data:`PEFT_TYPE`, a ``str`` (peft's
``PeftType`` members are ``str`` too, and every lookup in peft is by that string, which is also
what ``adapter_config.json`` stores). It raises ``ImportError`` if the tables are gone. Tested with
``peft`` 0.21.2 and ``transformers`` 5.x. What else the method relies on is peft's tuner API that
its own methods use: ``BaseTuner._create_and_replace`` / ``_replace_module``, the
``BaseTunerLayer`` bookkeeping (``merged_adapters``, ``active_adapters``, ``disable_adapters``),
and state dicts that hold every tensor of a tuner layer but its ``base_layer``.

The type string is ``"LOWRANK_MANIFOLDS (import lowrank_manifolds.peft)"``: loading an adapter
in a process that has not imported this module fails in peft with
``KeyError: 'LOWRANK_MANIFOLDS (import lowrank_manifolds.peft)'``, which says what to do.

**What peft does to parameters, and what this module does back.** ``low_cpu_mem_usage=True``
loads with ``load_state_dict(assign=True)``, which puts a plain ``nn.Parameter`` where the
``ManifoldParameter`` was, and the default ``autocast_adapter_dtype=True`` re-assigns half
precision adapter weights as plain float32 ``nn.Parameter`` s: :class:`LowRankCorrection` wraps
any plain parameter assigned to ``delta`` back onto its manifold. The correction is created in
float32 when the base is float16 or bfloat16 (a half precision basis is orthonormal to about
``4e-3`` only), whatever ``autocast_adapter_dtype`` says; the input is cast to it and the
correction back to the base's output dtype.

**Loading checks.** The saved ``delta`` and ``delta_init`` must have the packed shape that the
saved config gives (``r``, ``max_rank`` and the layer's ``m x n``) and be points of the manifold
(finite, orthonormal bases to ``max(1e-5, 100 eps)``, active columns first, inactive block
exactly zero, active ``S`` nonsingular); otherwise ``load_state_dict`` raises, naming the layer.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

import geoopt
import peft
import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ._linalg import mT
from .manifold import FixedRankManifold
from .nn._common import ManifoldModule, haar_stiefel, make_manifold, manifold_repr, split_factors
from .nn.layers import LowRankConv2d

__all__ = [
    "PEFT_TYPE",
    "PREFIX",
    "LowRankConfig",
    "LowRankModel",
    "LowRankLayer",
    "Linear",
    "Conv2d",
    "LowRankCorrection",
    "LowRankConvCorrection",
]

TESTED_PEFT = "0.21.2"


class _PeftTypeName(str):
    """The method's ``peft_type``: a ``str`` like peft's ``PeftType`` members, with their
    ``.value`` and ``.name`` (peft formats some messages with ``peft_type.value``)."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return "LOWRANK_MANIFOLDS"


PEFT_TYPE = _PeftTypeName("LOWRANK_MANIFOLDS (import lowrank_manifolds.peft)")
"""The ``peft_type`` of :class:`LowRankConfig` (also the string in ``adapter_config.json``)."""

PREFIX = "lowrank_"
"""The method's prefix: the adapter attributes of a :class:`LowRankLayer` start with it."""


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) is Conv1D


def _matrix_shape(base: nn.Module):
    """``(m, n, kind)``: the ``m x n`` matrix the layer applies (``m`` outputs)."""
    if type(base) is nn.Linear:
        return base.out_features, base.in_features, "linear"
    if _is_conv1d(base):  # y = x W_c + b, W_c stored in x out
        n, m = base.weight.shape
        return m, n, "conv1d"
    if type(base) is nn.Conv2d:
        if base.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be adapted, got groups={base.groups}")
        out, cin, kh, kw = base.weight.shape
        return out, cin * kh * kw, "conv2d"
    raise ValueError(
        f"{type(base).__module__}.{type(base).__qualname__} is not supported by LowRankConfig: "
        "target nn.Linear, transformers' Conv1D or nn.Conv2d (groups=1) layers"
    )


# --------------------------------------------------------------------------- the config
@dataclass
class LowRankConfig(PeftConfig):
    """Configuration of the low-rank manifold adapters (a ``peft.PeftConfig``).

    Parameters
    ----------
    r : int
        The initial rank of each correction (LoRA's ``r``); clipped to ``min(m, n)`` per layer.
    max_rank : int, optional
        The capacity ``R``: the correction is rank-adaptive, packed ``(m + R + n, R)``, and the
        optimizers truncate each step to a rank ``<= R``. ``None``: fixed rank ``r``. Clipped to
        ``min(m, n)`` per layer.
    tol : float
        The relative truncation tolerance of a rank-adaptive correction (needs ``max_rank``):
        the smallest rank whose discarded singular values have norm ``<= tol * ||s||``.
    init_scale : float
        :math:`\\Delta_0 = U_0 (\\varepsilon I) V_0^\\top` (Haar ``U_0, V_0``), ``eps`` this times the
        RMS singular value of the base weight, ``||W0||_F / sqrt(min(m, n))``.
    dropout : float
        Dropout on the correction's input (LoRA's ``lora_dropout``).
    target_modules, exclude_modules, modules_to_save
        As LoRA's: names (suffixes) or a regex; ``None`` takes peft's LoRA defaults for known
        architectures; ``"all-linear"``.
    retraction, second_moment
        The manifold's retraction (``"metric"``, or ``"orthographic"`` at fixed rank) and what
        stock ``geoopt`` ``RiemannianAdam`` keeps as its second moment (``"rows"``, ``"scalar"``).
    """

    r: int = field(default=8, metadata={"help": "initial rank"})
    max_rank: Optional[int] = field(default=None, metadata={"help": "capacity (rank-adaptive); None: fixed rank"})
    tol: float = field(default=0.0, metadata={"help": "relative truncation tolerance (needs max_rank)"})
    init_scale: float = field(default=1e-3, metadata={"help": "scale of the initial correction"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the correction's input"})
    target_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": "modules not to adapt"})
    modules_to_save: Optional[List[str]] = field(default=None, metadata={"help": "other trainable modules"})
    retraction: str = field(default="metric", metadata={"help": "'metric' or 'orthographic'"})
    second_moment: str = field(default="rows", metadata={"help": "'rows' or 'scalar'"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if self.max_rank is not None:
            if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < self.r:
                raise ValueError(f"max_rank must be an int >= r = {self.r} (or None), got {self.max_rank!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise ValueError(f"tol must be a number in [0, 1), got {self.tol!r}")
        if self.tol and self.max_rank is None:
            raise ValueError("tol is the rank-adaptive truncation tolerance: it needs max_rank")
        if not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {self.init_scale!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.second_moment not in ("rows", "scalar"):
            raise ValueError(f"second_moment must be 'rows' or 'scalar', got {self.second_moment!r}")
        if self.retraction not in ("metric", "orthographic"):
            raise ValueError(f"retraction must be 'metric' or 'orthographic', got {self.retraction!r}")
        if self.retraction == "orthographic" and self.max_rank is not None:
            raise ValueError("the orthographic retraction keeps the rank fixed: it needs max_rank=None")


# --------------------------------------------------------------------------- the corrections
def _point_tolerance(dtype: torch.dtype) -> float:
    from .nn.serialization import point_tolerance

    return point_tolerance(dtype)


class LowRankCorrection(ManifoldModule):
    r"""One adapter's correction of an ``m x n`` linear map: ``x -> x (Delta - Delta0)^T``.

    ``delta`` is the trained point (a ``geoopt.ManifoldParameter``), ``delta_init`` the initial
    point (a buffer, packed alike). A module of its own so that
    :class:`~lowrank_manifolds.optim.GradientRecorder` records its input and output gradient:
    the gradient of ``delta``'s matrix is ``dY^T x`` (after the dropout, which is applied before).
    """

    def __init__(self, manifold: FixedRankManifold, point: Tensor):
        super().__init__()
        self._keep_manifold("delta", manifold)
        self.delta = geoopt.ManifoldParameter(geoopt.ManifoldTensor(point.clone(), manifold=manifold),
                                              manifold=manifold)
        self.register_buffer("delta_init", point.detach().clone())

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        # peft assigns plain nn.Parameters here (load_state_dict(assign=True) of
        # low_cpu_mem_usage, the float32 re-wrap of autocast_adapter_dtype): put them back
        # on the manifold, so that every optimizer keeps stepping on it.
        if name == "delta" and param is not None and not isinstance(param, geoopt.ManifoldParameter):
            mf = self.__dict__["_own_manifold"]
            grad = param.grad
            param = geoopt.ManifoldParameter(geoopt.ManifoldTensor(param.data, manifold=mf), manifold=mf,
                                             requires_grad=param.requires_grad)
            param.grad = grad
        super().register_parameter(name, param)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mf = self.__dict__["_own_manifold"]
        for key in ("delta", "delta_init"):
            t = state_dict.get(prefix + key)
            if t is None or not isinstance(t, Tensor):
                continue
            if tuple(t.shape) != tuple(mf.packed_shape):
                error_msgs.append(
                    f"{prefix}{key}: the saved correction has shape {tuple(t.shape)}, this adapter's is "
                    f"(m + R + n, R) = {tuple(mf.packed_shape)} (m = {mf.m}, n = {mf.n}, capacity R = "
                    f"{mf.capacity} from the config's r and max_rank): the file was saved with another "
                    "capacity or for another layer"
                )
                continue
            if t.device.type == "meta":
                continue
            x = t.detach().to(self.delta.dtype)
            tol = _point_tolerance(x.dtype)
            ok, why = mf.check_point_on_manifold(x, explain=True, atol=tol, rtol=tol)
            if not ok:
                error_msgs.append(f"{prefix}{key}: the saved correction is not a point of its manifold ({mf}): {why}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _pairs(self):
        mf = self.manifold
        return split_factors(*mf.unpack(self.delta)), split_factors(*mf.unpack(self.delta_init))

    def forward(self, x: Tensor) -> Tensor:
        (a, b), (a0, b0) = self._pairs()
        x = x.to(b.dtype)
        return (x @ b) @ mT(a) - (x @ b0) @ mT(a0)

    def dense(self) -> Tensor:
        r"""The ``m x n`` matrix :math:`\Delta - \Delta_0` (cost :math:`O(mnR)`), detached."""
        mf = self.manifold
        with torch.no_grad():
            return mf.to_dense(self.delta.detach()) - mf.to_dense(self.delta_init)

    def extra_repr(self) -> str:
        mf = self.manifold
        return f"m={mf.m}, n={mf.n}, {manifold_repr(mf)}"


class LowRankConvCorrection(LowRankCorrection):
    r"""The correction of a ``Conv2d``: the matricised kernel (``out x in*kh*kw``) is corrected
    by :math:`\Delta - \Delta_0`; each product is two convolutions, as in
    :class:`~lowrank_manifolds.nn.LowRankConv2d` (whose :meth:`input_columns` the recorder uses)."""

    # The padding and unfolding of LowRankConv2d, which read only these attributes.
    input_columns = LowRankConv2d.input_columns
    _explicit_padding = LowRankConv2d._explicit_padding

    def __init__(self, manifold: FixedRankManifold, point: Tensor, conv: nn.Conv2d):
        super().__init__(manifold, point)
        self.in_channels = conv.in_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.padding_mode = conv.padding_mode

    def _conv(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        filters = mT(b).reshape(b.shape[-1], self.in_channels, kh, kw)
        if self.padding_mode != "zeros":
            z = F.conv2d(F.pad(x, self._explicit_padding(), mode=self.padding_mode), filters, None, self.stride, 0,
                         self.dilation)
        else:
            z = F.conv2d(x, filters, None, self.stride, self.padding, self.dilation)
        return F.conv2d(z, a[..., None, None])

    def forward(self, x: Tensor) -> Tensor:
        (a, b), (a0, b0) = self._pairs()
        x = x.to(b.dtype)
        return self._conv(x, a, b) - self._conv(x, a0, b0)


# --------------------------------------------------------------------------- the tuner layers
class LowRankLayer(nn.Module, BaseTunerLayer):
    """A targeted layer (``base_layer``, untouched) plus one :class:`LowRankCorrection` per
    adapter in ``lowrank_delta`` and its dropout in ``lowrank_dropout``.

    Forward: ``base_layer(x) + sum over the active adapters of lowrank_delta[a](dropout(x))``,
    in the correction's dtype and cast to the output's. :meth:`merge` adds
    :math:`\\Delta - \\Delta_0` to the base weight, :meth:`unmerge` subtracts it again (so the
    base comes back to rounding, as with LoRA; ``unload()`` without a merge gives it exactly).
    """

    adapter_layer_names = ("lowrank_delta",)
    other_param_names = ("lowrank_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LowRankConfig):
        super().__init__()
        self.base_layer = base_layer
        self.m, self.n, self.kind = _matrix_shape(base_layer)
        self.lowrank_delta = nn.ModuleDict({})
        self.lowrank_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: LowRankConfig) -> None:
        """Add the adapter ``adapter_name``: a correction drawn as in the config."""
        m, n = self.m, self.n
        cap = None if config.max_rank is None else min(config.max_rank, m, n)
        r = min(config.r, m, n)
        mf = make_manifold(m, n, r, cap, config.tol if cap is not None else 0.0, config.retraction,
                           config.second_moment)
        w0 = self.get_base_layer().weight
        dtype = w0.dtype if w0.dtype in (torch.float32, torch.float64) else torch.float32
        factory = dict(dtype=dtype, device=w0.device)
        with torch.no_grad():
            ref = torch.linalg.vector_norm(w0.detach().to(dtype)) / math.sqrt(min(m, n))
            ref = torch.where(ref > 0, ref, torch.ones_like(ref))
            u = haar_stiefel(m, r, **factory)
            v = haar_stiefel(n, r, **factory)
            s = (float(config.init_scale) * ref) * torch.eye(r, **factory)
            point = mf.pad(u, s, v)
        if self.kind == "conv2d":
            corr = LowRankConvCorrection(mf, point, self.get_base_layer())
        else:
            corr = LowRankCorrection(mf, point)
        corr.train(self.training)
        self.lowrank_delta[adapter_name] = corr
        self.lowrank_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # peft's version also casts to the base's dtype, which for a half precision base would
        # round the bases of the point; only the device follows the base here.
        target = device if device is not None else self.get_base_layer().weight.device
        corr = self.lowrank_delta[adapter_name] if adapter_name in self.lowrank_delta else None
        if corr is None or any(t.device.type == "meta" for t in corr.parameters()):
            return
        corr.to(target)

    # ---------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> Tensor:
        r"""The adapter's :math:`\Delta - \Delta_0` in the layout of the base weight (``out x in``
        for ``nn.Linear``, ``in x out`` for ``Conv1D``, the kernel's shape for ``Conv2d``)."""
        d = self.lowrank_delta[adapter_name].dense()
        w = self.get_base_layer().weight
        if self.kind == "conv1d":
            d = d.T
        return d.reshape(w.shape)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Add the active (or the named) adapters' corrections to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        w = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.lowrank_delta:
                continue
            d = self.get_delta_weight(name)
            if safe_merge:
                new = w.data + d.to(w.dtype)
                if not bool(torch.isfinite(new).all()):
                    raise ValueError(f"NaNs detected in the merged weights: the adapter {name} seems to be broken")
                w.data = new
            else:
                w.data += d.to(w.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged corrections again (the base weight comes back to rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        w = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lowrank_delta:
                w.data -= self.get_delta_weight(name).to(w.dtype)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lowrank_delta:
                continue
            corr = self.lowrank_delta[name](self.lowrank_dropout[name](x))
            result = result + corr.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lowrank." + super().__repr__()


class Linear(LowRankLayer):
    """A :class:`LowRankLayer` on an ``nn.Linear`` or ``transformers``' ``Conv1D``."""


class Conv2d(LowRankLayer):
    """A :class:`LowRankLayer` on an ``nn.Conv2d`` (``groups=1``)."""


# --------------------------------------------------------------------------- the tuner
def _lora_default_targets() -> dict:
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # only the defaults for target_modules=None are lost
        return {}
    return dict(mapping)


class LowRankModel(BaseTuner):
    """The ``peft`` tuner of :class:`LowRankConfig` (``PeftModel.base_model``): replaces the
    targeted layers by :class:`Linear` / :class:`Conv2d`. Everything else is peft's
    ``BaseTuner``: ``merge_and_unload``, ``unload``, ``merge_adapter`` / ``unmerge_adapter``,
    ``disable_adapter_layers``, ``set_adapter``, ``delete_adapter``."""

    prefix: str = PREFIX
    tuner_layer_cls = LowRankLayer
    target_module_mapping = _lora_default_targets()

    def _create_and_replace(self, peft_config: LowRankConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, parameter_name=None) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if parameter_name is not None:
            raise ValueError("LowRankConfig adapts modules, not parameters (target_parameters)")
        if isinstance(target, LowRankLayer):
            target.update_layer(adapter_name, peft_config)
            return
        try:
            m, n, kind = _matrix_shape(target)
        except ValueError as exc:
            raise ValueError(f"target module {current_key}: {exc}") from None
        cls = Conv2d if kind == "conv2d" else Linear
        new = cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:  # an added adapter is not trainable until set
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("LowRankConfig adapters do not support adapter_names= (mixed adapter batches)")
        yield


# --------------------------------------------------------------------------- registration
def _register() -> None:
    """Write the method into peft's tables (the ones ``peft.utils.register_peft_method`` fills,
    which only accepts the names of its closed ``PeftType`` enum). Idempotent."""
    from peft import mapping

    names = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
    tables = [getattr(mapping, name, None) for name in names]
    missing = [name for name, table in zip(names, tables) if not isinstance(table, dict)]
    if missing:
        raise ImportError(
            f"lowrank_manifolds.peft registers its method in peft.mapping's {', '.join(names)}; peft "
            f"{peft.__version__} has no {', '.join(missing)} (tested with peft {TESTED_PEFT})"
        )
    configs, tuners, prefixes = tables
    clash = [k for k, v in prefixes.items() if v == PREFIX and k != PEFT_TYPE]
    if clash:
        raise ImportError(f"peft already has a method with the prefix {PREFIX!r}: {clash[0]}")
    configs[PEFT_TYPE] = LowRankConfig
    tuners[PEFT_TYPE] = LowRankModel
    prefixes[PEFT_TYPE] = PREFIX


_register()
