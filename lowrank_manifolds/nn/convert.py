r"""Model surgery: convert ``nn.Linear`` / ``nn.Conv2d`` layers to low-rank ones, wrap them in adapters,
export back to plain PyTorch layers."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from .._args import deprecated, nonneg, positive_int
from ._common import select_rank
from .adapter import LowRankAdapterLinear
from .layers import LowRankConv2d, LowRankLinear

__all__ = ["convert_to_low_rank", "add_adapters", "export_dense"]

Patterns = Union[None, str, Iterable[str]]


_OURS = (LowRankLinear, LowRankConv2d, LowRankAdapterLinear)


def _as_patterns(patterns: Patterns, name: str) -> Optional[Tuple[str, ...]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    patterns = tuple(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a string or an iterable of strings")
    return patterns


def _selected(qualname: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(qualname, p) for p in include):
        return False
    if exclude is not None and any(fnmatch.fnmatchcase(qualname, p) for p in exclude):
        return False
    return True


def _shared_param_ids(module: nn.Module) -> set:
    counts: dict = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {k for k, c in counts.items() if c > 1}


def _replace(module: nn.Module, fn, descend_into_ours: bool = False) -> nn.Module:
    """Apply ``fn(qualname, child) -> new or None`` to every submodule (pre-order),
    replacing a child when ``fn`` returns a module; replaced subtrees and (unless
    ``descend_into_ours``) this module's own layers are not descended into."""

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            new = fn(qual, child)
            if new is not None:
                setattr(parent, name, new)
            elif descend_into_ours or not isinstance(child, _OURS):
                visit(child, qual)

    root = fn("", module)
    if root is not None:
        return root
    if not isinstance(module, _OURS):
        visit(module, "")
    return module


def _matrix_shape(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels * kh * kw
    return layer.out_features, layer.in_features


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
) -> nn.Module:
    r"""Replace ``nn.Linear`` and ``nn.Conv2d`` layers by low-rank layers, in place.

    Every submodule whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` (with
    ``groups=1``) and whose qualified name (as in ``module.named_modules()``; ``""``
    for ``module`` itself) is selected by ``include``/``exclude`` is replaced by
    :meth:`LowRankLinear.from_dense` / :meth:`LowRankConv2d.from_dense`.

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

    Returns
    -------
    nn.Module
        ``module`` itself, or the new layer if ``module`` is itself a convertible
        layer (a module cannot replace itself in place).

    Notes
    -----
    Skipping rule: for an ``m x n`` weight (``n = in*kh*kw`` for a convolution) and
    the rank ``r`` chosen (``rank``, or from the cut), the layer is converted only if
    the low-rank layer stores fewer weight numbers,
    :math:`R (m + n + R) < m n` (the packed ``[U; S; V]``; ``R = r``, or the
    capacity with ``max_rank``); this also skips ``rank > min(m, n)``. Also skipped: subclasses of ``nn.Linear``/``nn.Conv2d``
    (their forward may differ, e.g. ``nn.MultiheadAttention.out_proj``, whose weight
    its parent reads directly), grouped convolutions, layers whose weight is shared
    with another module (tied weights), and the inside of this module's own layers.
    Cost: one SVD per converted layer.
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
    shared = _shared_param_ids(module)

    def convert(qual: str, child: nn.Module):
        if type(child) not in (nn.Linear, nn.Conv2d) or not _selected(qual, include, exclude):
            return None
        if id(child.weight) in shared or (type(child) is nn.Conv2d and child.groups != 1):
            return None
        m, n = _matrix_shape(child)
        w = child.weight.detach()
        cap_r = None if max_rank is None else min(max_rank, m, n)
        if cut is None:
            r = rank if rank is not None else cap_r
        else:
            r = select_rank(torch.linalg.svdvals(w.reshape(m, n)), cut)
            if rank is not None:
                r = min(r, rank)
        if cap_r is not None:
            r = min(r, cap_r)
        stored = r if cap_r is None else cap_r
        if stored * (m + n + stored) >= m * n:
            return None
        cls = LowRankLinear if type(child) is nn.Linear else LowRankConv2d
        if cap_r is None:
            return cls.from_dense(child, rank=r)
        return cls.from_dense(child, rank=r, max_rank=cap_r, tol=tol)

    return _replace(module, convert)


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
) -> nn.Module:
    r"""Wrap ``nn.Linear`` layers in :class:`LowRankAdapterLinear`, in place.

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

    Notes
    -----
    Only layers whose type is exactly ``nn.Linear`` and whose weight is not shared
    are wrapped (see :func:`convert_to_low_rank`). Pass only trainable parameters
    to the optimizer: ``RiemannianAdam(p for p in model.parameters() if p.requires_grad)``.
    """
    positive_int(rank, "rank")
    if max_rank is not None:
        positive_int(max_rank, "max_rank")
        if rank > max_rank:
            raise ValueError(f"rank = {rank} exceeds max_rank = {max_rank}")
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    shared = _shared_param_ids(module)

    def wrap(qual: str, child: nn.Module):
        if type(child) is not nn.Linear or not _selected(qual, include, exclude):
            return None
        small = min(child.in_features, child.out_features)
        if id(child.weight) in shared or rank > small:
            return None
        cap = None if max_rank is None else min(max_rank, small)
        return LowRankAdapterLinear(
            child, rank, max_rank=cap, tol=tol, init_scale=init_scale, exact_init=exact_init
        )

    module = _replace(module, wrap)
    if freeze:
        deltas = {id(m.delta) for m in module.modules() if isinstance(m, LowRankAdapterLinear)}
        for p in module.parameters():
            if id(p) not in deltas:
                p.requires_grad_(False)
    return module


def export_dense(module: nn.Module, factored: bool = False) -> nn.Module:
    r"""Replace every layer of this module by plain PyTorch layers, in place.

    :class:`LowRankLinear` becomes ``nn.Linear`` (:meth:`LowRankLinear.to_dense_linear`)
    or, with ``factored=True``, two thin layers (:meth:`LowRankLinear.to_factored`);
    :class:`LowRankConv2d` likewise (``to_dense_conv`` / ``to_factored``);
    :class:`LowRankAdapterLinear` is always merged into one ``nn.Linear``
    (:meth:`LowRankAdapterLinear.merge`: its base is dense anyway).

    The result loads and runs without this library (no ``ManifoldParameter`` left
    from these layers). Returns ``module`` (or the replacement if ``module`` is
    itself such a layer).
    """

    def export(qual: str, child: nn.Module):
        if isinstance(child, LowRankLinear):
            return child.to_factored() if factored else child.to_dense_linear()
        if isinstance(child, LowRankConv2d):
            return child.to_factored() if factored else child.to_dense_conv()
        if isinstance(child, LowRankAdapterLinear):
            return child.merge()
        return None

    return _replace(module, export)
