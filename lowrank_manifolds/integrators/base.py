r"""The integrator protocol: :class:`Integrator` and :class:`RankAdaptiveIntegrator`.

Protocol
--------
An :class:`Integrator` has one method::

    U1, S1, V1 = integrator.step(U0, S0, V0, field, h, t=0.0)

- ``U0 (..., m, r)`` and ``V0 (..., n, r)`` have orthonormal columns, ``S0 (..., r, r)``;
  leading batch axes broadcast. The integrators work on the factors, not on packed
  points, so they know nothing of capacities or padding.
- ``field`` is a :class:`Field` (or a dense tensor, an ``(A, B)`` pair or a callable,
  converted by :func:`as_field`).
- ``h`` (a finite Python number) is the step size, ``t`` the time at the start.
- The result ``(U1, S1, V1)``: ``U1``, ``V1`` with orthonormal columns, ``S1`` general
  (not necessarily diagonal). Rank-adaptive integrators (:class:`RankAdaptiveIntegrator`)
  also offer :meth:`~RankAdaptiveIntegrator.augmented_step`, the result before
  truncation (rank up to ``2r``); their ``step`` applies the :class:`Truncation`
  policy held in their ``truncation`` attribute (``None``: no truncation).

Class attributes say what an integrator needs and does:
``needs_reevaluation`` (it evaluates the field at points other than :math:`Y_0`) and
``rank_adaptive``.

Substeps
--------
All substep ODEs (K-, L-, S-steps) are solved by one explicit Euler step with the field
evaluated at the substep's starting point and the step's starting time ``t``: the
choice of the training codes (DLRT, GeoLoRA, abc-PSI). For a field that does not depend
on ``Y`` and ``t``, Euler *is* the exact substep flow, so the exactness theorems of the
papers (stated for exact substeps) hold to rounding: for :math:`\dot Y = \dot A(t)`, the
exact substep flows see only :math:`A(t_1) - A(t_0)`, i.e. the constant field
:math:`(A(t_1) - A(t_0)) / h`.

No integrator calls ``.item()`` or moves data to the host, except the trimmed output of
a :class:`Truncation` (``pad=False``), which must know the new rank to size its result.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._args import check_ambient
from ..truncation import Truncation
from .fields import Ambient, Field, as_field

__all__ = ["Integrator", "RankAdaptiveIntegrator", "Factors"]

Factors = Tuple[Tensor, Tensor, Tensor]


class Integrator(ABC):
    """Base class: validation and the ``step`` entry point.

    A new integrator subclasses this (or :class:`RankAdaptiveIntegrator`), sets
    ``name`` and ``needs_reevaluation`` and implements ``_step(U, S, V, field, h, t)``,
    which receives validated factors broadcast to one batch shape, a :class:`Field`, and
    floats ``h``, ``t``; it evaluates the field through :meth:`_evaluate`.
    """

    name: str = "integrator"
    needs_reevaluation: bool = False
    rank_adaptive: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def step(self, U: Tensor, S: Tensor, V: Tensor, field, h: float, t: float = 0.0) -> Factors:
        """One step of size ``h`` from :math:`U S V^\\top` at time ``t``; returns ``(U1, S1, V1)``."""
        return self._step(*self._prepare(U, S, V, field, h, t))

    @abstractmethod
    def _step(self, U: Tensor, S: Tensor, V: Tensor, field: Field, h: float, t: float) -> Factors:
        """The step itself, on validated inputs."""

    def _prepare(self, U, S, V, field, h, t):
        for name, val in (("h", h), ("t", t)):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"{name} must be a real Python number, got {type(val).__name__}")
            if not math.isfinite(val):
                raise ValueError(f"{name} must be finite, got {val}")
        for name, x in (("U", U), ("S", S), ("V", V)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
            if x.dim() < 2:
                raise ValueError(f"{name} must be a (batch of) matrices, got shape {tuple(x.shape)}")
        for name, x in (("S", S), ("V", V)):
            if x.dtype != U.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but U has {U.dtype}")
            if x.device != U.device:
                raise ValueError(f"{name} is on {x.device} but U is on {U.device}")
        if tuple(S.shape[-2:]) != (U.shape[-1], V.shape[-1]):
            raise ValueError(
                f"S must have trailing shape (U columns, V columns) = ({U.shape[-1]}, {V.shape[-1]}), "
                f"got U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}"
            )
        try:
            batch = torch.broadcast_shapes(U.shape[:-2], S.shape[:-2], V.shape[:-2])
        except RuntimeError as err:
            raise ValueError(f"batch axes of U, S, V do not broadcast: {err}") from None
        field = as_field(field)
        if self.needs_reevaluation and field.snapshot:
            raise ValueError(
                f"{self.name} evaluates the field at points other than Y0, but this field is a "
                "snapshot known at Y0 only; give a CallableField (or a MatrixField with "
                "snapshot=False if it really is constant), or use an integrator with "
                "needs_reevaluation=False (parallel BUG, abc-PSI, a retraction)"
            )
        U, S, V = (x.expand(*batch, *x.shape[-2:]) for x in (U, S, V))
        return U, S, V, field, float(h), float(t)

    @staticmethod
    def _evaluate(field: Field, U: Tensor, S: Tensor, V: Tensor, t: float) -> Ambient:
        """The field at :math:`USV^\\top`, checked against the sizes, dtype and device of the factors."""
        return check_ambient(field.evaluate(U, S, V, t), U.shape[-2], V.shape[-2], U, "the field value")


class RankAdaptiveIntegrator(Integrator):
    """Base for integrators that augment the bases to rank up to ``2r`` and truncate.

    Subclasses implement ``_augmented_step``. :meth:`augmented_step` returns its result
    (``S`` a general core); :meth:`step` applies ``self.truncation``
    (a :class:`Truncation`, or ``None`` to return the augmented result).
    """

    rank_adaptive = True

    def __init__(self, truncation: Optional[Truncation] = None):
        if truncation is not None and not isinstance(truncation, Truncation):
            raise TypeError(f"truncation must be a Truncation or None, got {type(truncation).__name__}")
        self.truncation = truncation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(truncation={self.truncation!r})"

    def augmented_step(self, U: Tensor, S: Tensor, V: Tensor, field, h: float, t: float = 0.0, *,
                       active: Optional[Tensor] = None) -> Factors:
        """The step before truncation: orthonormal ``U1 (m, k_u)``, ``V1 (n, k_v)``, core ``S1``.

        ``active`` (optional, boolean ``(..., r)``, ``S`` square): the active columns of a
        padded point, the leading ones of ``U`` and ``V``, the others exactly zero (ranks as
        masks: a batch of points of different active ranks in one call). Each point's result
        is then the step of its active factors alone: its augmented directions come first in
        ``U1``, ``V1`` (from :func:`~lowrank_manifolds._linalg.qr_kept_first`), and ``S1`` is
        exactly zero on the completing directions that follow."""
        U, S, V, field, h, t = self._prepare(U, S, V, field, h, t)
        if active is None:  # an integrator of a user's own need not know masks
            return self._augmented_step(U, S, V, field, h, t)
        return self._augmented_step(U, S, V, field, h, t, _check_active(active, S))

    @abstractmethod
    def _augmented_step(self, U, S, V, field: Field, h: float, t: float,
                        active: Optional[Tensor] = None) -> Factors:
        """The augmented step on validated inputs (``active``: see :meth:`augmented_step`)."""

    def _step(self, U, S, V, field, h, t):
        out = self._augmented_step(U, S, V, field, h, t)
        return out if self.truncation is None else self.truncation(*out)


def _check_active(active: Tensor, S: Tensor) -> Tensor:
    """``active`` validated against the core ``S`` and broadcast to its batch shape."""
    r = S.shape[-1]
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        raise TypeError(f"active must be a boolean tensor, got {getattr(active, 'dtype', type(active).__name__)}")
    if S.shape[-2] != r or active.shape[-1:] != (r,):
        raise ValueError(f"active must have shape (..., r) for a square r x r core, got {tuple(active.shape)} "
                         f"for S {tuple(S.shape)}")
    return active.to(S.device).expand(*S.shape[:-2], r)
