r"""Riemannian nonlinear conjugate gradients with a backtracking line search.

On the product of the parameters' manifolds (geoopt's: a ``ManifoldParameter`` keeps its
manifold, a plain tensor is Euclidean), one iteration from :math:`x_k` with the Riemannian
gradient :math:`g_k`:

.. math::
    \beta_k &= \max\Big(0, \frac{\langle g_k, g_k - \mathcal{T} g_{k-1}\rangle}
               {\langle g_{k-1}, g_{k-1}\rangle}\Big) \ \text{(Polak-Ribiere+)},\qquad
    \frac{\langle g_k, g_k - \mathcal{T} g_{k-1}\rangle}
         {\langle \mathcal{T} d_{k-1}, g_k - \mathcal{T} g_{k-1}\rangle}\ \text{(Hestenes-Stiefel)},\\
    d_k &= -g_k + \beta_k\, \mathcal{T} d_{k-1}
           \quad (d_k = -g_k \text{ if it is not a descent direction, or at a restart}),\\
    x_{k+1} &= R_{x_k}(t_k d_k),\quad t_k = t_0\,\rho^j \text{ for the first } j \text{ with }
    f(x_{k+1}) \le f(x_k) + c_1 t_k \langle g_k, d_k\rangle \ \text{(Armijo)},

:math:`\mathcal{T}` the manifold's vector transport to :math:`x_k` and :math:`R` its retraction
(Absil, Mahony and Sepulchre 2008, Sec. 8.3; Vandereycken 2013, Alg. 1, LRGeomCG). The first
trial step :math:`t_0` is ``lr``, or what ``initial_step(directions)`` returns: for matrix
completion :meth:`lowrank_manifolds.completion.Observations.exact_step` gives the exact minimiser
along :math:`x + t\,d` (the cost is quadratic in :math:`t` there), LRGeomCG's choice, which the
backtracking then only checks.

Like ``torch.optim.LBFGS``, :meth:`RiemannianCG.step` takes a ``closure`` that clears the
gradients, computes the loss, calls ``backward`` and returns the loss; it is called once per
trial step, and at the current point only if the parameters or gradients were written since
the last accepted trial (whose loss and gradients are reused otherwise). The line search compares losses on the host (one
synchronisation per trial: the decision needs it).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import geoopt
import torch
from torch import Tensor

__all__ = ["RiemannianCG"]

_BETAS = ("PR+", "HS")
_EUCLIDEAN = geoopt.Euclidean()


class RiemannianCG(torch.optim.Optimizer):
    """Riemannian nonlinear CG (see the module docstring for the algorithm).

    Parameters
    ----------
    params : iterable
        Tensors to optimise; one parameter group.
    lr : float
        The first trial step :math:`t_0` of each line search (default 1) when ``initial_step``
        is not given.
    beta : {"PR+", "HS"}
        Polak-Ribiere+ (default) or Hestenes-Stiefel.
    initial_step : callable, optional
        ``initial_step(directions) -> float or 0-d tensor``: the first trial step for the list of
        search directions (one per parameter, tangent at the current points).
    c1 : float
        The Armijo constant, ``0 < c1 < 1`` (default 1e-4).
    backtrack : float
        The factor :math:`\\rho` a rejected trial step is multiplied by, ``0 < backtrack < 1``.
    max_backtracks : int
        Trials per step; if none is accepted the parameters stay where they were, the direction
        is reset to the negative gradient, and ``step`` returns the loss at the current point.
    restart_every : int, optional
        Restart with the negative gradient every so many iterations (default: never, beyond the
        automatic restarts).
    """

    def __init__(self, params, lr: float = 1.0, beta: str = "PR+", initial_step: Optional[Callable] = None,
                 c1: float = 1e-4, backtrack: float = 0.5, max_backtracks: int = 30,
                 restart_every: Optional[int] = None):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite positive number, got {lr!r}")
        if beta not in _BETAS:
            raise ValueError(f"beta must be one of {_BETAS}, got {beta!r}")
        if initial_step is not None and not callable(initial_step):
            raise TypeError("initial_step must be a callable (directions -> step) or None")
        for value, name in ((c1, "c1"), (backtrack, "backtrack")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        for value, name in ((max_backtracks, "max_backtracks"), (restart_every, "restart_every")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_backtracks is None:
            raise ValueError("max_backtracks must be a positive int, got None")
        super().__init__(params, dict(lr=float(lr), beta=beta, c1=float(c1), backtrack=float(backtrack),
                                      max_backtracks=max_backtracks, restart_every=restart_every))
        if len(self.param_groups) != 1:
            raise ValueError("RiemannianCG takes one parameter group (the line search is joint)")
        self.initial_step = initial_step

    @staticmethod
    def _manifold(p: Tensor):
        return getattr(p, "manifold", None) or _EUCLIDEAN

    def _inner(self, ps: List[Tensor], us: List[Tensor], vs: List[Tensor]) -> Tensor:
        return sum(self._manifold(p).inner(p, u, v).sum() for p, u, v in zip(ps, us, vs))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One CG iteration; ``closure`` as in ``torch.optim.LBFGS``. Returns the loss at the
        accepted point (or at the current point if no trial step was accepted)."""
        if closure is None:
            raise ValueError("RiemannianCG.step needs a closure that returns the loss after backward()")
        group = self.param_groups[0]
        params = [p for p in group["params"]]
        state = self.state[params[0]]
        if state.get("fresh") == _versions(params):  # the last accepted trial's loss and gradients
            loss = state["loss"]
        else:
            with torch.enable_grad():
                loss = closure()
        state.pop("fresh", None)
        f0 = float(loss.detach())
        if not math.isfinite(f0):
            raise FloatingPointError(f"RiemannianCG: the loss at the current point is {f0}")
        grads = []
        for p in params:
            if p.grad is None:
                raise ValueError("RiemannianCG: a parameter has no gradient after the closure")
            grads.append(self._manifold(p).egrad2rgrad(p, p.grad).clone())  # kept past later closures
        k = state.get("iteration", 0)
        dirs = [-g for g in grads]
        restart = "directions" not in state or (group["restart_every"] and k % group["restart_every"] == 0)
        if not restart:
            old_g = [self._manifold(p).transp(x, p, g) for p, x, g in zip(params, state["points"], state["grads"])]
            old_d = [self._manifold(p).transp(x, p, d) for p, x, d in zip(params, state["points"], state["directions"])]
            diff = [g - o for g, o in zip(grads, old_g)]
            num = self._inner(params, grads, diff)
            if group["beta"] == "PR+":
                den = self._inner(params, old_g, old_g)
                beta = torch.clamp(num / den, min=0) if float(den) > 0 else num * 0
            else:
                den = self._inner(params, old_d, diff)
                beta = num / den if float(den) != 0 else num * 0
            dirs = [-g + beta * d for g, d in zip(grads, old_d)]
        slope = self._inner(params, grads, dirs)
        if not float(slope) < 0:  # not a descent direction: restart with the gradient
            dirs = [-g for g in grads]
            slope = self._inner(params, grads, dirs)
        if float(slope) == 0:  # a critical point: nothing to do
            state.update(iteration=k + 1)
            return loss
        t = float(self.initial_step(dirs)) if self.initial_step is not None else group["lr"]
        if not (t > 0 and math.isfinite(t)):
            t = group["lr"]
        start = [p.detach().clone() for p in params]
        accepted = None
        for _ in range(group["max_backtracks"]):
            for p, x, d in zip(params, start, dirs):
                p.copy_(self._manifold(p).retr(x, t * d))
            with torch.enable_grad():
                trial = closure()
            ft = float(trial.detach())
            if math.isfinite(ft) and ft <= f0 + group["c1"] * t * float(slope):
                accepted = trial
                break
            t *= group["backtrack"]
        if accepted is None:  # no trial accepted: stay, and restart next time
            for p, x in zip(params, start):
                p.copy_(x)
            state.pop("directions", None)
            state.update(iteration=k + 1)
            return loss
        state.update(iteration=k + 1, points=start, grads=grads, directions=dirs, step_size=t,
                     loss=accepted.detach(), fresh=_versions(params))
        return accepted


def _versions(params: List[Tensor]):
    """What identifies the parameters and gradients as the closure left them: a later step
    reuses that evaluation only if nothing was written to them since (``_version`` counts
    in-place writes; a new ``.grad`` is another object)."""
    return [(p._version, id(p.grad), None if p.grad is None else p.grad._version) for p in params]
