r"""Model surgery: convert linear layers (``nn.Linear``, ``transformers``' ``Conv1D``, any type
registered in :mod:`~lowrank_manifolds.nn.registry`) and ``nn.Conv2d`` layers to low-rank ones, wrap
linear layers in adapters, export back to plain PyTorch layers of the original types."""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .._args import deprecated, nonneg, positive_int
from .._linalg import factor_dtype
from ._common import is_lowrank_layer, requires_grad_restored_on_error, select_rank
from .adapter import LowRankAdapterLinear
from .layers import LowRankConv2d, LowRankLinear
from .registry import linear_kind, origin_type, registered_linear_types, restore_layer, set_origin_type, type_name
from .report import LayerChange, LayerSkip, SurgeryReport, count_parameters
from .serialization import fold_initial_correction, record_initial_correction

__all__ = ["convert_to_low_rank", "add_adapters", "export_dense"]

Patterns = Union[None, str, Iterable[str]]




def _as_patterns(patterns: Patterns, name: str) -> Optional[Tuple[str, ...]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    patterns = tuple(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a string or an iterable of strings")
    return patterns


def _owners(module: nn.Module) -> Dict[int, List[str]]:
    """``id(parameter) -> the qualified names under which it is registered`` (tied weights: several)."""
    owners: Dict[int, List[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _tied(qual: str, child: nn.Module, owners) -> Optional[str]:
    """The skip reason of a layer whose own parameters are shared with another module, or None."""
    prefix = f"{qual}." if qual else ""
    for pname, p in child.named_parameters(recurse=False):
        others = [o for o in owners.get(id(p), []) if o != prefix + pname]
        if others:
            return f"tied weight: {prefix + pname} is shared with {', '.join(others)} (tied weights are left alone)"
    return None


def _pattern_reason(qual: str, include, exclude) -> Optional[str]:
    if include is not None and not any(fnmatch.fnmatchcase(qual, p) for p in include):
        return "not matched by include"
    if exclude is not None:
        hit = [p for p in exclude if fnmatch.fnmatchcase(qual, p)]
        if hit:
            return f"matched exclude pattern {hit[0]!r}"
    return None


def _unregistered_subclass(child: nn.Module) -> Optional[str]:
    for base in registered_linear_types() + (nn.Conv2d,):
        if isinstance(child, base) and type(child) is not base:
            return (f"subclass of {base.__name__} (its forward may differ); register its type with "
                    "lowrank_manifolds.nn.registry.register_linear to convert it")
    return None


def _stored(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Recorder:
    """Collects the report of one surgery."""

    def __init__(self, module: nn.Module):
        self.before = count_parameters(module)
        self.changed: List[LayerChange] = []
        self.skipped: List[LayerSkip] = []

    def skip(self, qual: str, child: nn.Module, reason: str) -> None:
        self.skipped.append(LayerSkip(qual, type_name(type(child)), reason))

    def change(self, qual: str, child: nn.Module, new: nn.Module, action: str) -> None:
        mf = new.manifold  # a new layer's point has rank mf.rank (no read: meta tensors have no values)
        self.changed.append(LayerChange(qual, type_name(type(child)), action, (mf.m, mf.n), mf.rank, mf.capacity,
                                        _stored(child), _stored(new)))

    def result(self, module: nn.Module) -> SurgeryReport:
        after = count_parameters(module)
        return SurgeryReport(module, self.changed, self.skipped, self.before[0], after[0], self.before[1], after[1])


def _check_second_moment(second_moment) -> None:
    """Checked before any layer is touched (FixedRankManifold would raise at the first one)."""
    if second_moment not in ("scalar", "rows"):
        raise ValueError(f"second_moment must be 'scalar' or 'rows', got {second_moment!r}")


def _replace(module: nn.Module, fn) -> nn.Module:
    """Apply ``fn(qualname, child, pending) -> new or None`` to every submodule (pre-order),
    replacing a child when ``fn`` returns a module; replaced subtrees and this library's own
    layers are not descended into.

    All or nothing: every ``fn`` runs (and may raise) before the model is changed; ``fn``
    leaves the user's tensors alone and appends to ``pending`` the writes to them that it
    needs (thunks run after the walk, before the swap: they do not fail on valid input). If
    anything raises, the model is as it was, ``requires_grad`` flags included (the adapters'
    constructor freezes its base)."""
    swaps: List[Tuple[nn.Module, str, nn.Module]] = []
    pending: List = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            new = fn(qual, child, pending)
            if new is not None:
                swaps.append((parent, name, new))
            elif not is_lowrank_layer(child):
                visit(child, qual)

    with requires_grad_restored_on_error(module):
        root = fn("", module, pending)
        if root is None and not is_lowrank_layer(module):
            visit(module, "")
    for write in pending:
        write()
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return module if root is None else root


def _matrix_shape(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels * kh * kw
    return layer.out_features, layer.in_features


def _candidate(qual: str, child: nn.Module, include, exclude, owners, rec: _Recorder):
    """``(kind, dense view)`` of a layer to change (``kind`` None for an ``nn.Conv2d``), or None
    after recording why it is left alone (nothing is recorded for modules of other types)."""
    kind = linear_kind(child)
    if kind is None and type(child) is not nn.Conv2d:
        reason = _unregistered_subclass(child)
        if reason is not None:
            rec.skip(qual, child, reason)
        return None
    reason = _pattern_reason(qual, include, exclude) or _tied(qual, child, owners)
    if reason is None and kind is None and child.groups != 1:
        reason = f"grouped convolution (groups={child.groups}): its kernel is block diagonal"
    if reason is not None:
        rec.skip(qual, child, reason)
        return None
    return kind, (child if kind is None else kind.to_linear(child))


def convert_to_low_rank(
    module: nn.Module,
    rank: Optional[int] = None,
    *,
    svd_tol: Optional[float] = None,
    max_rank: Optional[int] = None,
    tol: Optional[float] = None,
    rank_tol: Optional[float] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    require_saving: bool = True,
    report: bool = False,
    second_moment: str = "rows",
) -> Union[nn.Module, SurgeryReport]:
    r"""Replace linear layers and ``nn.Conv2d`` layers by low-rank layers, in place.

    Every submodule whose type is exactly a registered linear type (``nn.Linear``,
    ``transformers.pytorch_utils.Conv1D``, or one added with
    :func:`~lowrank_manifolds.nn.registry.register_linear`) or ``nn.Conv2d`` (with
    ``groups=1``), whose qualified name (as in ``module.named_modules()``; ``""``
    for ``module`` itself) is selected by ``include``/``exclude`` and whose parameters are
    not tied to another module's is replaced by :meth:`LowRankLinear.from_dense` (of the
    layer read as an ``nn.Linear``, :math:`y = x W^\top + b`) / :meth:`LowRankConv2d.from_dense`.
    The new layer remembers the type it replaced, so :func:`export_dense` gives it back.

    Parameters
    ----------
    module : nn.Module
        Modified **in place** (deep-copy it first to keep the original).
    rank : int, optional
        Fixed rank for every layer; with ``svd_tol``, a cap on the chosen ranks.
    svd_tol : float, optional
        Per-layer initial SVD cut: relative Frobenius tolerance, ``0 <= svd_tol < 1``
        (see :func:`~lowrank_manifolds.integrators.truncation_rank`).
    max_rank : int, optional
        Make every converted layer rank-adaptive with capacity ``min(max_rank, m, n)``
        (a model-wide setting, hence clipped to each layer); the initial rank is capped at it.
    tol : float, optional
        Truncation tolerance of the rank-adaptive layers (only with ``max_rank``; default 0),
        the ``tol`` of :class:`LowRankLinear`; without ``svd_tol`` it also cuts the initial SVDs.
    rank_tol : float, optional
        Deprecated name of ``tol`` (the old ``tol`` is then ``svd_tol``).
    include, exclude : str or iterable of str, optional
        ``fnmatch`` patterns on qualified names (e.g. ``"encoder.*"``,
        ``"*.fc2"``). A layer is converted if it matches some ``include`` pattern
        (or ``include`` is ``None``) and no ``exclude`` pattern.
    require_saving : bool
        ``True`` (default): convert a layer only if it then stores fewer numbers (see
        Notes). ``False``: convert every selected layer with ``rank <= min(m, n)`` (for
        example at full rank, to train the factors of the whole weight).
    report : bool
        ``False`` (default): return the module, as before. ``True``: return a
        :class:`~lowrank_manifolds.nn.report.SurgeryReport` (the module is its ``module``)
        listing each converted layer (rank, capacity, parameters before and after) and each
        skipped one with its reason. A flag rather than a second function keeps one set of
        arguments and one code path, and existing callers unchanged; the report carries the
        module because the result is a new object when ``module`` is itself a layer.
    second_moment : {"rows", "scalar"}
        What stock ``geoopt.optim.RiemannianAdam`` keeps on the point (the manifold's
        :attr:`~lowrank_manifolds.FixedRankManifold.second_moment`; ``"rows"``, the default,
        takes Adam-like learning rates, ``docs/training.md``).

    Returns
    -------
    nn.Module or SurgeryReport
        ``module`` itself, or the new layer if ``module`` is itself a convertible
        layer (a module cannot replace itself in place); the report with ``report=True``.

    Notes
    -----
    Skipping rule: for an ``m x n`` weight (``n = in*kh*kw`` for a convolution) and
    the rank ``r`` chosen (``rank``, or from the cut), the layer is converted only if
    the low-rank layer stores fewer weight numbers,
    :math:`R (m + n + R) < m n` (the packed ``[U; S; V]``; ``R = r``, or the
    capacity with ``max_rank``; not checked with ``require_saving=False``), and
    ``rank <= min(m, n)``. Also skipped: subclasses of registered types and of ``nn.Conv2d``
    (their forward may differ, e.g. ``nn.MultiheadAttention.out_proj``, whose weight
    its parent reads directly), grouped convolutions, layers whose weight is shared
    with another module (tied weights, such as GPT-2's ``lm_head`` and token embedding), and the
    inside of this module's own layers. Cost: one SVD per converted layer.
    """
    if rank_tol is not None:  # the old spelling: tol was the cut, rank_tol the truncation tolerance
        deprecated("convert_to_low_rank: rank_tol= is deprecated: the truncation tolerance is tol= and the "
                   "initial SVD cut svd_tol=")
        if svd_tol is not None:
            raise TypeError("convert_to_low_rank: give svd_tol= and tol=, not the deprecated rank_tol=")
        svd_tol, tol = tol, rank_tol
    elif max_rank is None and tol is not None and svd_tol is None:
        deprecated("convert_to_low_rank: tol= without max_rank as the initial SVD cut is deprecated: use svd_tol=")
        svd_tol, tol = tol, None
    _check_second_moment(second_moment)
    if rank is None and svd_tol is None and max_rank is None:
        raise ValueError("give a rank, an initial SVD cut svd_tol, or both (or a capacity max_rank)")
    if rank is not None:
        positive_int(rank, "rank")
    if max_rank is not None:
        positive_int(max_rank, "max_rank")
        if rank is not None and rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
        tol = 0.0 if tol is None else nonneg(tol, "tol")
        cut = svd_tol if svd_tol is not None else (tol or None)  # the layers' own policy cuts the SVD
    elif tol is not None:
        raise ValueError("tol is the rank-adaptive truncation tolerance: it needs max_rank")
    else:
        cut = svd_tol
    if cut is not None:
        select_rank(torch.ones(1), cut)  # validates the cut
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    owners = _owners(module)
    rec = _Recorder(module)

    def convert(qual: str, child: nn.Module, pending: list):
        found = _candidate(qual, child, include, exclude, owners, rec)
        if found is None:
            return None
        kind, dense = found
        m, n = _matrix_shape(dense)
        cap_r = None if max_rank is None else min(max_rank, m, n)
        if cut is None:
            r = rank if rank is not None else cap_r
        else:
            w = dense.weight.detach().reshape(m, n)
            r = select_rank(torch.linalg.svdvals(w.to(factor_dtype(w))), cut)
            if rank is not None:
                r = min(r, rank)
        if cap_r is not None:
            r = min(r, cap_r)
        if r > min(m, n):
            rec.skip(qual, child, f"rank {r} > min(m, n) = {min(m, n)}")
            return None
        stored = r if cap_r is None else cap_r
        if require_saving and stored * (m + n + stored) >= m * n:
            rec.skip(qual, child, f"no saving: R (m + n + R) = {stored * (m + n + stored)} >= m n = {m * n} "
                                  "(require_saving=False converts it anyway)")
            return None
        cls = LowRankConv2d if kind is None else LowRankLinear
        if cap_r is None:
            new = cls.from_dense(dense, rank=r, second_moment=second_moment)
        else:
            new = cls.from_dense(dense, rank=r, max_rank=cap_r, tol=tol, second_moment=second_moment)
        if kind is not None:
            set_origin_type(new, type(child))
            new.train(child.training)
        rec.change(qual, child, new, "low-rank")
        return new

    out = _replace(module, convert)
    return rec.result(out) if report else out


def add_adapters(
    module: nn.Module,
    rank: int,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    init_scale: float = 1e-3,
    exact_init: bool = True,
    freeze: bool = True,
    max_rank: Optional[int] = None,
    tol: float = 0.0,
    report: bool = False,
    second_moment: str = "rows",
) -> Union[nn.Module, SurgeryReport]:
    r"""Wrap linear layers (``nn.Linear``, ``transformers``' ``Conv1D``, any registered type) in
    :class:`LowRankAdapterLinear`, in place.

    A layer of another registered type than ``nn.Linear`` is read as an ``nn.Linear`` (for
    ``Conv1D`` a transposed copy of its ``in x out`` weight) which becomes the adapter's base;
    :func:`export_dense` merges it back into the original type.

    Parameters
    ----------
    module : nn.Module
        Modified **in place**; returned (or the adapter if ``module`` is itself an
        ``nn.Linear``).
    rank : int
        Rank of every correction; layers with ``rank > min(m, n)`` are skipped.
    include, exclude
        ``fnmatch`` patterns on qualified names, as in :func:`convert_to_low_rank`.
    init_scale, exact_init
        See :class:`LowRankAdapterLinear`. With ``exact_init=True`` (default) the
        adapted model computes the same function as before, to rounding.
    freeze : bool
        If ``True`` (default, LoRA practice), every parameter of the model other than
        the adapters' ``delta`` gets ``requires_grad=False``.
    max_rank, tol
        Rank-adaptive corrections of capacity ``max_rank`` (clipped to each layer's
        ``min(m, n)``) and truncation tolerance ``tol`` (see :class:`LowRankAdapterLinear`).
    report : bool
        Return a :class:`~lowrank_manifolds.nn.report.SurgeryReport` instead of the module
        (see :func:`convert_to_low_rank`).
    second_moment : {"rows", "scalar"}
        What stock ``geoopt.optim.RiemannianAdam`` keeps on the point (the manifold's
        :attr:`~lowrank_manifolds.FixedRankManifold.second_moment`; ``"rows"``, the default,
        takes Adam-like learning rates, ``docs/training.md``).

    Notes
    -----
    Only layers whose type is exactly a registered one and whose parameters are not shared
    are wrapped (see :func:`convert_to_low_rank`). Pass only trainable parameters
    to the optimizer: ``RiemannianAdam(p for p in model.parameters() if p.requires_grad)``.
    With ``exact_init=True`` the initial correction :math:`\Delta_0` is kept (buffer
    ``delta_init``, not in the ``state_dict``) and folded into the base,
    :math:`W_0 \leftarrow W_0 - \Delta_0`, so that
    :func:`~lowrank_manifolds.nn.serialization.save_lowrank` can save the adapters alone.
    """
    positive_int(rank, "rank")
    _check_second_moment(second_moment)
    if max_rank is not None:
        positive_int(max_rank, "max_rank")
        if rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    owners = _owners(module)
    rec = _Recorder(module)

    def wrap(qual: str, child: nn.Module, pending: list):
        found = _candidate(qual, child, include, exclude, owners, rec) if type(child) is not nn.Conv2d else None
        if found is None:
            if type(child) is nn.Conv2d:
                rec.skip(qual, child, "adapters wrap linear layers only")
            return None
        kind, base = found
        small = min(base.in_features, base.out_features)
        if rank > small:
            rec.skip(qual, child, f"rank {rank} > min(m, n) = {small}")
            return None
        cap = None if max_rank is None else min(max_rank, small)
        new = LowRankAdapterLinear(base, rank, max_rank=cap, tol=tol, init_scale=init_scale, exact_init=False,
                                   second_moment=second_moment)
        record_initial_correction(new, folded=exact_init)
        if exact_init:  # writes the user's weight: after every layer is built
            pending.append(lambda: fold_initial_correction(new))
        set_origin_type(new, type(child))
        new.train(child.training)
        rec.change(qual, child, new, "adapter")
        return new

    module = _replace(module, wrap)
    if freeze:
        deltas = {id(m.delta) for m in module.modules() if isinstance(m, LowRankAdapterLinear)}
        for p in module.parameters():
            if id(p) not in deltas:
                p.requires_grad_(False)
    return rec.result(module) if report else module


def export_dense(module: nn.Module, factored: bool = False) -> nn.Module:
    r"""Replace every layer of this module by plain PyTorch layers, in place.

    :class:`LowRankLinear` becomes ``nn.Linear`` (:meth:`LowRankLinear.to_dense_linear`)
    or, with ``factored=True``, two thin layers (:meth:`LowRankLinear.to_factored`);
    :class:`LowRankConv2d` likewise (``to_dense_conv`` / ``to_factored``);
    :class:`LowRankAdapterLinear` is always merged into one ``nn.Linear``
    (:meth:`LowRankAdapterLinear.merge`: its base is dense anyway).

    A layer that replaced another registered type (``transformers``' ``Conv1D``) is given
    back as that type (:func:`~lowrank_manifolds.nn.registry.restore_layer`; not with
    ``factored=True``), so the exported model has the ``state_dict`` layout of the original and
    ``transformers``' ``save_pretrained`` / ``from_pretrained`` accept it (peft's
    ``merge_and_unload``). The result loads and runs without this library (no
    ``ManifoldParameter`` left from these layers). Returns ``module`` (or the replacement if
    ``module`` is itself such a layer).
    """

    def export(qual: str, child: nn.Module, pending: list):
        if isinstance(child, LowRankLinear):
            if factored:
                return child.to_factored()
            return restore_layer(child.to_dense_linear(), origin_type(child))
        if isinstance(child, LowRankConv2d):
            return child.to_factored() if factored else child.to_dense_conv()
        if isinstance(child, LowRankAdapterLinear):
            return restore_layer(child.merge(), origin_type(child))
        return None

    return _replace(module, export)
