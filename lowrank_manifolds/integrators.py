r"""Dynamical low-rank integrators behind one small protocol.

One step of size ``h`` for the matrix ODE :math:`\dot Y = F(Y, t)`, restricted to
low-rank matrices, from :math:`Y_0 = U_0 S_0 V_0^\top`.

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

Fields
------
A field returns its value :math:`F(Y, t)` as an *ambient* matrix, dense ``(..., m, n)``
or factored ``(A, B)`` meaning :math:`AB^\top`; integrators then form the products
:math:`F W`, :math:`F^\top Q`, :math:`Q^\top F W` with whatever bases they hold. A field
answers with its value, not with products, because one evaluation then serves every
product taken at the same point (BUG's K- and L-steps, abc-PSI's two steps): for a field
that runs a forward and backward pass per evaluation that is what counts. Factored values
are never expanded to m x n.

- :class:`MatrixField`: a constant matrix, dense or ``(A, B)`` (e.g. ``F = -G`` for a
  minibatch gradient ``G``). With ``snapshot=True`` it is declared to be
  :math:`F(Y_0)` only (a gradient from one backward pass at :math:`Y_0`): integrators
  that must evaluate the field elsewhere (``needs_reevaluation``) then raise instead of
  silently treating it as constant.
- :class:`TangentField`: a constant tangent vector :math:`\xi = U M V^\top + U_p V^\top
  + U V_p^\top` (the retraction use), held as the rank-2r pair
  :math:`([UM + U_p, U], [V, V_p])`; as an ambient matrix it answers every product at any
  basis.
- :class:`CallableField`: ``fn(U, S, V)`` or ``fn(U, S, V, t)`` evaluated afresh at each
  point an integrator asks for, returning a dense matrix or an ``(A, B)`` pair.

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
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ._linalg import cat_last, cat_rows, mT, qr
from .manifold import FixedRankManifold
from .truncation import Truncation, truncation_rank

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
]

Ambient = Union[Tensor, Tuple[Tensor, Tensor]]
Factors = Tuple[Tensor, Tensor, Tensor]


# ------------------------------------------------------------------ products
def ambient_right(z: Ambient, w: Tensor) -> Tensor:
    r""":math:`Z W` for a field value ``Z``, dense or a pair ``(A, B)`` (then :math:`A (B^\top W)`)."""
    if isinstance(z, tuple):
        a, b = z
        return a @ (mT(b) @ w)
    return z @ w


def ambient_left(z: Ambient, q: Tensor) -> Tensor:
    r""":math:`Z^\top Q` for a field value ``Z``, dense or a pair ``(A, B)`` (then :math:`B (A^\top Q)`)."""
    if isinstance(z, tuple):
        a, b = z
        return b @ (mT(a) @ q)
    return mT(z) @ q


def _check_ambient(z, m: int, n: int, ref: Tensor, what: str) -> Ambient:
    """Validate a field value: dense ``(..., m, n)`` or a pair ``(A (.., m, k), B (.., n, k))``
    with the dtype and device of ``ref``. Returns it with a pair as a tuple."""
    if isinstance(z, (tuple, list)):
        if len(z) != 2:
            raise ValueError(f"{what} as low-rank factors must be a pair (A, B), got {len(z)} items")
        parts = tuple(z)
        for t, rows, name in ((parts[0], m, "A"), (parts[1], n, "B")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}: factor {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2 or t.shape[-2] != rows:
                raise ValueError(f"{what}: factor {name} must have shape (..., {rows}, k), got {tuple(t.shape)}")
        if parts[0].shape[-1] != parts[1].shape[-1]:
            raise ValueError(
                f"{what}: factors A and B need the same number of columns, "
                f"got {parts[0].shape[-1]} and {parts[1].shape[-1]}"
            )
        tensors = parts
    elif isinstance(z, Tensor):
        if z.dim() < 2 or tuple(z.shape[-2:]) != (m, n):
            raise ValueError(f"{what} must have trailing shape (m, n) = ({m}, {n}), got {tuple(z.shape)}")
        tensors = (z,)
    else:
        raise TypeError(f"{what} must be a tensor (m x n) or a pair (A, B), got {type(z).__name__}")
    for t in tensors:
        if t.dtype != ref.dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but the factors have {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{what} is on {t.device} but the factors are on {ref.device}")
    return z if isinstance(z, Tensor) else tensors


# -------------------------------------------------------------------- fields
class Field(ABC):
    """A right-hand side :math:`F(Y, t)` of :math:`\\dot Y = F(Y, t)`.

    Subclasses implement :meth:`evaluate`. ``snapshot`` tells whether the value is
    known at the step's starting point only (see the module docstring).
    """

    snapshot: bool = False

    @abstractmethod
    def evaluate(self, U: Tensor, S: Tensor, V: Tensor, t: float) -> Ambient:
        """:math:`F(USV^\\top, t)` as a dense ``(..., m, n)`` tensor or an ``(A, B)`` pair."""


class MatrixField(Field):
    """A constant field: a dense ``(..., m, n)`` tensor or a pair ``(A, B)``
    meaning :math:`AB^\\top`.

    Parameters
    ----------
    value : Tensor or (Tensor, Tensor)
    snapshot : bool
        ``True`` declares the value to be :math:`F(Y_0)` of a field that does depend on
        ``Y`` (e.g. a minibatch gradient from one backward pass). Integrators with
        ``needs_reevaluation`` then refuse it rather than treat it as constant.
    """

    def __init__(self, value: Ambient, *, snapshot: bool = False):
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            if len(value) != 2 or not all(isinstance(t, Tensor) for t in value):
                raise TypeError("a low-rank field value must be a pair of tensors (A, B)")
            if value[0].dim() < 2 or value[1].dim() < 2 or value[0].shape[-1] != value[1].shape[-1]:
                raise ValueError(
                    f"factors A (m x k) and B (n x k) need the same k, got shapes "
                    f"{tuple(value[0].shape)} and {tuple(value[1].shape)}"
                )
            tensors = value
        elif isinstance(value, Tensor):
            if value.dim() < 2:
                raise ValueError(f"a dense field value must be (..., m, n), got shape {tuple(value.shape)}")
            tensors = (value,)
        else:
            raise TypeError(f"a field value must be a tensor or a pair (A, B), got {type(value).__name__}")
        for t in tensors:
            if not t.dtype.is_floating_point:
                raise TypeError(f"a field value must have a floating dtype, got {t.dtype}")
        self.value = value
        self.snapshot = bool(snapshot)

    def evaluate(self, U: Tensor, S: Tensor, V: Tensor, t: float) -> Ambient:
        return self.value


class TangentField(MatrixField):
    r"""The constant tangent vector :math:`\xi = U M V^\top + U_p V^\top + U V_p^\top`
    at :math:`X = USV^\top`.

    Held as the pair :math:`A = [UM + U_p,\ U]`, :math:`B = [V,\ V_p]` (m x 2r, n x 2r),
    so it answers :math:`\xi W`, :math:`\xi^\top Q` for any bases; the gauge conditions
    :math:`U^\top U_p = 0 = V^\top V_p` are not needed for that.
    """

    def __init__(self, U: Tensor, V: Tensor, Up: Tensor, M: Tensor, Vp: Tensor):
        for name, t in (("U", U), ("V", V), ("Up", Up), ("M", M), ("Vp", Vp)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        r = U.shape[-1]
        if Up.shape[-2:] != U.shape[-2:] or Vp.shape[-2:] != V.shape[-2:] or M.shape[-2:] != (r, V.shape[-1]):
            raise ValueError(
                f"tangent blocks must match the point: Up {tuple(Up.shape)} vs U {tuple(U.shape)}, "
                f"M {tuple(M.shape)}, Vp {tuple(Vp.shape)} vs V {tuple(V.shape)}"
            )
        super().__init__((cat_last(U @ M + Up, U), cat_last(V, Vp)))

    @classmethod
    def from_packed(cls, manifold: FixedRankManifold, x: Tensor, xi: Tensor) -> "TangentField":
        """From a packed point ``x = [U; S; V]`` and packed tangent ``xi = [Up; M; Vp]``."""
        u, _, v = manifold.unpack(x)
        up, mm, vp = manifold.unpack(xi)
        return cls(u, v, up, mm, vp)


class CallableField(Field):
    """A field evaluated afresh at every point an integrator asks for.

    Parameters
    ----------
    fn : callable
        ``fn(U, S, V)`` (or ``fn(U, S, V, t)`` when ``with_time``) returning
        :math:`F(USV^\\top, t)` as a dense ``(..., m, n)`` tensor or a pair ``(A, B)``.
    with_time : bool
        Pass the time ``t`` as fourth argument.
    """

    def __init__(self, fn: Callable[..., Ambient], *, with_time: bool = False):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.with_time = bool(with_time)

    def evaluate(self, U: Tensor, S: Tensor, V: Tensor, t: float) -> Ambient:
        return self.fn(U, S, V, t) if self.with_time else self.fn(U, S, V)


def as_field(field) -> Field:
    """A :class:`Field` from a field, a dense tensor / ``(A, B)`` pair (constant) or a
    callable ``fn(U, S, V)``."""
    if isinstance(field, Field):
        return field
    if isinstance(field, (Tensor, tuple, list)):
        return MatrixField(field)
    if callable(field):
        return CallableField(field)
    raise TypeError(
        "field must be a Field, a tensor (m x n), a pair (A, B) or a callable fn(U, S, V), "
        f"got {type(field).__name__}"
    )


# ---------------------------------------------------------------- protocol
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
        U, S, V, field, h, t = self._prepare(U, S, V, field, h, t)
        return self._step(U, S, V, field, h, t)

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
        return _check_ambient(field.evaluate(U, S, V, t), U.shape[-2], V.shape[-2], U, "the field value")


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

    def augmented_step(self, U: Tensor, S: Tensor, V: Tensor, field, h: float, t: float = 0.0) -> Factors:
        """The step before truncation: orthonormal ``U1 (m, k_u)``, ``V1 (n, k_v)``, core ``S1``."""
        U, S, V, field, h, t = self._prepare(U, S, V, field, h, t)
        return self._augmented_step(U, S, V, field, h, t)

    @abstractmethod
    def _augmented_step(self, U, S, V, field: Field, h: float, t: float) -> Factors:
        """The augmented step on validated inputs."""

    def _step(self, U, S, V, field, h, t):
        out = self._augmented_step(U, S, V, field, h, t)
        return out if self.truncation is None else self.truncation(*out)


# -------------------------------------------------------------- integrators
class KSL(Integrator):
    r"""Projector-splitting integrator, KSL order (Lubich and Oseledets 2014).

    C. Lubich, I. V. Oseledets, "A projector-splitting integrator for dynamical low-rank
    approximation", BIT 54 (2014) 171-188.

    .. math::
        K &= U_0 S_0 + h F(U_0 S_0 V_0^\top) V_0, & (U_1, \hat S) &= \operatorname{qr}(K),\\
        \tilde S &= \hat S - h U_1^\top F(U_1 \hat S V_0^\top) V_0, &&\\
        L &= V_0 \tilde S^\top + h F(U_1 \tilde S V_0^\top)^\top U_1, &
        (V_1, S_1^\top) &= \operatorname{qr}(L).

    Fixed rank; three field evaluations at three different points. Properties
    (Lubich-Oseledets Thm 4.1 and Kieri-Lubich-Walach 2016): exact when
    :math:`F = \dot A` for a rank-r :math:`A(t)` (with :math:`V(t_1)^\top V(t_0)`
    invertible), and robust: its error bounds do not depend on small singular values.
    The backward S-step is what makes it robust, and what makes it not parallel.
    """

    name = "KSL"
    needs_reevaluation = True

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        U1, S_hat = qr(U @ S + h * ambient_right(z, V))
        z = self._evaluate(field, U1, S_hat, V, t)
        S_tilde = S_hat - h * (mT(U1) @ ambient_right(z, V))
        z = self._evaluate(field, U1, S_tilde, V, t)
        V1, R = qr(V @ mT(S_tilde) + h * ambient_left(z, U1))
        return U1, mT(R), V1


class BUG(Integrator):
    r"""The basis-update & Galerkin ("unconventional") integrator, fixed rank.

    G. Ceruti, C. Lubich, "An unconventional robust integrator for dynamical low-rank
    approximation", BIT 62 (2022) 23-44.

    .. math::
        K_1 &= U_0 S_0 + h F(Y_0) V_0,\quad U_1 = \operatorname{orth}(K_1),\qquad
        L_1 = V_0 S_0^\top + h F(Y_0)^\top U_0,\quad V_1 = \operatorname{orth}(L_1),\\
        \bar S_0 &= (U_1^\top U_0) S_0 (V_0^\top V_1),\qquad
        S_1 = \bar S_0 + h U_1^\top F(U_1 \bar S_0 V_1^\top) V_1.

    Two evaluations (the K- and L-steps share the one at :math:`Y_0` and can run in
    parallel). Exact for :math:`F = \dot A` with rank-r :math:`A(t)` (Thm 4 of the
    paper), robust to small singular values, first order.
    """

    name = "BUG"
    needs_reevaluation = True

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        U1, _ = qr(U @ S + h * ambient_right(z, V))
        V1, _ = qr(V @ mT(S) + h * ambient_left(z, U))
        S0 = (mT(U1) @ U) @ S @ (mT(V) @ V1)
        z = self._evaluate(field, U1, S0, V1, t)
        return U1, S0 + h * (mT(U1) @ ambient_right(z, V1)), V1


class AugmentedBUG(RankAdaptiveIntegrator):
    r"""Rank-adaptive BUG (Ceruti, Kusch and Lubich 2022).

    G. Ceruti, J. Kusch, C. Lubich, "A rank-adaptive robust integrator for dynamical
    low-rank approximation", BIT 62 (2022) 1149-1174.

    .. math::
        \hat U &= \operatorname{orth}([K_1, U_0]),\quad \hat V = \operatorname{orth}([L_1, V_0])
        \quad (K_1, L_1 \text{ as in BUG}),\\
        \hat S_0 &= (\hat U^\top U_0) S_0 (V_0^\top \hat V),\qquad
        \hat S = \hat S_0 + h \hat U^\top F(\hat U \hat S_0 \hat V^\top) \hat V,

    then truncation (:class:`Truncation`). Since :math:`U_0 \in \operatorname{span}\hat U`
    and :math:`V_0 \in \operatorname{span}\hat V`, :math:`\hat U \hat S_0 \hat V^\top =
    Y_0`. Before truncation: exact for :math:`F = \dot A` with rank-r :math:`A(t)`; for a
    constant tangent field :math:`\xi` the result is exactly :math:`Y_0 + h\xi`, so with
    truncation to rank r it is the metric-projection retraction. Robust (error bound
    independent of small singular values), first order.
    """

    name = "augmented BUG"
    needs_reevaluation = True

    def _augmented_step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        Uh, _ = qr(cat_last(U @ S + h * ambient_right(z, V), U))
        Vh, _ = qr(cat_last(V @ mT(S) + h * ambient_left(z, U), V))
        S0 = (mT(Uh) @ U) @ S @ (mT(V) @ Vh)
        z = self._evaluate(field, Uh, S0, Vh, t)
        return Uh, S0 + h * (mT(Uh) @ ambient_right(z, Vh)), Vh


class ParallelBUG(RankAdaptiveIntegrator):
    r"""Parallel rank-adaptive BUG (Ceruti, Kusch and Lubich 2024).

    G. Ceruti, J. Kusch, C. Lubich, "A parallel rank-adaptive integrator for dynamical
    low-rank approximation", SIAM J. Sci. Comput. 46 (2024) B205-B228.

    With one evaluation :math:`F_0 = F(Y_0)`:
    :math:`K_1 = U_0 S_0 + h F_0 V_0`, :math:`L_1 = V_0 S_0^\top + h F_0^\top U_0`,
    :math:`\bar S = S_0 + h U_0^\top F_0 V_0`; :math:`\tilde U` = the last columns of the
    QR factor of :math:`[U_0, K_1]` (so :math:`\tilde U \perp U_0`), :math:`\tilde V`
    likewise; in the bases :math:`[U_0, \tilde U]`, :math:`[V_0, \tilde V]`

    .. math:: \hat S = \begin{bmatrix} \bar S & L_1^\top \tilde V \\
              \tilde U^\top K_1 & 0 \end{bmatrix},

    then truncation. All three substeps run in parallel from :math:`Y_0`. The result is
    returned in the Q factors of the two QRs, :math:`[U_0, K_1] = Q_u R_u`, i.e.
    :math:`[U_0, \tilde U] = Q_u \operatorname{diag}((R_u)_{11}, I)`, with the core
    :math:`\operatorname{diag}((R_u)_{11}, I)\, \hat S\, \operatorname{diag}((R_v)_{11}, I)^\top`:
    the same matrix, but bases orthonormal to the QR's rounding at every step (carrying
    :math:`U_0` itself over let its rounding errors accumulate, to 2e-5 after
    :math:`10^4` float32 steps of a rotating field). For a constant
    field :math:`F` the augmented result is exactly :math:`Y_0 + h P_{Y_0}(F)` (GeoLoRA's
    step), so with truncation to rank r it is the metric retraction of
    :math:`h P_{Y_0}(F)`. Not exact for :math:`\dot A`, but its local error is
    :math:`O(h^2)` with constants independent of small singular values.
    """

    name = "parallel BUG"
    needs_reevaluation = False

    def _augmented_step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        zv, ztu = ambient_right(z, V), ambient_left(z, U)
        K = U @ S + h * zv
        L = V @ mT(S) + h * ztu
        S_bar = S + h * (mT(U) @ zv)
        ru, rv = U.shape[-1], V.shape[-1]
        Qu, Ru = qr(cat_last(U, K))
        Qv, Rv = qr(cat_last(V, L))
        Ut, Vt = Qu[..., ru:], Qv[..., rv:]
        top = cat_last(S_bar, mT(L) @ Vt)
        bottom = cat_last(mT(Ut) @ K, S.new_zeros(*S.shape[:-2], Ut.shape[-1], Vt.shape[-1]))
        # The core is S^ in the bases [U0, U~], [V0, V~]; it is returned in the Q factors
        # themselves, [U0, U~] = Qu diag(Ru11, I): the same matrix, and bases orthonormal to
        # the QR's rounding whatever U0's own drift (U0 is not carried over).
        S_hat = torch.cat([top, bottom], dim=-2)
        return Qu, _block_congruence(Ru[..., :ru, :ru], S_hat, Rv[..., :rv, :rv]), Qv


def _block_congruence(a: Tensor, s: Tensor, b: Tensor) -> Tensor:
    r""":math:`\operatorname{diag}(a, I)\, s\, \operatorname{diag}(b, I)^\top` without forming
    the block diagonals (``a`` acts on the leading rows of ``s``, ``b`` on its leading columns)."""
    ka, kb = a.shape[-1], b.shape[-1]
    s = torch.cat([a @ s[..., :ka, :], s[..., ka:, :]], dim=-2)
    return torch.cat([s[..., :kb] @ mT(b), s[..., kb:]], dim=-1)


class ABCPSI(RankAdaptiveIntegrator):
    r"""Augmented backward-corrected projector-splitting integrator (abc-PSI).

    J. Kusch, S. Schotthöfer, A. Walter, "An augmented backward-corrected projector
    splitting integrator for dynamical low-rank training", 2025 (arXiv:2502.03006).

    With one evaluation :math:`F_0 = F(Y_0)`:

    .. math::
        K_1 &= U_0 S_0 + h F_0 V_0,\quad \hat U = \operatorname{orth}([K_1, U_0]),\quad
        \tilde S = \hat U^\top U_0 S_0,\\
        L_1 &= V_0 \tilde S^\top + h F_0^\top \hat U,\quad (\hat V, R) = \operatorname{qr}(L_1),
        \quad \hat S = R^\top,

    then truncation. The backward correction :math:`\tilde S` makes
    :math:`\hat U \tilde S V_0^\top = Y_0` exactly, so the L-step's field is again
    :math:`F(Y_0)` (one evaluation; for a linear layer no second backward pass). Before
    truncation :math:`Y_1 = \hat U L_1^\top = Y_0 + h \hat U \hat U^\top F_0`; for
    :math:`F_0 = -G`, :math:`\|\hat U \hat U^\top G\| \ge \|P_{Y_0} G\|` (descent at
    least that of the Riemannian gradient step), and for a constant tangent field the
    result is exactly :math:`Y_0 + h\xi`. Two QRs and one core SVD; no S-step.
    """

    name = "abc-PSI"
    needs_reevaluation = False

    def _augmented_step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        Uh, _ = qr(cat_last(U @ S + h * ambient_right(z, V), U))
        S_tilde = (mT(Uh) @ U) @ S
        Vh, R = qr(V @ mT(S_tilde) + h * ambient_left(z, Uh))
        return Uh, mT(R), Vh


class RetractionStep(Integrator):
    r"""Projected Euler step through a retraction of :class:`FixedRankManifold`:
    :math:`Y_1 = R_{Y_0}(h P_{Y_0} F(Y_0))`.

    ``kind="metric"``: the metric projection (truncated SVD of :math:`Y_0 + h P F`;
    Kieri and Vandereycken 2019 show this projected Euler method is robust to small
    singular values). ``kind="orthographic"``: the orthographic retraction (Absil and
    Oseledets 2015), which needs :math:`S_0 + h M` invertible. Both second-order
    retractions; the step is first order. Fixed rank; needs a square ``S``. The maths is
    the manifold's (:meth:`FixedRankManifold.proj_dense`, ``proj_lowrank``, ``retr``).
    """

    needs_reevaluation = False

    def __init__(self, kind: str = "metric"):
        if kind not in ("metric", "orthographic"):
            raise ValueError(f"kind must be 'metric' or 'orthographic', got {kind!r}")
        self.kind = kind
        self.name = f"{kind} retraction"

    def __repr__(self) -> str:
        return f"RetractionStep(kind={self.kind!r})"

    def _step(self, U, S, V, field, h, t):
        manifold = _square_core_manifold(U, S, V, self.name, retraction=self.kind)
        z = self._evaluate(field, U, S, V, t)
        x = cat_rows(U, S, V)
        xi = manifold.proj_lowrank(x, *z) if isinstance(z, tuple) else manifold.proj_dense(x, z)
        return manifold.unpack(manifold.retr(x, h * xi))


class NaiveEuler(Integrator):
    r"""Explicit Euler on the factor ODEs of Koch and Lubich (2007): the non-robust baseline.

    O. Koch, C. Lubich, "Dynamical low-rank approximation", SIAM J. Matrix Anal. Appl.
    29 (2007) 434-454:

    .. math:: \dot S = U^\top F V,\quad \dot U = (I - UU^\top) F V S^{-1},\quad
              \dot V = (I - VV^\top) F^\top U S^{-\top},

    one Euler step on each factor, then re-orthonormalisation of the bases
    (:meth:`FixedRankManifold.projx`). :math:`S^{-1}` makes the ODE stiff as the smallest
    singular value goes to 0: the step's error grows like :math:`h^2/\sigma_{\min}`
    (the failure the robust integrators avoid). Fixed rank; needs a square invertible ``S``.
    """

    name = "naive Euler"
    needs_reevaluation = False

    def _step(self, U, S, V, field, h, t):
        manifold = _square_core_manifold(U, S, V, self.name)
        z = self._evaluate(field, U, S, V, t)
        zv, ztu = ambient_right(z, V), ambient_left(z, U)
        dS = mT(U) @ zv
        dU = torch.linalg.solve(S, zv - U @ dS, left=False)  # (I - UU^T) F V S^{-1}
        dV = torch.linalg.solve(mT(S), ztu - V @ mT(dS), left=False)  # (I - VV^T) F^T U S^{-T}
        x = cat_rows(U + h * dU, S + h * dS, V + h * dV)
        return manifold.unpack(manifold.projx(x))


def _square_core_manifold(U, S, V, name: str, **kwargs) -> FixedRankManifold:
    if S.shape[-1] != S.shape[-2]:
        raise ValueError(f"{name} needs a square S, got shape {tuple(S.shape)}")
    return FixedRankManifold(U.shape[-2], V.shape[-2], S.shape[-1], **kwargs)
