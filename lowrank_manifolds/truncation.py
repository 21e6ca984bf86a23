"""Rank truncation (private home of the policy shared by the manifold and the integrators;
public through ``lowrank_manifolds.integrators``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._args import nonneg
from ._linalg import core_dtype, mT, svd_core, tmm

__all__ = ["Truncation", "truncation_rank"]

Factors = Tuple[Tensor, Tensor, Tensor]

def _check_rank_bounds(min_rank, max_rank) -> None:
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if max_rank is not None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < min_rank:
            raise ValueError(f"max_rank must be None or an int >= min_rank = {min_rank}, got {max_rank!r}")


def truncation_rank(
    s: Tensor, tol: float, *, relative: bool = True, min_rank: int = 1, max_rank: Optional[int] = None
) -> Tensor:
    r"""The rank kept by truncation, from singular values ``s (..., k)`` in descending order.

    .. math:: r_1 = \min\{\rho : \big(\textstyle\sum_{j > \rho} s_j^2\big)^{1/2} \le \vartheta\},
              \qquad \vartheta = \mathrm{tol}\cdot\|s\|_2 \ (\text{relative})
              \ \text{or}\ \mathrm{tol}\ (\text{absolute}),

    clipped to ``[min_rank, max_rank]`` (and to ``k``). By Eckart-Young the Frobenius
    error of the truncation is the discarded tail :math:`(\sum_{j > r_1} s_j^2)^{1/2}`,
    which is :math:`\le \vartheta` unless ``max_rank`` cut it. Returns an int64 tensor of
    the batch shape, on the device of ``s``. The tail is summed from the small end, so tiny
    tails are accurate, and in float64 (as the core SVDs), so that float32 singular values
    near the overflow or underflow thresholds decide as well.

    ``s`` must be finite, non-negative and non-increasing: checked, at the cost of one host
    read (``ValueError`` otherwise; a NaN would otherwise count as discarded and ascending
    values would keep the wrong ones). :class:`Truncation`, which the integrators and
    optimizers call inside their steps on singular values they computed, does not check.
    """
    tol = nonneg(tol, "tol")
    _check_rank_bounds(min_rank, max_rank)
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be True or False, got {relative!r}")
    if not isinstance(s, Tensor) or not s.dtype.is_floating_point or s.dim() < 1:
        raise TypeError(f"s must be a floating tensor of singular values (..., k), got {_describe(s)}")
    if s.device.type != "meta" and s.shape[-1] and not bool(
            (torch.isfinite(s).all() & (s >= 0).all() & (s[..., 1:] <= s[..., :-1]).all())):
        raise ValueError("the singular values must be finite, non-negative and in descending order")
    return _rank(s, tol, relative, min_rank, max_rank)


def _describe(s) -> str:
    return f"a {s.dtype} tensor of shape {tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__


def _rank(s: Tensor, tol: float, relative: bool, min_rank: int, max_rank: Optional[int]) -> Tensor:
    """:func:`truncation_rank` on checked arguments (no host sync)."""
    k = s.shape[-1]
    s = s.to(core_dtype(s))  # the sums of squares in float64: no overflow or underflow of s^2 in float32
    tail = torch.flip(torch.cumsum(torch.flip(s * s, (-1,)), -1), (-1,)).sqrt()  # tail[j] = ||s[j:]||
    theta = tol * tail[..., :1] if relative else torch.full_like(tail[..., :1], tol)
    rank = (tail > theta).sum(-1)  # tail is non-increasing: {j : tail_j > theta} = {0, ..., r1 - 1}
    hi = k if max_rank is None else min(max_rank, k)
    return rank.clamp(min=min(min_rank, k), max=hi)


class Truncation:
    r"""Rank truncation policy for rank-adaptive integrators (docs/integrators.md).

    Called on an augmented result ``(U, S, V)`` (``S`` a general ``k_u x k_v`` core),
    it takes the SVD :math:`S = P \operatorname{diag}(s) Q^\top`, chooses the rank
    :math:`r_1` by :func:`truncation_rank` and returns
    :math:`(U P_{:,:r_1},\ \operatorname{diag}(s_{:r_1}),\ V Q_{:,:r_1})`, whose distance
    to :math:`USV^\top` in Frobenius norm is the discarded tail.

    Parameters
    ----------
    tol : float
        Tolerance :math:`\vartheta` (absolute) or :math:`\vartheta / \|s\|` (relative).
    relative : bool
        Relative (training codes) or absolute (DLRA papers) tolerance.
    min_rank, max_rank : int
        Clip the rank to ``[min_rank, max_rank]``; ``min_rank = max_rank = r`` is plain
        truncation to rank ``r``.
    pad : bool
        ``False`` (default): the trimmed result, with ``max r_1`` over the batch columns.
        Finding that number is a host sync (one ``.item()``-like read). ``True``: exactly
        ``max_rank`` columns (required) whatever the rank, no host sync, fixed shapes
        (meta device, CUDA graphs). In both cases the columns of ``U``, ``V`` and the
        entries of ``S`` beyond each batch element's own rank are exactly zero (the
        manifold's capacity convention).
    """

    def __init__(
        self,
        tol: float = 0.0,
        *,
        relative: bool = True,
        min_rank: int = 1,
        max_rank: Optional[int] = None,
        pad: bool = False,
    ):
        self.tol = nonneg(tol, "tol")
        _check_rank_bounds(min_rank, max_rank)
        if pad and max_rank is None:
            raise ValueError("pad=True needs max_rank (the fixed capacity of the output)")
        for value, name in ((relative, "relative"), (pad, "pad")):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.relative = relative
        self.min_rank = min_rank
        self.max_rank = max_rank
        self.pad = pad

    def __repr__(self) -> str:
        return (
            f"Truncation(tol={self.tol}, relative={self.relative}, min_rank={self.min_rank}, "
            f"max_rank={self.max_rank}, pad={self.pad})"
        )

    def rank(self, s: Tensor) -> Tensor:
        """:func:`truncation_rank` with this policy's settings, without checking ``s`` (no host
        sync: the callers pass singular values they computed)."""
        return _rank(s, self.tol, self.relative, self.min_rank, self.max_rank)

    def __call__(self, U: Tensor, S: Tensor, V: Tensor) -> Factors:
        p_r, s1, q_r = self.decompose(S)
        return tmm(U, p_r), s1, tmm(V, q_r)

    def decompose(self, S: Tensor, rank: Optional[Tensor] = None) -> Factors:
        r"""The truncation of a core alone: ``(P_r, S_1, Q_r)`` with :math:`S = P
        \operatorname{diag}(s) Q^\top`, ``P_r``, ``Q_r`` the kept singular vectors (zero
        beyond each batch element's rank, padded to the output width) and
        :math:`S_1 = \operatorname{diag}(s_{kept})`. Then :math:`(U P_r, S_1, V Q_r)` is the
        truncation of :math:`(U, S, V)`, and :math:`P_r^\top m\, Q_r` carries a coefficient
        matrix ``m`` in the bases ``U``, ``V`` (an optimizer's moments) to the new bases.

        ``rank`` (int64, the batch shape), if given, replaces the policy's rank decision
        (clipped to ``max_rank``), e.g. to keep a current active rank."""
        p, s, qh = svd_core(S)
        keep, width, rank = self._widths(s, rank)
        return self._finish(p[..., :keep], s, mT(qh[..., :keep, :]), keep, width, rank)

    def from_svd(self, Uw: Tensor, s: Tensor, Vw: Tensor) -> Factors:
        """The same truncation from an SVD already taken: ``Uw``, ``Vw`` the leading
        singular vectors (at least as many columns as are kept: ``max_rank`` or ``len(s)``),
        ``s`` all the singular values, descending."""
        keep, width, rank = self._widths(s)
        return self._finish(Uw[..., :keep], s, Vw[..., :keep], keep, width, rank)

    def _widths(self, s: Tensor, rank: Optional[Tensor] = None):
        q = s.shape[-1]
        if rank is None and self.min_rank == self.max_rank:
            # Fixed rank: min(rank, q) for every batch element, whatever s is, so neither the
            # rank nor the masks need computing (a third of the calls at small sizes).
            keep = min(self.max_rank, q)
            return keep, (self.max_rank if self.pad else keep), None
        if rank is None:
            rank = self.rank(s)
        elif self.max_rank is not None:
            rank = rank.clamp(max=self.max_rank)
        width = self.max_rank if self.pad else int(rank.max())  # the trimmed width: a host sync
        return min(width, q), width, rank

    @staticmethod
    def _finish(u1: Tensor, s: Tensor, v1: Tensor, keep: int, width: int, rank) -> Factors:
        s1 = s[..., :keep]
        if rank is not None:
            mask = (torch.arange(keep, device=s.device) < rank.unsqueeze(-1)).to(s.dtype)
            u1, v1, s1 = u1 * mask.unsqueeze(-2), v1 * mask.unsqueeze(-2), s1 * mask
        if keep < width:  # capacity above what the core can fill: zero columns
            extra = width - keep
            u1 = torch.nn.functional.pad(u1, (0, extra))
            v1 = torch.nn.functional.pad(v1, (0, extra))
            s1 = torch.nn.functional.pad(s1, (0, extra))
        return u1, torch.diag_embed(s1), v1
