r"""Dynamical low-rank integrators behind one small protocol.

One step of size ``h`` for the matrix ODE :math:`\dot Y = F(Y, t)`, restricted to
low-rank matrices, from :math:`Y_0 = U_0 S_0 V_0^\top`::

    U1, S1, V1 = integrator.step(U0, S0, V0, field, h, t=0.0)

- :mod:`.fields`: the right-hand sides (:class:`MatrixField`, :class:`TangentField`,
  :class:`CallableField`) and the products integrators take with them;
- :mod:`.base`: the protocol (:class:`Integrator`, :class:`RankAdaptiveIntegrator`) and
  how substeps are solved;
- :mod:`.robust`: KSL and BUG (fixed rank), augmented BUG, parallel BUG and abc-PSI
  (rank adaptive);
- :mod:`.baselines`: a projected Euler step through a retraction and the non-robust
  explicit Euler of the factor ODEs;
- the truncation policy (:class:`Truncation`, :func:`truncation_rank`), shared with the
  manifold and the optimizers.

:data:`INTEGRATORS` names the integrators wherever a name is accepted (the manifold's
``retraction=``, :class:`~lowrank_manifolds.optim.DLRT`'s ``integrator=``);
:func:`get_integrator` resolves a name or checks an instance.
"""
from __future__ import annotations

from typing import Union

from .._retractions import INTEGRATORS
from ..truncation import Truncation, truncation_rank
from .base import Integrator, RankAdaptiveIntegrator
from .baselines import NaiveEuler, RetractionStep
from .fields import CallableField, Field, MatrixField, TangentField, ambient_left, ambient_right, as_field
from .robust import ABCPSI, BUG, KSL, AugmentedBUG, ParallelBUG

__all__ = [
    "Field",
    "MatrixField",
    "TangentField",
    "CallableField",
    "as_field",
    "ambient_right",
    "ambient_left",
    "truncation_rank",
    "Truncation",
    "Integrator",
    "RankAdaptiveIntegrator",
    "KSL",
    "BUG",
    "AugmentedBUG",
    "ParallelBUG",
    "ABCPSI",
    "RetractionStep",
    "NaiveEuler",
    "INTEGRATORS",
    "get_integrator",
]

#: The integrators by name (the names the docs and the lab use, lower case). The dictionary is
#: the one the manifold reads a ``retraction=`` name from.
INTEGRATORS.update({
    "ksl": KSL,
    "bug": BUG,
    "augmented-bug": AugmentedBUG,
    "parallel-bug": ParallelBUG,
    "abc-psi": ABCPSI,
    "naive-euler": NaiveEuler,
})


def get_integrator(integrator: Union[str, Integrator]) -> Integrator:
    """An integrator instance from a name of :data:`INTEGRATORS` (a new default instance) or an
    instance (returned as is). ``ValueError`` for an unknown name, ``TypeError`` otherwise."""
    if isinstance(integrator, str):
        cls = INTEGRATORS.get(integrator)
        if cls is None:
            raise ValueError(f"unknown integrator {integrator!r}; the names are {sorted(INTEGRATORS)}")
        return cls()
    if isinstance(integrator, Integrator):
        return integrator
    raise TypeError(f"an integrator must be a name of {sorted(INTEGRATORS)} or an Integrator, got "
                    f"{type(integrator).__name__}")
