r"""Low-rank neural-network layers whose weights live on the fixed-rank manifold.

Every layer here holds its weight matrix :math:`W = U S V^\top` (``m x n``,
rank ``r``) as one :class:`geoopt.ManifoldParameter` on a
:class:`~lowrank_manifolds.FixedRankManifold`, packed as rows ``[U; S; V]``
(shape ``(m + r + n, r)``). Autograd differentiates the packed factors, and
geoopt's stock Riemannian optimizers (``RiemannianSGD``, ``RiemannianAdam``)
turn that gradient into the Riemannian gradient :math:`P_X(\partial L/\partial W)`
and retract, so training keeps the rank fixed and the bases orthonormal.
No layer ever forms the dense ``m x n`` weight in its forward or backward pass.

Layers
------
:class:`LowRankLinear`
    :math:`y = x W^\top + b` with :math:`W = U S V^\top`, cost :math:`O(b\,(m + n)\,r)`.
:class:`LowRankConv2d`
    A 2-d convolution whose kernel, matricised as ``out x (in * kh * kw)``, has
    rank ``r``: one convolution with ``r`` filters, then a ``1 x 1`` convolution.
:class:`LowRankAdapterLinear`
    Fine-tuning (GeoLoRA style): a frozen dense ``nn.Linear`` plus a trainable
    rank-``r`` correction on the manifold, :math:`y = x (W_0 + USV^\top)^\top + b_0`.

Model surgery
-------------
:func:`convert_to_low_rank` replaces the ``nn.Linear`` / ``nn.Conv2d`` layers of a
model by truncated SVDs; :func:`add_adapters` wraps ``nn.Linear`` layers in
adapters; :func:`export_dense` turns every layer of this module back into plain
PyTorch layers (dense, or two thin layers), so that a trained model deploys
without this library. The linear layer types they know are those of :mod:`.registry`
(``nn.Linear``, ``transformers``' ``Conv1D``, and :func:`register_linear` for others); with
``report=True`` they return a :class:`SurgeryReport`. :func:`save_lowrank` /
:func:`load_lowrank` (:mod:`.serialization`) write the low-rank layers and adapters of a model
to ``safetensors`` and rebuild them in a fresh base model.

Throughout, ``S`` is folded into the factor with fewer rows before it is applied
(:func:`split_factors`): the weight-side cost is :math:`O(\min(m, n)\,r^2)` per call,
independent of the batch, and the batch-dependent cost is exactly that of two thin
products, :math:`b\,(m + n)\,r`.

Capacity (rank adaptivity)
--------------------------
Every layer takes ``max_rank=R`` (and a truncation tolerance ``tol``): its weight then
lives on the rank-adaptive ``FixedRankManifold(m, n, rank, max_rank=R, tol=tol)``, with
the static packed shape ``(m + R + n, R)``; the active columns come first, the inactive
columns of ``U``, ``V`` and rows/columns of ``S`` are exactly zero and contribute nothing
to the products above, so the forward pass needs no masking (it costs that of rank
``R``). ``tol`` is the weight's one truncation policy: stock geoopt optimizers apply it at
every retraction, and the optimizers of :mod:`lowrank_manifolds.optim` at every step. ``active_rank``
reads the current rank; exports (``to_factored``) trim to it.
"""
from ._common import is_lowrank_layer
from .adapter import LowRankAdapterLinear
from .convert import add_adapters, convert_to_low_rank, export_dense
from .layers import LowRankConv2d, LowRankLinear
from .registry import register_linear
from .report import SurgeryReport
from .serialization import load_lowrank, save_lowrank

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankAdapterLinear",
    "is_lowrank_layer",
    "convert_to_low_rank",
    "add_adapters",
    "export_dense",
    "register_linear",
    "SurgeryReport",
    "save_lowrank",
    "load_lowrank",
]
