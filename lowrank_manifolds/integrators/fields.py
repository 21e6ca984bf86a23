r"""Right-hand sides of :math:`\dot Y = F(Y, t)` for the integrators, and the products they take.

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
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Tuple, Union

from torch import Tensor

from .._linalg import cat_last, mT
from ..manifold import FixedRankManifold

__all__ = ["Ambient", "Field", "MatrixField", "TangentField", "CallableField", "as_field", "ambient_right", "ambient_left"]

Ambient = Union[Tensor, Tuple[Tensor, Tensor]]


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
