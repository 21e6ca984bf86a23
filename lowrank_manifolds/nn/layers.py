r"""Low-rank layers: :class:`LowRankLinear` and :class:`LowRankConv2d` (the shared weight machinery
in ``_LowRankWeight``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import geoopt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._args import positive_int
from .._linalg import mT
from ._common import (
    ManifoldModule,
    check_capacity,
    check_rank,
    conversion_args,
    haar_stiefel,
    make_manifold,
    manifold_repr,
    split_factors,
    trim,
    truncated_factors,
)

__all__ = ["LowRankLinear", "LowRankConv2d"]


class _LowRankWeight(ManifoldModule):
    """Shared machinery of the layers holding ``self.weight`` on a fixed-rank manifold."""

    weight: geoopt.ManifoldParameter

    def _init_weight(self, m: int, n: int, rank: int, *, max_rank, tol, retraction, second_moment,
                     bias: bool, dtype, device, what: str) -> None:
        """Validate the rank and capacity, create :attr:`weight` (an ``m x n`` matrix on its
        manifold) and ``bias`` (``m``), then draw them (``reset_parameters``)."""
        check_rank(rank, m, n, what)
        check_capacity(max_rank, rank, m, n, what)
        manifold = make_manifold(m, n, rank, max_rank, tol, retraction, second_moment)
        self._keep_manifold("weight", manifold)
        point = torch.empty(manifold.packed_shape, dtype=dtype, device=device)
        self.weight = geoopt.ManifoldParameter(
            geoopt.ManifoldTensor(point, manifold=manifold), manifold=manifold
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(m, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _active_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(U, S, V)`` trimmed to the active rank (one host sync with a capacity)."""
        return trim(self.manifold, self.weight)

    def weight_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Views ``(U, S, V)`` of the packed weight (differentiable), with
        :math:`W = U S V^\top`."""
        return self.manifold.unpack(self.weight)

    def dense_weight(self) -> Tensor:
        r"""The dense matrix :math:`W = U S V^\top` (``m x n``; cost :math:`O(mnr)`).

        For inspection and export only; the forward pass never forms it.
        """
        return self.manifold.to_dense(self.weight)

    def _reset_factors(self, fan_in: int) -> None:
        r"""Cheap factored initialisation matching ``nn.Linear``/``nn.Conv2d``'s scale.

        PyTorch draws :math:`W_{ij} \sim \mathcal{U}(-1/\sqrt{n}, 1/\sqrt{n})`
        (``kaiming_uniform_(a=sqrt(5))``), so :math:`\mathbb{E}\|W\|_F^2 = m/3` and
        :math:`\mathbb{E}\|Wx\|^2 = \tfrac{m}{3n}\|x\|^2` for any fixed ``x``. Here
        ``U`` and ``V`` are Haar-distributed and :math:`S = \sigma I` with
        :math:`\sigma = \sqrt{m / (3 r)}`: then :math:`\|W\|_F^2 = m/3` exactly and,
        since :math:`\mathbb{E}\,VV^\top = (r/n) I`,
        :math:`\mathbb{E}\|Wx\|^2 = \sigma^2 (r/n)\|x\|^2 = \tfrac{m}{3n}\|x\|^2`:
        the same output variance as the dense layer. Cost :math:`O((m + n) r^2)`
        (two thin QRs), instead of :math:`O(mnr)` for a truncated SVD of a dense draw.
        """
        m, n, r = self.manifold.m, self.manifold.n, self.rank
        factory = dict(dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            u = haar_stiefel(m, r, **factory)
            v = haar_stiefel(n, r, **factory)
            s = math.sqrt(m / (3.0 * r)) * torch.eye(r, **factory)
            self.weight.copy_(self.manifold.pad(u, s, v))  # active rank r, zero padding
            if getattr(self, "bias", None) is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def _adopt(self, u: Tensor, s: Tensor, v: Tensor, source: nn.Module) -> "_LowRankWeight":
        """Take the factors of a truncated SVD and the bias and mode of the dense ``source``."""
        self._set_factors(u, s, v)
        if source.bias is not None:
            with torch.no_grad():
                self.bias.copy_(source.bias)
        self.train(source.training)
        return self

    def _set_factors(self, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Set the weight from rank-``k`` factors (``k <= capacity``), zero padded."""
        with torch.no_grad():
            self.weight.copy_(self.manifold.pad(u, s, v))

    @classmethod
    def _from_matrix(cls, dense: nn.Module, w: Tensor, ctor_args: tuple, ctor_kwargs: dict, *, rank, svd_tol,
                     max_rank, tol, rank_tol, second_moment):
        """The layer ``cls(*ctor_args, r, **ctor_kwargs)`` holding the truncated SVD of the
        matricised dense weight ``w`` (``m x n``) and the bias and mode of ``dense``."""
        what = f"the {type(dense).__name__}"
        rank, cut, max_rank, tol = conversion_args(rank, svd_tol, max_rank, tol, rank_tol, *w.shape,
                                                   f"{cls.__name__}.from_dense")
        u, s, v = truncated_factors(w, rank, cut, what)
        layer = torch.nn.utils.skip_init(
            cls, *ctor_args, u.shape[-1], bias=dense.bias is not None, max_rank=max_rank, tol=tol,
            dtype=w.dtype, device=w.device, second_moment=second_moment, **ctor_kwargs,
        )
        return layer._adopt(u, s, v, dense)

    def _export(self, plain: nn.Module, weight: Tensor) -> nn.Module:
        """``plain`` (a dense layer of this one's kind) with ``weight``, this layer's bias and mode."""
        with torch.no_grad():
            plain.weight.copy_(weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.train(self.training)

    def _two_layers(self, first: nn.Module, second: nn.Module, w_first: Tensor, w_second: Tensor) -> nn.Sequential:
        """``nn.Sequential(first, second)`` with the given weights and the bias on ``second``."""
        with torch.no_grad():
            first.weight.copy_(w_first)
        return nn.Sequential(first, self._export(second, w_second)).train(self.training)

    def _weight_repr(self) -> str:
        return manifold_repr(self.manifold)


class LowRankLinear(_LowRankWeight):
    r"""A linear layer with a fixed-rank weight on the manifold of rank-``r`` matrices.

    .. math:: y = x W^\top + b, \qquad W = U S V^\top \in \mathbb{R}^{m \times n},

    with ``m = out_features``, ``n = in_features``, ``U`` (m x r) and ``V`` (n x r)
    orthonormal, ``S`` (r x r) invertible. The weight is ``self.weight``, a
    :class:`geoopt.ManifoldParameter` on ``FixedRankManifold(m, n, rank)`` whose
    rows are ``[U; S; V]``; train it with ``geoopt.optim.RiemannianAdam`` or
    ``RiemannianSGD`` (a Euclidean optimizer would move it off the manifold).

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m``.
    rank : int
        ``1 <= rank <= min(in_features, out_features)``; with ``max_rank``, the
        initial (active) rank.
    bias : bool
        Whether to learn an additive bias (a plain Euclidean ``nn.Parameter``).
    max_rank : int, optional
        A capacity ``R`` (``rank <= R <= min(m, n)``) that makes the layer
        rank-adaptive: the weight lives on
        ``FixedRankManifold(m, n, rank, max_rank=R, tol=tol)``, packed with the static
        shape ``(m + R + n, R)``, active columns first and inactive parts exactly zero.
        Stock geoopt optimizers then change the rank at every retraction (truncation by
        ``tol``); :class:`~lowrank_manifolds.optim.DLRT`,
        :class:`~lowrank_manifolds.optim.GeometricSGD` and
        :class:`~lowrank_manifolds.optim.GeometricAdam` use the same capacity with
        the same truncation unless a param group sets its own ``tol``. :attr:`active_rank`
        is the current rank.
    tol : float
        Relative truncation tolerance of the rank-adaptive manifold (only with
        ``max_rank``): keep the smallest rank whose discarded singular values have
        norm ``<= tol * ||s||``. ``0`` (default) drops only exact zeros.
    retraction : {"metric", "orthographic"}
        The manifold's retraction, which stock geoopt optimizers use (see
        :meth:`~lowrank_manifolds.FixedRankManifold.retr`). ``"metric"`` (default):
        QRs of ``m x 2r`` and ``n x 2r``, robust to any step. ``"orthographic"``: QRs
        of ``m x r`` and ``n x r``, 13-17 % faster per RiemannianAdam step on the
        benchmark MLP (``docs/benchmarks.md``), but it needs ``S + M`` invertible
        and keeps the rank fixed (no ``max_rank``).
    second_moment : {"rows", "scalar"}
        What stock geoopt ``RiemannianAdam`` keeps as its second moment on this weight (see
        :class:`~lowrank_manifolds.FixedRankManifold`): ``"rows"`` (default), steps of about
        ``lr`` per entry of the factors, at Adam-like rates; ``"scalar"``, steps of Frobenius
        norm about ``lr`` (``docs/training.md``, which optimizer for what).
    dtype, device
        Factory arguments of the parameters.

    Notes
    -----
    Forward: :math:`y = (x B) A^\top + b` with :math:`AB^\top = USV^\top`, ``S``
    folded into the thinner side (see :func:`split_factors`); cost
    :math:`O(b\,(m + n)\,r + \min(m, n)\,r^2)` for ``b`` rows of ``x``, memory
    :math:`O(b\,(m + n + r) + (m + n) r)`; the backward pass costs the same. The
    dense ``m x n`` weight is never formed. Any leading batch axes of ``x`` are
    kept; ``x`` may also be a single vector.

    Initialisation (:meth:`reset_parameters`): Haar ``U``, ``V`` and
    :math:`S = \sqrt{m/(3r)}\, I`, which reproduces the expected output variance and
    the expected Frobenius norm of ``nn.Linear``'s default initialisation; the
    bias as ``nn.Linear``'s.

    Examples
    --------
    >>> layer = LowRankLinear(512, 256, rank=16)
    >>> opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-3)
    >>> small = LowRankLinear.from_dense(nn.Linear(512, 256), svd_tol=0.5)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        max_rank: Optional[int] = None, tol: float = 0.0, retraction: str = "metric",
        second_moment: str = "rows",
        dtype: Optional[torch.dtype] = None, device=None,
    ):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self._init_weight(out_features, in_features, rank, max_rank=max_rank, tol=tol,
                          retraction=retraction, second_moment=second_moment, bias=bias, dtype=dtype,
                          device=device, what="LowRankLinear")

    def reset_parameters(self) -> None:
        """Draw a fresh weight and bias (see the class notes); cost ``O((m + n) r^2)``."""
        self._reset_factors(self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        a, b = split_factors(*self.weight_factors())
        y = (x @ b) @ mT(a)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._weight_repr()}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: Optional[int] = None,
        *,
        svd_tol: Optional[float] = None, max_rank: Optional[int] = None, tol: Optional[float] = None,
        rank_tol: Optional[float] = None, second_moment: str = "rows",
    ) -> "LowRankLinear":
        r"""A :class:`LowRankLinear` from the truncated SVD of a dense ``nn.Linear``.

        Parameters
        ----------
        linear : nn.Linear
            The layer to compress (not modified). Dtype and device are kept.
        rank : int, optional
            A fixed rank. With ``tol`` as well, an upper bound on the chosen rank.
        svd_tol : float, optional
            Initial SVD cut, ``0 <= svd_tol < 1``: the smallest rank with
            :math:`\|W - W_r\|_F \le \mathrm{svd\_tol}\,\|W\|_F` (:func:`~lowrank_manifolds.integrators.truncation_rank`),
            at most ``rank``.
        max_rank : int, optional
            Build a rank-adaptive layer of capacity ``max_rank``
            (``rank <= max_rank <= min(m, n)``); the initial rank is capped at it.
        tol : float, optional
            The truncation tolerance of the rank-adaptive layer (only with ``max_rank``;
            default 0), the ``tol`` of :class:`LowRankLinear`. Without ``svd_tol`` it also
            cuts the initial SVD: the weight's own truncation policy applied to ``W``.
        rank_tol : float, optional
            Deprecated name of ``tol`` (the old ``tol`` is then ``svd_tol``).
        second_moment : {"rows", "scalar"}, optional
            As the constructor's.

        Notes
        -----
        By Eckart-Young the result is the best rank-``r`` approximation of ``W``;
        with ``rank = min(m, n)`` it reproduces the layer to rounding. Cost
        :math:`O(mn \min(m, n))` (one SVD); the bias is copied.
        Raises ``ValueError`` if ``W`` has rank below the requested rank.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls._from_matrix(linear, linear.weight, (linear.in_features, linear.out_features), {}, rank=rank,
                                svd_tol=svd_tol, max_rank=max_rank, tol=tol, rank_tol=rank_tol,
                                second_moment=second_moment)

    def to_dense_linear(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`USV^\top` (cost :math:`O(mnr)`),
        detached from this layer."""
        w = self.weight
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=w.dtype, device=w.device)
        return self._export(plain, self.dense_weight())

    def to_factored(self) -> nn.Sequential:
        r"""Two thin plain layers computing the same map:
        ``nn.Sequential(nn.Linear(n, r, bias=False), nn.Linear(r, m, bias=bias))``
        with weights :math:`B^\top` and :math:`A`, :math:`AB^\top = USV^\top` (``S``
        folded into the thinner side, as in :meth:`forward`). ``r (m + n)`` weights, ``r``
        the :attr:`active_rank` (a layer with a capacity is trimmed)."""
        w = self.weight
        factors = self._active_factors()  # trimmed to the active rank (one host sync)
        r = factors[0].shape[-1]
        first = nn.Linear(self.in_features, r, bias=False, dtype=w.dtype, device=w.device)
        second = nn.Linear(r, self.out_features, bias=self.bias is not None, dtype=w.dtype, device=w.device)
        a, b = split_factors(*factors)
        return self._two_layers(first, second, mT(b), a)


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(value)


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class LowRankConv2d(_LowRankWeight):
    r"""A 2-d convolution whose matricised kernel has fixed rank ``r``.

    The kernel :math:`K \in \mathbb{R}^{c_o \times c_i \times k_h \times k_w}` is
    matricised as :math:`W = K.\mathrm{reshape}(c_o, c_i k_h k_w) = U S V^\top`
    (``m = out_channels``, ``n = in_channels * kh * kw``), held as
    ``self.weight``, a :class:`geoopt.ManifoldParameter` on
    ``FixedRankManifold(m, n, rank)``. Same arguments and output shapes as
    ``nn.Conv2d`` (``groups=1`` only).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    rank : int
        ``1 <= rank <= min(out_channels, in_channels * kh * kw)``.
    stride, padding, dilation
        As for ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``).
    groups : int
        Only ``1`` is supported (a grouped kernel is block diagonal, not low rank
        as one matrix); other values raise ``ValueError``.
    bias : bool
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
    max_rank, tol, retraction, second_moment
        Capacity and truncation tolerance of a rank-adaptive layer, the manifold's
        retraction and RiemannianAdam's second moment, as in :class:`LowRankLinear`.
    dtype, device

    Notes
    -----
    Forward: two convolutions, never the dense kernel. With :math:`AB^\top = USV^\top`
    (``S`` folded into whichever of ``U`` (m x r) and ``V`` (n x r) has fewer rows,
    cost :math:`O(\min(m, n) r^2)` per call, independent of the batch):

    1. a ``kh x kw`` convolution with the ``r`` filters
       :math:`B^\top.\mathrm{reshape}(r, c_i, k_h, k_w)` and the layer's stride,
       padding and dilation: cost :math:`O(N H' W' \, c_i k_h k_w \, r)`;
    2. a ``1 x 1`` convolution with :math:`A` (``c_o x r``) plus the bias:
       cost :math:`O(N H' W' \, r\, c_o)`.

    Total :math:`O(N H' W' (c_i k_h k_w + c_o) r)` against
    :math:`O(N H' W' c_i k_h k_w c_o)` for the dense convolution (``H' x W'`` the
    output size). Applying ``S`` as a third ``r x r`` step would instead cost
    :math:`O(N H' W' r^2)`, which grows with the batch; folding it is never worse
    once :math:`N H' W' \ge \min(m, n)`. Initialisation as :class:`LowRankLinear`
    with fan-in :math:`c_i k_h k_w` (matching ``nn.Conv2d``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        max_rank: Optional[int] = None, tol: float = 0.0, retraction: str = "metric",
        second_moment: str = "rows",
        dtype: Optional[torch.dtype] = None, device=None,
    ):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got {self.kernel_size}")
        self.stride = _pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be positive, got {self.stride}")
        self.dilation = _pair(dilation, "dilation")
        if min(self.dilation) < 1:
            raise ValueError(f"dilation must be positive, got {self.dilation}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be non-negative, got {self.padding}")
        if groups != 1:
            raise ValueError(
                f"LowRankConv2d supports only groups=1, got groups={groups!r} (a grouped "
                "kernel is block diagonal; convert its groups separately or leave it dense)"
            )
        self.groups = 1
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        n = in_channels * kh * kw
        self._init_weight(out_channels, n, rank, max_rank=max_rank, tol=tol,
                          retraction=retraction, second_moment=second_moment, bias=bias, dtype=dtype,
                          device=device, what="LowRankConv2d")

    def reset_parameters(self) -> None:
        """Draw a fresh weight and bias (see :class:`LowRankLinear`), fan-in ``in*kh*kw``."""
        kh, kw = self.kernel_size
        self._reset_factors(self.in_channels * kh * kw)

    def input_columns(self, x: Tensor) -> Tensor:
        r"""``unfold(x)`` of an input, as ``(c_i k_h k_w) x (N L)`` (``L`` output positions):
        the columns whose products with the matricised kernel are the convolution, so that
        the kernel's gradient is :math:`dY B^\top` with ``dY`` as ``out x (N L)`` (what
        :class:`~lowrank_manifolds.optim.GradientRecorder` records). Padding as in
        :meth:`forward` (an explicit ``F.pad`` for non-zero padding modes and for
        ``"same"``, which may be asymmetric)."""
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            padding = 0
        elif isinstance(self.padding, str):
            x = F.pad(x, self._explicit_padding())
            padding = 0
        else:
            padding = self.padding
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=padding, stride=self.stride)
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (N, n, L) -> (n, N L)

    def _explicit_padding(self) -> Tuple[int, int, int, int]:
        """``F.pad`` amounts (left, right, top, bottom) for a non-zero padding mode."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            out = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def _filters(self, factors=None) -> Tuple[Tensor, Tensor]:
        """The ``(R, c_i, kh, kw)`` filters and the ``(c_o, R, 1, 1)`` mixing kernel
        (``R`` the capacity, or the width of the given ``factors``)."""
        a, b = split_factors(*(self.weight_factors() if factors is None else factors))
        kh, kw = self.kernel_size
        return mT(b).reshape(b.shape[-1], self.in_channels, kh, kw), a[..., None, None]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"LowRankConv2d expects inputs of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        filters, mix = self._filters()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            z = F.conv2d(x, filters, None, self.stride, 0, self.dilation)
        else:
            z = F.conv2d(x, filters, None, self.stride, self.padding, self.dilation)
        return F.conv2d(z, mix, self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"{self._weight_repr()}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"

    def _conv_kwargs(self) -> dict:
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode
        )

    def dense_kernel(self) -> Tensor:
        """The dense ``(c_o, c_i, kh, kw)`` kernel (cost ``O(mnr)``; export/inspection only)."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: Optional[int] = None,
        *,
        svd_tol: Optional[float] = None, max_rank: Optional[int] = None, tol: Optional[float] = None,
        rank_tol: Optional[float] = None, second_moment: str = "rows",
    ) -> "LowRankConv2d":
        r"""A :class:`LowRankConv2d` from the truncated SVD of an ``nn.Conv2d``'s
        matricised kernel (``out x in*kh*kw``); arguments as
        :meth:`LowRankLinear.from_dense`. Stride, padding, dilation, padding mode,
        bias, dtype and device are copied; ``groups != 1`` raises ``ValueError``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be converted, got groups={conv.groups}")
        kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
        w = conv.weight
        return cls._from_matrix(conv, w.reshape(w.shape[0], -1), (conv.in_channels, conv.out_channels, conv.kernel_size),
                                kwargs, rank=rank, svd_tol=svd_tol, max_rank=max_rank, tol=tol, rank_tol=rank_tol,
                                second_moment=second_moment)

    def to_dense_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the dense kernel (cost ``O(mnr)``), detached."""
        w = self.weight
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
            dtype=w.dtype, device=w.device, **self._conv_kwargs(),
        )
        return self._export(conv, self.dense_kernel())

    def to_factored(self) -> nn.Sequential:
        """``nn.Sequential(nn.Conv2d(in, r, k, ...), nn.Conv2d(r, out, 1, bias=bias))``:
        the two convolutions of :meth:`forward` as plain layers, ``r`` the
        :attr:`active_rank` (a layer with a capacity is trimmed)."""
        w = self.weight
        factors = self._active_factors()  # one host sync with a capacity
        r = factors[0].shape[-1]
        first = nn.Conv2d(
            self.in_channels, r, self.kernel_size, bias=False, dtype=w.dtype, device=w.device,
            **self._conv_kwargs(),
        )
        second = nn.Conv2d(
            r, self.out_channels, 1, bias=self.bias is not None, dtype=w.dtype, device=w.device
        )
        return self._two_layers(first, second, *self._filters(factors))
