r"""Hugging Face ``transformers`` integration: the active ranks in the ``Trainer``'s logs.

This module imports ``transformers`` (``pip install "lowrank_manifolds[hf]"``); the package
itself never does, so ``import lowrank_manifolds`` works without it. Everything else the
``Trainer`` and ``accelerate`` need is plain ``torch.optim`` behaviour of the optimizers::

    from lowrank_manifolds.nn import add_adapters
    from lowrank_manifolds.optim import DLRT
    from lowrank_manifolds.hf import ActiveRankCallback

    add_adapters(model, rank=4, max_rank=8, tol=0.1, include=["*q_proj", "*v_proj"])
    opt = DLRT([p for p in model.parameters() if p.requires_grad], lr=0.5,
               integrator="augmented-bug", model=model)
    trainer = Trainer(model, args, train_dataset=..., optimizers=(opt, None),
                      callbacks=[ActiveRankCallback()])

What holds inside the ``Trainer`` (tested in ``tests/test_hf.py``): its gradient clipping
(``max_grad_norm``, on by default) only rescales ``p.grad``, which DLRT with ``model=`` applies
to the recorded pair as well (the one gradient channel, ``docs/training.md``); gradient
accumulation concatenates the recorded pairs as ``.grad`` adds up; the lr scheduler the
``Trainer`` builds (``LambdaLR``) sets the groups' ``lr``, DLRT's step size :math:`h`; a
checkpoint saves the packed factors in the model's ``safetensors`` file and the optimizer's
``state_dict``, and ``resume_from_checkpoint`` continues the same run.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn
from transformers import TrainerCallback

from .nn._common import is_lowrank_layer

__all__ = ["active_ranks", "rank_summary", "ActiveRankCallback"]



def active_ranks(model: nn.Module) -> Dict[str, int]:
    """``{qualified name: active rank}`` of the low-rank layers and adapters of ``model``
    (one host sync per rank-adaptive layer on an accelerator)."""
    return {name: mod.active_rank for name, mod in model.named_modules() if is_lowrank_layer(mod)}


def rank_summary(model: nn.Module, prefix: str = "lowrank/") -> Dict[str, float]:
    r"""Scalars for a log: mean, min and max active rank, and the number of factor entries the
    active ranks use, :math:`\sum_\ell r_\ell (m_\ell + n_\ell + r_\ell)` (the packed width is the
    capacity; these are the numbers an export with :meth:`to_factored` keeps, plus ``S``)."""
    ranks: List[Tuple[int, int, int]] = []
    for _, mod in model.named_modules():
        if is_lowrank_layer(mod):
            mf = mod.manifold
            ranks.append((mod.active_rank, mf.m, mf.n))
    if not ranks:
        return {}
    rs = [r for r, _, _ in ranks]
    return {
        prefix + "rank_mean": sum(rs) / len(rs),
        prefix + "rank_min": float(min(rs)),
        prefix + "rank_max": float(max(rs)),
        prefix + "factor_entries": float(sum(r * (m + n + r) for r, m, n in ranks)),
    }


class ActiveRankCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that adds the active ranks to every log.

    At each ``on_log`` (every ``logging_steps``) it adds :func:`rank_summary` (and, with
    ``per_layer=True``, ``lowrank/rank/<name>`` for every layer) to the logged dict, which the
    progress bar, the printer and the reporting integrations then show, and to the last entry
    of ``state.log_history`` (saved with each checkpoint). ``history`` keeps
    ``(global step, {name: rank})`` of every log, for plots."""

    def __init__(self, per_layer: bool = False, prefix: str = "lowrank/"):
        self.per_layer = bool(per_layer)
        self.prefix = prefix
        self.history: List[Tuple[int, Dict[str, int]]] = []

    def on_log(self, args, state, control, model: Optional[nn.Module] = None, logs=None, **kwargs):
        if model is None or logs is None:
            return
        while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
            model = model.module
        ranks = active_ranks(model)
        if not ranks:
            return
        extra = rank_summary(model, self.prefix)
        if self.per_layer:
            extra.update({f"{self.prefix}rank/{k}": float(v) for k, v in ranks.items()})
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self.history.append((state.global_step, ranks))
