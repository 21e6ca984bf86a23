r"""geoopt's Riemannian SGD and Adam with low-rank weights stepped one batch per shape group.

:class:`RiemannianSGD` and :class:`RiemannianAdam` are subclasses of
``geoopt.optim.RiemannianSGD`` / ``RiemannianAdam``: the same options, param groups, state
dict layout, closures and ``stabilize``, and the same algorithm. What differs is how the
weights on a :class:`~lowrank_manifolds.FixedRankManifold` are stepped: geoopt loops over
parameters and calls the manifold once per weight (about 150 aten ops, each a kernel launch
on a GPU, per weight and step); here the weights of one shape group (shape, dtype, device,
manifold configuration, state layout and step count) are stacked and the manifold's
``egrad2rgrad``, ``component_inner`` and ``retr_transp`` run once on the batch, then every
weight and state is written back with one multi-tensor copy. Plain tensors (geoopt's default
Euclidean manifold: biases, norms, dense layers) are stepped with multi-tensor ops, geoopt's
arithmetic in its order, a list per device, dtype and step count. Parameters of any other
manifold, and every parameter with ``foreach=False``, go through geoopt's own code.

The arithmetic is geoopt's, in its order, including its conventions: Adam's second moment
is ``component_inner(x, rgrad)`` accumulated without transport, SGD's first momentum buffer
is the Euclidean gradient before ``egrad2rgrad`` (``momentum * G + (1 - dampening) rgrad``
after the first step). Two deliberate differences on the parameters stepped here: ``p.grad``
is left as it is (geoopt adds the weight decay into it), and a step is taken whole or not at all
(every batched weight is computed before any is written, so a gradient that
``egrad2rgrad`` refuses leaves them all untouched).
"""
from __future__ import annotations

import inspect
from typing import Optional

import geoopt
import torch

from ._base import is_lowrank_parameter, write_staged

__all__ = ["RiemannianAdam", "RiemannianSGD"]


def _stacked(tensors: list) -> torch.Tensor:
    """The tensors of a shape group on a new leading axis; a single one as a copy of itself
    (the step writes nothing before every group is computed)."""
    return tensors[0].clone() if len(tensors) == 1 else torch.stack(tensors)


class _ShapeGroups:
    """The step of a geoopt optimizer with its fixed-rank weights batched by shape group."""

    @torch.no_grad()
    def _batches(self, group: dict) -> list:
        """The weights of ``group`` this class steps, as lists stepped together (metadata
        only: no host read)."""
        if group.get("foreach") is False:
            return []
        batches: dict = {}
        for p in group["params"]:
            if p.grad is None or not is_lowrank_parameter(p):
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            mf, state = p.manifold, self.state[p]
            key = (tuple(p.shape), p.dtype, p.device, type(mf), mf.extra_repr(), mf.check_finite,
                   tuple(sorted((k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v)
                                for k, v in state.items())))
            batches.setdefault(key, []).append(p)
        return list(batches.values())

    @staticmethod
    def _plain(group: dict) -> list:
        """The plain tensors of ``group`` with a dense gradient (geoopt's default Euclidean
        manifold), stepped with multi-tensor ops unless ``foreach=False``."""
        if group.get("foreach") is False:
            return []
        return [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse
                and not isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor))]

    @staticmethod
    def _lists(params: list, key) -> list:
        """``params`` in lists of one device, dtype and ``key(p)`` (multi-tensor ops' lists)."""
        lists: dict = {}
        for p in params:
            lists.setdefault((p.device, p.dtype, key(p)), []).append(p)
        return list(lists.values())

    def step(self, closure=None):
        """One step for every parameter with a gradient; ``closure`` (optional) re-evaluates
        the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [self._batches(group) for group in self.param_groups]
        with torch.no_grad():
            staged = [(members, *self._stage(members, group))
                      for group, lists in zip(self.param_groups, batches) for members in lists]
        plain = [self._plain(group) for group in self.param_groups]
        batched = [{id(p) for members in lists for p in members} | {id(p) for p in ps}
                   for lists, ps in zip(batches, plain)]
        saved = [(group["params"], group["stabilize"]) for group in self.param_groups]
        try:  # geoopt's own step for the rest, our stabilize below
            for group, ours in zip(self.param_groups, batched):
                group["params"] = [p for p in group["params"] if id(p) not in ours]
                group["stabilize"] = None
            # geoopt's step itself: torch wraps each optimizer class's step with the step
            # hooks, which this class's step has already run
            inspect.unwrap(super().step.__func__)(self)
        finally:
            for group, (params, stabilize) in zip(self.param_groups, saved):
                group["params"], group["stabilize"] = params, stabilize
        with torch.no_grad():
            for group, ps in zip(self.param_groups, plain):
                if ps:
                    self._euclidean_step(ps, group)
            for members, point, states in staged:
                write_staged(members, [self.state[p] for p in members], point, states)
            for group in self.param_groups:
                if group["stabilize"] is not None and self._stabilize_due(group):
                    self.stabilize_group(group)
        return loss


class RiemannianSGD(_ShapeGroups, geoopt.optim.RiemannianSGD):
    r"""``geoopt.optim.RiemannianSGD`` with its fixed-rank weights stepped one batch per shape
    group (module docstring); options as geoopt's, plus ``foreach``.

    For each weight :math:`x` with Euclidean gradient :math:`G` (geoopt's algorithm)::

        g = egrad2rgrad(x, G + weight_decay * x)
        b = G (first step); b = momentum * b + (1 - dampening) * g
        d = g + momentum * b if nesterov else b          (d = g without momentum)
        x, b = retr_transp(x, -lr * d, b)                (x = retr(x, -lr * g) without momentum)

    Parameters
    ----------
    params, lr, momentum, dampening, weight_decay, nesterov, stabilize
        As ``geoopt.optim.RiemannianSGD``.
    foreach : bool, optional
        ``None`` (default) or ``True``: fixed-rank weights batched by shape group;
        ``False``: every parameter through geoopt's per-parameter loop (the reference).
    """

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, stabilize: Optional[int] = None, *, foreach: Optional[bool] = None):
        super().__init__(params, lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, stabilize=stabilize)
        for group in self.param_groups:
            group.setdefault("foreach", foreach)
        self.defaults["foreach"] = foreach

    def _stage(self, members: list, group: dict):
        mf, lr, momentum = members[0].manifold, group["lr"], group["momentum"]
        x = _stacked(members)
        grad = _stacked([p.grad for p in members])
        rgrad = mf.egrad2rgrad(x, grad.add(x, alpha=group["weight_decay"]))
        if momentum <= 0:
            return mf.retr(x, -lr * rgrad), {}
        states = [self.state[p] for p in members]
        buf = _stacked([s["momentum_buffer"] for s in states]) if "momentum_buffer" in states[0] else grad
        buf = buf.mul(momentum).add_(rgrad, alpha=1 - group["dampening"])
        direction = rgrad.add(buf, alpha=momentum) if group["nesterov"] else buf
        point, buf = mf.retr_transp(x, -lr * direction, buf)
        return point, {"momentum_buffer": buf}

    def _euclidean_step(self, params: list, group: dict) -> None:
        """geoopt's step of plain tensors (egrad2rgrad and transport the identity, the
        retraction ``x + u``), as multi-tensor ops."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        for ps in self._lists(params, lambda p: None):
            states = [self.state[p] for p in ps]
            if momentum > 0:
                for p, state in zip(ps, states):
                    if not state:  # geoopt: the gradient before the decay
                        state["momentum_buffer"] = p.grad.clone()
            grads = [p.grad for p in ps]
            if wd:
                grads = torch._foreach_add(grads, ps, alpha=wd)
            direction = grads
            if momentum > 0:
                bufs = [state["momentum_buffer"] for state in states]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                direction = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_add_(ps, torch._foreach_mul(direction, -lr))

    def _stabilize_due(self, group: dict) -> bool:
        return group["step"] % group["stabilize"] == 0  # geoopt counts steps per group


class RiemannianAdam(_ShapeGroups, geoopt.optim.RiemannianAdam):
    r"""``geoopt.optim.RiemannianAdam`` with its fixed-rank weights stepped one batch per shape
    group (module docstring); options as geoopt's (torch's Adam), plus ``foreach``.

    For each weight :math:`x` with Euclidean gradient :math:`G` (geoopt's algorithm)::

        g = egrad2rgrad(x, G + weight_decay * x);  t += 1
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) component_inner(x, g)
        v_max = max(v_max, v) (amsgrad);  d = (m / (1 - b1^t)) / (sqrt(v_max or v / (1 - b2^t)) + eps)
        x, m = retr_transp(x, -lr * d, m)                 (v is not transported)

    Parameters
    ----------
    params, lr, betas, eps, weight_decay, amsgrad, stabilize
        As ``geoopt.optim.RiemannianAdam``.
    foreach : bool, optional
        ``None`` (default) or ``True``: fixed-rank weights batched by shape group;
        ``False``: every parameter through geoopt's per-parameter loop (the reference).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 amsgrad: bool = False, stabilize: Optional[int] = None, *, foreach: Optional[bool] = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, stabilize=stabilize)  # torch's Adam keeps foreach per group

    def _stage(self, members: list, group: dict):
        mf, (b1, b2), lr = members[0].manifold, group["betas"], group["lr"]
        states = [self.state[p] for p in members]
        x = _stacked(members)
        rgrad = mf.egrad2rgrad(x, _stacked([p.grad for p in members]).add(x, alpha=group["weight_decay"]))
        if states[0]:
            step = states[0]["step"] + 1
            m = _stacked([s["exp_avg"] for s in states])
            v = _stacked([s["exp_avg_sq"] for s in states])
        else:
            step, m, v = 1, torch.zeros_like(x), torch.zeros_like(x)
        m.mul_(b1).add_(rgrad, alpha=1 - b1)
        v.mul_(b2).add_(mf.component_inner(x, rgrad), alpha=1 - b2)
        out = {"step": step, "exp_avg_sq": v}
        if group["amsgrad"]:
            vmax = _stacked([s["max_exp_avg_sq"] for s in states]) if states[0] else torch.zeros_like(x)
            out["max_exp_avg_sq"] = vmax = torch.maximum(vmax, v)
        denom = (vmax if group["amsgrad"] else v).div(1 - b2**step).sqrt_()
        direction = m.div(1 - b1**step) / denom.add_(group["eps"])
        point, out["exp_avg"] = mf.retr_transp(x, -lr * direction, m)
        return point, out

    def _euclidean_step(self, params: list, group: dict) -> None:
        """geoopt's Adam step of plain tensors (``component_inner`` the square, transport the
        identity, the retraction ``x + u``), as multi-tensor ops, a list per step count."""
        (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
        for ps in self._lists(params, lambda p: self.state[p]["step"]):
            states = [self.state[p] for p in ps]
            step = states[0]["step"] + 1
            for state in states:
                state["step"] = step
            grads = [p.grad for p in ps]
            if wd:
                grads = torch._foreach_add(grads, ps, alpha=wd)
            m, v = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_add_(v, torch._foreach_pow(grads, 2), alpha=1 - b2)
            if group["amsgrad"]:
                vmax = [state["max_exp_avg_sq"] for state in states]
                torch._foreach_maximum_(vmax, v)
                v = vmax
            denom = torch._foreach_div(v, 1 - b2**step)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            direction = torch._foreach_div(torch._foreach_div(m, 1 - b1**step), denom)
            torch._foreach_add_(ps, torch._foreach_mul(direction, -lr))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, with the step counters kept as geoopt's Python ints: torch's Adam turns
        loaded counters into float32 tensors, with which geoopt's bias corrections
        ``1 - beta ** step`` lose precision (a resumed geoopt run drifts from an uninterrupted
        one by ~1e-6 in float64 weights; this one follows it to rounding)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = int(state["step"])  # a CPU scalar: no device sync

    def _stabilize_due(self, group: dict) -> bool:  # geoopt: when any weight's counter is due
        return any(self.state[p].get("step", 0) % group["stabilize"] == 0 and p.grad is not None
                   for p in group["params"])
