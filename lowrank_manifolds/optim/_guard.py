"""A one-time warning when a Euclidean optimizer steps fixed-rank points (private).

``torch.optim.AdamW(model.parameters())`` on a converted model (the habit from LoRA) runs:
it adds its step to the packed ``[U; S; V]`` as to any tensor, so ``U`` and ``V`` stop being
orthonormal and the weight leaves the manifold, silently. A global optimizer pre-step hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) looks once at each optimizer's
first step and warns if it holds such points and is not one that retracts them (geoopt's, this
package's). Later steps cost one set lookup.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from geoopt.optim.mixin import OptimMixin
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._args import user_stacklevel
from ..manifold import FixedRankManifold
from ._base import LowRankOptimizer
from .cg import RiemannianCG

_CHECKED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _warn_if_euclidean(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if optimizer in _CHECKED:
        return None
    _CHECKED.add(optimizer)
    if isinstance(optimizer, (OptimMixin, LowRankOptimizer, RiemannianCG)):
        return None
    if any(isinstance(getattr(p, "manifold", None), FixedRankManifold)
           for group in optimizer.param_groups for p in group["params"]):
        warnings.warn(
            f"{type(optimizer).__name__} holds fixed-rank points (ManifoldParameters on FixedRankManifold) "
            "and steps them as plain tensors: U and V stop being orthonormal and the weights leave the "
            "manifold. Use geoopt.optim.RiemannianAdam / RiemannianSGD or lowrank_manifolds.optim "
            "(GeometricAdam, DLRT) for them; to train plain factors with a torch optimizer, "
            "export_dense(model, factored=True) first. (Warned once per optimizer.)",
            UserWarning, stacklevel=user_stacklevel())
    return None


register_optimizer_step_pre_hook(_warn_if_euclidean)
