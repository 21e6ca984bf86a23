r"""Fine-tuning adapters: a frozen ``nn.Linear`` plus a trainable low-rank correction on the manifold."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import geoopt
import torch
from torch import Tensor, nn

from .._linalg import mT
from ._common import (
    ManifoldModule,
    check_capacity,
    check_rank,
    haar_stiefel,
    make_manifold,
    manifold_repr,
    split_factors,
)

__all__ = ["LowRankAdapterLinear"]


class LowRankAdapterLinear(ManifoldModule):
    r"""A frozen dense ``nn.Linear`` plus a trainable rank-``r`` correction on the manifold.

    .. math:: y = x\,(W_0 + U S V^\top)^\top + b_0

    The correction :math:`\Delta = USV^\top` is ``self.delta``, a
    :class:`geoopt.ManifoldParameter` on ``FixedRankManifold(m, n, rank)``; the
    base layer ``self.base`` (with :math:`W_0`, :math:`b_0`) is frozen
    (``requires_grad=False``). This is the fine-tuning setting of GeoLoRA: train
    ``delta`` with ``geoopt.optim.RiemannianAdam``/``RiemannianSGD``.

    Parameters
    ----------
    base : nn.Linear
        The pretrained layer. It is adopted, not copied: it is frozen and, with
        ``exact_init=True``, its weight is overwritten in place (see below).
    rank : int
        ``1 <= rank <= min(in_features, out_features)``; with ``max_rank``, the
        initial rank.
    max_rank, tol
        Capacity and truncation tolerance of a rank-adaptive correction, as in
        :class:`LowRankLinear`.
    init_scale : float
        Scale of the initial correction, relative to the RMS singular value
        :math:`\|W_0\|_F / \sqrt{\min(m, n)}` of the base weight (or absolute if
        :math:`W_0 = 0`): :math:`\Delta_0 = U_0 (\varepsilon I) V_0^\top` with Haar
        ``U_0``, ``V_0`` and :math:`\varepsilon` = ``init_scale`` times that value.
        Default ``1e-3``. It must be positive: a rank-``r`` point cannot be zero.
    exact_init : bool
        If ``True`` (default), :math:`\Delta_0` is subtracted from the base weight
        (:math:`W_0 \leftarrow W_0 - \Delta_0`, in place, under ``no_grad``), so the
        adapted layer computes exactly the base layer's map at initialisation (to
        rounding, :math:`O(\epsilon_{mach} \|\Delta_0\|)`) without any extra buffer.
        If ``False``, the base is left untouched and the initial output differs by
        :math:`x\Delta_0^\top`, small by ``init_scale``.
    second_moment : {"rows", "scalar"}
        What stock ``geoopt.optim.RiemannianAdam`` keeps on the point (the manifold's
        :attr:`~lowrank_manifolds.FixedRankManifold.second_moment`; ``"rows"``, the default,
        takes Adam-like learning rates, ``docs/training.md``).

    Notes
    -----
    Forward cost :math:`O(b\,(mn + (m + n) r))`: the base layer's dense product plus
    the two thin products of :class:`LowRankLinear`; the gradient reaches only the
    factors of ``delta`` (and ``x``). :meth:`merge` returns a plain ``nn.Linear``
    with weight :math:`W_0 + USV^\top`. The state dict holds the (folded) base and
    the packed correction, so saving and loading reproduce the layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        max_rank: Optional[int] = None,
        tol: float = 0.0,
        init_scale: float = 1e-3,
        exact_init: bool = True,
        second_moment: str = "rows",
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        m, n = base.out_features, base.in_features
        check_rank(rank, m, n, "LowRankAdapterLinear")
        check_capacity(max_rank, rank, m, n, "LowRankAdapterLinear")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        base.requires_grad_(False)
        self.base = base
        self.init_scale = float(init_scale)
        manifold = make_manifold(m, n, rank, max_rank, tol, second_moment=second_moment)
        self._keep_manifold("delta", manifold)
        w0 = base.weight
        factory = dict(dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            ref = torch.linalg.matrix_norm(w0.detach()) / math.sqrt(min(m, n))
            ref = torch.where(ref > 0, ref, torch.ones_like(ref))
            u = haar_stiefel(m, rank, **factory)
            v = haar_stiefel(n, rank, **factory)
            s = (self.init_scale * ref) * torch.eye(rank, **factory)
            point = manifold.pad(u, s, v)
            if exact_init:
                w0.sub_((u @ s) @ mT(v))
        self.delta = geoopt.ManifoldParameter(geoopt.ManifoldTensor(point, manifold=manifold), manifold=manifold)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Views ``(U, S, V)`` of the packed correction, :math:`\Delta = USV^\top`."""
        return self.manifold.unpack(self.delta)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowRankAdapterLinear expects inputs of shape (..., in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        a, b = split_factors(*self.delta_factors())
        return self.base(x) + (x @ b) @ mT(a)

    def merge(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`W_0 + USV^\top` and the base bias
        (cost :math:`O(mnr)`); a new, trainable layer, detached from this one."""
        w0 = self.base.weight
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, dtype=w0.dtype, device=w0.device
        )
        with torch.no_grad():
            lin.weight.copy_(w0 + self.manifold.to_dense(self.delta))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return manifold_repr(self.manifold)
