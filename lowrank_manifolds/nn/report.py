r"""What a model surgery did: :class:`SurgeryReport` (returned by ``convert_to_low_rank`` and
``add_adapters`` with ``report=True``).

Parameter counts are of the tensors as stored: a low-rank layer of capacity ``R`` stores the
packed ``[U; S; V]``, :math:`(m + R + n) R` numbers (plus its bias), a dense ``m x n`` layer
:math:`mn`; tied parameters are counted once (``module.parameters()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

__all__ = ["LayerChange", "LayerSkip", "SurgeryReport", "count_parameters"]


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """``(all, trainable)`` numbers of parameter entries, each tensor once."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


@dataclass(frozen=True)
class LayerChange:
    """One converted or wrapped layer.

    ``action`` is ``"low-rank"`` (replaced by a low-rank layer) or ``"adapter"`` (wrapped);
    ``shape`` the matrix ``(m, n)``; ``rank`` the initial active rank; ``capacity`` the packed
    width ``R`` (``rank`` for a fixed-rank layer); ``params_before``/``params_after`` the
    numbers stored by the layer before and after (for an adapter, after = base + correction)."""

    name: str
    layer_type: str
    action: str
    shape: Tuple[int, int]
    rank: int
    capacity: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class LayerSkip:
    """A layer of a known type that was left as it was, and why."""

    name: str
    layer_type: str
    reason: str


@dataclass
class SurgeryReport:
    r"""The outcome of :func:`~lowrank_manifolds.nn.convert_to_low_rank` or
    :func:`~lowrank_manifolds.nn.add_adapters` (with ``report=True``).

    Attributes
    ----------
    module : nn.Module
        The result (the argument modified in place, or the replacement when the argument was
        itself a convertible layer).
    changed : list of LayerChange
    skipped : list of LayerSkip
        Every layer of a registered type (or a subclass of one, or an ``nn.Conv2d``) that was
        not changed, with the reason (not selected by ``include``/``exclude``, tied weight,
        no saving, rank above ``min(m, n)``, unregistered subclass, grouped convolution).
    params_before, params_after, trainable_before, trainable_after : int
        Whole-model counts (:func:`count_parameters`).
    """

    module: nn.Module
    changed: List[LayerChange] = field(default_factory=list)
    skipped: List[LayerSkip] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    trainable_before: int = 0
    trainable_after: int = 0

    @property
    def names(self) -> List[str]:
        """Qualified names of the changed layers."""
        return [c.name for c in self.changed]

    def skip_reasons(self) -> Dict[str, str]:
        """``{name: reason}`` of the skipped layers."""
        return {s.name: s.reason for s in self.skipped}

    def summary(self) -> str:
        """One line: how many layers changed, parameters before and after."""
        ratio = self.params_after / self.params_before if self.params_before else float("nan")
        return (f"{len(self.changed)} layers changed, {len(self.skipped)} skipped; parameters "
                f"{self.params_before} -> {self.params_after} ({100 * ratio:.1f} %), trainable "
                f"{self.trainable_before} -> {self.trainable_after}")

    def to_markdown(self, max_rows: Optional[int] = None) -> str:
        """The report as markdown tables (changed layers, then skipped ones)."""
        lines = [self.summary(), "", "| layer | type | action | m x n | rank | capacity | params before | after |",
                 "|---|---|---|---|---|---|---|---|"]
        rows = self.changed if max_rows is None else self.changed[:max_rows]
        for c in rows:
            lines.append(f"| {c.name} | {c.layer_type.rsplit('.', 1)[-1]} | {c.action} | {c.shape[0]} x "
                         f"{c.shape[1]} | {c.rank} | {c.capacity} | {c.params_before} | {c.params_after} |")
        if self.skipped:
            lines += ["", "| skipped layer | type | reason |", "|---|---|---|"]
            rows = self.skipped if max_rows is None else self.skipped[:max_rows]
            for s in rows:
                lines.append(f"| {s.name} | {s.layer_type.rsplit('.', 1)[-1]} | {s.reason} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()
