"""Optimizers for low-rank training.

- :class:`GeometricSGD`, :class:`GeometricAdam` (``geometric``): heavy ball and Adam for
  low-rank weights with moments held in the coefficient space of the current bases;
- :class:`DLRT` (``dlrt``): dynamical low-rank training steps with abc-PSI, augmented BUG or
  parallel BUG, rank-adaptive by tolerance within the layers' capacity (``max_rank``);
  its :class:`GradientRecorder` (``recorder``) serves, for linear and convolutional
  layers, the gradient's products from one forward and one backward pass;
- :class:`LoRAPreAdam` (``lora_pre``): Adam whose moments are kept as low-rank factors;
- :class:`RiemannianSGD`, :class:`RiemannianAdam` (``riemannian``): geoopt's, with the
  low-rank weights of one shape stepped as one batch;
- :class:`RiemannianCG` (``cg``): nonlinear conjugate gradients with a backtracking line search
  and a closure, for matrix problems (with :mod:`lowrank_manifolds.completion`'s exact step).

What they share (the step loop, the finiteness checks, the truncation) is in ``_base``.
"""
from . import _guard  # noqa: F401  (warns when a torch optimizer steps fixed-rank points)
from ._base import is_lowrank_parameter
from ..integrators import INTEGRATORS  # moved to lowrank_manifolds.integrators; kept here
from .cg import RiemannianCG
from .dlrt import DLRT
from .geometric import GeometricAdam, GeometricSGD
from .lora_pre import LoRAPreAdam
from .recorder import GradientRecorder
from .riemannian import RiemannianAdam, RiemannianSGD

__all__ = [
    "DLRT",
    "GeometricAdam",
    "GeometricSGD",
    "GradientRecorder",
    "INTEGRATORS",
    "LoRAPreAdam",
    "RiemannianAdam",
    "RiemannianCG",
    "RiemannianSGD",
    "is_lowrank_parameter",
]
