r"""LoRA-Pre: Adam whose moment estimates are stored as low-rank factors.

Reference: Wang et al., "Taming Momentum: Rethinking Optimizer States Through
Low-Rank Approximation" (2026, arXiv:2602.24283). The derivations, the
numerics and the measurements are in ``docs/lora_pre.md``.

Factored moments
----------------
Adam's EMA :math:`m_t = \beta m_{t-1} + (1 - \beta) g_t` is one damped step
of online least squares. LoRA-Pre keeps the ``p x q`` moment as
:math:`m = B A` (``B``: ``p x r``, ``A``: ``r x q``) and takes one damped
Newton step on :math:`\tfrac12\|BA - g\|_F^2` per factor, *sequentially*:

.. math::

    B &\leftarrow (1 - c)\, B + c\, g A^\top (A A^\top)^{-1}, \\
    A &\leftarrow (1 - c)\, A + c\, (B^\top B)^{-1} B^\top g .

For square invertible factors (``r = p = q``) this gives
:math:`B'A' = (1-c)^2 m + (1-(1-c)^2) g`, so :math:`(1 - c)^2 = \beta` is
*exactly* the EMA. For ``r = min(p, q) < max(p, q)`` it is not: with
``p > q``, :math:`B'A' = P_{B'}(\beta m + (1-\beta) g)`, the part of the
target outside the column space of the new ``B`` is lost.

The second pair of factors tracks, with ``second_moment="abs"`` (default, the
paper's choice: a low-rank approximation of :math:`v \ge 0` can be negative),
:math:`u_t = \beta_u u_{t-1} + (1 - \beta_u) |g_t|`, :math:`\beta_u =
\sqrt{\beta_2}` (per half step :math:`1 - c = \beta_2^{1/4}`); with
``second_moment="square"`` Adam's :math:`v_t` (per half step
:math:`1 - c = \sqrt{\beta_2}`; negative reconstructed entries are clamped to
zero; unstable at low rank, meant for verification at full rank).

The step
--------
With ``current_gradient=True`` (the default: the paper's Algorithm 1, in which the
history is read before step ``t``; ``docs/lora_pre.md``) only the history is low rank;
the factors before this step's Newton updates give

.. math::

    m_t = \beta_1 (BA)_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2\, \kappa_t\, u_{t-1}^{\circ 2} + (1 - \beta_2)\, g_t^{\circ 2},
    \qquad d_t = \sqrt{v_t / (1 - \beta_2^t)}

(``"square"``: :math:`\beta_2 \max(v_{t-1}, 0)` in place of
:math:`\beta_2 \kappa_t u_{t-1}^{\circ 2}`), and the factors are then updated on
:math:`g_t` as above. :math:`\kappa_t = (1 - \beta_2^{t-1}) / (1 - \beta_u^{t-1})^2`
(``history_bias_correction=True``, default; :math:`\kappa_1 = 0`) gives the squared
``|g|`` EMA, whose bias is :math:`(1 - \beta_u^{t-1})^2`, Adam's bias
:math:`1 - \beta_2^{t-1}`, so that the division by :math:`1 - \beta_2^t` corrects both terms
alike; the paper's formula has :math:`\kappa_t = 1`, a history too small by a factor 0.07
at step 300 for :math:`\beta_2 = 0.999`, hence steps too large early in a run (measured:
``docs/lora_pre.md``). :math:`g_t` enters the step in full at every rank. At full
square rank :math:`m_t` is Adam's EMA (to rounding), the first step is
AdamW's, and with ``"square"`` every step is AdamW's (to rounding).

With ``current_gradient=False`` (the reconstruction form) the step uses the
factors after they absorbed :math:`g_t`: :math:`m_t = (BA)_t`,
:math:`d_t = |u_t| / (1 - \beta_u^t)` (``"abs"``) or
:math:`\sqrt{\max(v_t, 0) / (1 - \beta_2^t)}` (``"square"``), so the part of
:math:`g_t` outside the factors' span never reaches the parameters. At full
square rank ``"square"`` is AdamW and ``"abs"`` is AdamW with the RMS
replaced by the bias-corrected EMA of ``|g|`` (equal to AdamW's first step).

Either way the update is decoupled-weight-decay Adam, each entry bounded:

.. math:: \theta \leftarrow \theta (1 - \eta \lambda) - \eta\,
          \operatorname{clip}_{[-K_t, K_t]}\Big(\frac{m_t / (1 - \beta_1^t)}{d_t + \epsilon}\Big).

With ``update_bound="adam"`` (default) :math:`K_t` is the largest per-entry ratio
that exact Adam with the same betas can produce at step ``t``
(:func:`adam_update_bound`: 1 at the first step, at most 1.17 for betas
(0.9, 0.95) and 7.3 for (0.9, 0.999)), so no entry moves further than Adam could
move it. A low-rank moment needs the bound: its reconstructed second moment can be
near zero in an entry where the first moment is not (a low-rank approximation of a
positive matrix is not positive), and without it single entries stepped up to
:math:`10^4\,\eta` on a planted MLP (a loss spike whose size flipped on one ulp of
the initial weights). Exact Adam never reaches the bound, so at full square rank
with ``second_moment="square"`` (AdamW) it changes nothing. A number fixes :math:`K`; ``None`` disables the clip.

Initialisation and numerics
---------------------------
The state starts at ``B A = 0`` with ``B = 0`` and ``A`` the top ``r`` right
singular vectors of the first target, so :math:`B_1 A_1 = (1 - \beta)[g]_r`
(the best rank-``r`` approximation; one thin SVD per factored matrix and
moment, once). After every pair of Newton steps the gauge
:math:`(B, A) \mapsto (BS, S^{-1}A)` is reset by a QR of :math:`A^\top`
(:math:`A A^\top = I`, ``B A`` unchanged); without it both factors become
ill-conditioned within tens of steps. The Newton targets are least-squares
solutions computed from a QR of the factor (never its Gram matrix) with a
relative Tikhonov shift :math:`\lambda = \varepsilon_s^2 \operatorname{tr}G / r
+ \tau` (``solve_eps`` :math:`= \varepsilon_s`, default the solve dtype's
machine epsilon; :math:`\tau` its smallest normal number) and one iterated
Tikhonov refinement: spectral filter
:math:`\varphi(\sigma) = 1 - (\lambda / (\sigma + \lambda))^2` on the
eigenvalues of ``G``. Solves run in float32 for half-precision parameters;
only QR, triangular solves and products are used (no host synchronisation).

Variants
--------
``factor_first_moment=False`` keeps Adam's dense first moment (``p q +
(p + q) r`` numbers per matrix; not the paper's method). ``muon=True`` keeps
only the first-moment factors and steps along
:math:`0.2\sqrt{\max(p, q)}\,\mathrm{NS}_k(m_t)`, Muon's quintic
Newton--Schulz orthogonalisation (Jordan et al. 2024) of the reconstructed
momentum, run on the ``p x r`` factor because ``A`` has orthonormal rows
(:func:`newton_schulz`); a step of the reconstructed momentum, not of the
current gradient, and without the update bound (its step is orthogonalised).

Parameters with more than two dimensions are viewed as
``shape[0] x prod(shape[1:])`` matrices. Parameters with fewer than two
dimensions, empty parameters, and matrices for which factoring would not save
memory (``(p + q) r >= p q``; this includes every ``rank >= min(p, q)``) keep
ordinary dense Adam(W) state unless ``always_factor=True``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import refuse_manifold_parameters
from ._faults import (
    Layout,
    admit_step,
    check_groups,
    checked_state_dict,
    commit,
    counter,
    floating,
    grad_limit,
    max_abs,
    pow2_scale,
    square_limit,
    stage_on_copies,
    tag_state_dict,
)

__all__ = ["LoRAPreAdam", "adam_update_bound", "matrix_shape", "factored_rank", "newton_schulz"]

_SECOND_MOMENT_MODES = ("abs", "square")


def matrix_shape(shape: Iterable[int]) -> Optional[Tuple[int, int]]:
    """Matrix view ``(shape[0], prod(shape[1:]))`` used for a parameter.

    Parameters
    ----------
    shape : iterable of int
        Shape of the parameter.

    Returns
    -------
    tuple of int or None
        ``(p, q)`` for tensors with at least two dimensions and no zero-sized
        axis, ``None`` otherwise (such parameters keep dense Adam state).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    p, q = shape[0], math.prod(shape[1:])
    if p == 0 or q == 0:
        return None
    return p, q


def factored_rank(
    shape: Iterable[int], rank: int, always_factor: bool = False
) -> Optional[int]:
    """Rank used for a parameter of the given shape, or ``None`` if dense.

    A parameter with matrix view ``p x q`` is factored with rank
    ``r = min(rank, p, q)`` when that saves memory, ``(p + q) r < p q``, or
    whenever ``always_factor`` is true.

    Parameters
    ----------
    shape : iterable of int
        Shape of the parameter.
    rank : int
        Requested rank.
    always_factor : bool, optional
        Factor every matrix, even when it costs more memory than dense state
        (useful for verification at full rank).

    Returns
    -------
    int or None
    """
    mshape = matrix_shape(shape)
    if mshape is None:
        return None
    p, q = mshape
    r = min(int(rank), p, q)
    if always_factor or (p + q) * r < p * q:
        return r
    return None


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _ridge_lstsq(mat: Tensor, rhs: Tensor, solve_eps: Optional[float], orthonormal: bool = False) -> Tensor:
    r"""Regularised least squares :math:`\min_X \|M X - R\|_F` (``M``: ``n x r``, ``n >= r``).

    Solves the normal equations :math:`M^\top M X = M^\top R` with the
    relative Tikhonov shift :math:`\lambda = \varepsilon_s^2 \|M\|_F^2 / r + \tau`
    and one iterated-Tikhonov refinement (see the module docstring), without
    ever forming :math:`M^\top M`: with :math:`M = Q R_M` and the QR
    factorisation :math:`[R_M; \sqrt\lambda I] = Q_2 R_2` one has
    :math:`R_M^\top R_M + \lambda I = R_2^\top R_2`, so the Tikhonov solution is
    :math:`X_0 = R_2^{-1} Q_{2,\mathrm{top}}^\top Q^\top R` and the refinement
    :math:`X_1 = X_0 + R_2^{-1} Q_{2,\mathrm{top}}^\top (Q^\top R - R_M X_0)`.
    Only triangular solves with :math:`R_2` occur, so rounding errors grow
    like :math:`\operatorname{cond}(M)`, not its square. Returns ``X``
    (``r x k``) in the dtype of ``rhs``. ``orthonormal``: ``M`` has orthonormal columns (its
    entries are at most 1), so its squares cannot overflow.
    """
    work = _solve_dtype(mat.dtype)
    finfo = torch.finfo(work)
    if solve_eps is None:
        solve_eps = finfo.eps
    # The shift sums squares of the factor's entries, which overflow float32 from ~1e19 on: the
    # solve runs on M / c, c a power of two (exactly 1 for ordinary factors: no bit changes),
    # whose solution is c X (the shift is relative: it scales along).
    mat_w = mat.to(work)
    scale = 1.0
    if not orthonormal:
        scale = pow2_scale(max_abs(mat_w), square_limit(work, mat_w.numel()) / 2)
        mat_w = mat_w / scale
    r = mat_w.shape[-1]
    q, r_m = torch.linalg.qr(mat_w)
    y = q.mT @ rhs.to(work)
    lam = (r_m * r_m).sum() * (solve_eps * solve_eps / r) + finfo.tiny
    eye = torch.eye(r, dtype=work, device=mat.device)
    q2, r2 = torch.linalg.qr(torch.cat([r_m, eye * lam.sqrt()], dim=0))
    q2_top_t = q2[:r].mT
    x = torch.linalg.solve_triangular(r2, q2_top_t @ y, upper=True)
    x = x + torch.linalg.solve_triangular(r2, q2_top_t @ (y - r_m @ x), upper=True)
    return (x / scale).to(rhs.dtype)


def _newton_pair_(B: Tensor, A: Tensor, target: Tensor, c: float,
                  solve_eps: Optional[float], simultaneous: bool = False) -> None:
    r"""One pair of damped Newton steps, in place.

    .. math::
        B \leftarrow (1-c) B + c\, T A^\top (A A^\top)^{-1}, \quad
        A \leftarrow (1-c) A + c\, (B^\top B)^{-1} B^\top T,

    the second using the updated ``B`` (sequential) or, with ``simultaneous``, the old one
    (Eq. 12 of the paper as printed); then the gauge is reset
    (:func:`_regauge_`). Both Newton targets are least-squares solutions,
    :math:`T A^\top (A A^\top)^{-1} = \arg\min_X \|X A - T\|` and
    :math:`(B^\top B)^{-1} B^\top T = \arg\min_X \|B X - T\|`, computed by
    :func:`_ridge_lstsq`.
    """
    a_target = _ridge_lstsq(B, target, solve_eps) if simultaneous else None
    B.lerp_(_ridge_lstsq(A.mT, target.mT, solve_eps, orthonormal=True).mT, c)  # A: orthonormal rows
    A.lerp_(_ridge_lstsq(B, target, solve_eps) if a_target is None else a_target, c)
    _regauge_(B, A)


def _regauge_(B: Tensor, A: Tensor) -> None:
    r"""Re-orthonormalise the rows of ``A`` without changing ``B A``, in place.

    With :math:`A^\top = Q R`: :math:`A \leftarrow Q^\top`,
    :math:`B \leftarrow B R^\top`. The Newton steps are equivariant under
    :math:`(B, A) \mapsto (B S, S^{-1} A)`, so this changes nothing in exact
    arithmetic; it stops the gauge from drifting, which otherwise makes both
    factors (and the Gram matrices) ill-conditioned within tens of steps.
    """
    work = _solve_dtype(A.dtype)
    q, r = torch.linalg.qr(A.mT.to(work))
    B.copy_(B.to(work) @ r.mT)
    A.copy_(q.mT)


#: Quintic Newton-Schulz coefficients of Muon (Jordan et al. 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    r"""Muon's quintic Newton--Schulz iteration, applied to ``x`` (``n x k``).

    :math:`X_0 = x / (\|x\|_F + \epsilon)`, then ``steps`` times
    :math:`X \leftarrow aX + bX(X^\top X) + cX(X^\top X)^2` with
    :data:`NS_COEFFICIENTS`; the singular vectors are kept and the singular
    values driven towards 1 (roughly into ``[0.7, 1.2]``). Only ``k x k``
    Gram matrices are formed, so pass the thinner orientation for speed.
    Works in float32 (float64 for float64 input); returns ``x``'s dtype.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    a, b, c = NS_COEFFICIENTS
    # the norm sums squares, which overflow float32 from ~1e19 on: y / c first, c a power of two
    # (exactly 1 for ordinary momenta: no bit changes), with eps / c (the same X_0)
    y = x.to(work)
    scale = pow2_scale(max_abs(y), square_limit(work, y.numel()) / 2)
    y = y / scale
    y = y / (torch.linalg.matrix_norm(y) + eps / scale)
    for _ in range(steps):
        gram = y.mT @ y
        y = a * y + y @ (b * gram + c * (gram @ gram))
    return y.to(x.dtype)


def _top_right_singular_vectors(target: Tensor, r: int) -> Tensor:
    """``r x q`` matrix of the leading right singular vectors of ``target``."""
    work = _solve_dtype(target.dtype)
    _, _, vh = torch.linalg.svd(target.to(work), full_matrices=False)
    return vh[:r].to(target.dtype).contiguous()


def adam_update_bound(beta1: float, beta2: float, step: Union[int, Tensor]) -> Union[float, Tensor]:
    r"""Largest per-entry ``|update| / lr`` that exact Adam can take at step ``t``.

    With zero-initialised moments, :math:`m_t = (1-\beta_1)\sum_j \beta_1^j g_{t-j}` and
    :math:`v_t = (1-\beta_2)\sum_j \beta_2^j g_{t-j}^2`; Cauchy--Schwarz on
    :math:`\beta_1^j g = (\beta_1^j \beta_2^{-j/2})(\beta_2^{j/2} g)` gives, with
    :math:`\rho = \beta_1^2 / \beta_2` and bias corrections,

    .. math::
        \frac{|\hat m_t|}{\sqrt{\hat v_t}} \le
        \frac{1 - \beta_1}{1 - \beta_1^t}
        \sqrt{\frac{1 - \beta_2^t}{1 - \beta_2}}
        \sqrt{\sum_{j<t} \rho^j},

    attained by gradients :math:`g_{t-j} \propto (\beta_1/\beta_2)^j`. It is 1 at
    :math:`t = 1` and tends to :math:`(1-\beta_1)/\sqrt{(1-\beta_2)(1-\rho)}` for
    :math:`\rho < 1` (1.165 for betas (0.9, 0.95), 7.27 for (0.9, 0.999)); it is infinite
    for :math:`\beta_2 = 0 < \beta_1`. ``step`` may be a 0-d tensor (no host read).
    """
    if beta2 == 0.0:
        return 1.0 if beta1 == 0.0 else math.inf
    rho = beta1 * beta1 / beta2
    t = step
    if abs(1.0 - rho) < 1e-12:
        geometric = t
    else:
        try:
            geometric = (1.0 - rho ** t) / (1.0 - rho)
        except OverflowError:  # rho > 1 (beta1^2 > beta2) at a large Python-int step
            return math.inf
    bias1 = 1.0 - beta1 ** t
    bias2 = 1.0 - beta2 ** t
    return (1.0 - beta1) / bias1 * (bias2 / (1.0 - beta2) * geometric) ** 0.5


def _update_bound(option: Union[str, float], beta1: float, beta2: float, step: Tensor):
    if option == "adam":
        return adam_update_bound(beta1, beta2, step)
    return float(option)


def _history_rescale(beta2: float, step: Tensor) -> Tensor:
    r""":math:`(1 - \beta_2^{t-1}) / (1 - \beta_u^{t-1})^2` (``0`` at ``t = 1``, where the history
    is zero): the factor that turns the square of the ``|g|`` EMA, biased by
    :math:`(1 - \beta_u^{t-1})^2`, into a term with Adam's bias :math:`1 - \beta_2^{t-1}`."""
    prev = step - 1
    bias_u = 1.0 - math.sqrt(beta2) ** prev
    return torch.where(prev > 0, (1.0 - beta2 ** prev) / bias_u.clamp_min(1e-30).square(), torch.zeros_like(prev))


class LoRAPreAdam(Optimizer):
    r"""Adam(W) with rank-``r`` factored first and second moments (LoRA-Pre).

    For every parameter with matrix view ``p x q`` (see
    :func:`matrix_shape`) the first moment is kept as ``m = m_B @ m_A`` and
    the second-moment quantity as ``s = v_B @ v_A`` (``p x r`` and ``r x q``
    factors), updated by sequential damped Newton steps (see the module
    docstring), so each factored moment costs ``(p + q) r`` numbers instead
    of ``p q``. The parameter update is decoupled-weight-decay Adam:

    .. math::
        \theta &\leftarrow \theta (1 - \eta \lambda), \\
        \theta &\leftarrow \theta - \eta\, \operatorname{clip}_{[-K_t, K_t]}
                 \Big(\frac{m_t / (1 - \beta_1^t)}{d_t + \epsilon}\Big),

    by default (``current_gradient=True``, the paper's step) with
    :math:`m_t = \beta_1 (m_B m_A)_{t-1} + (1 - \beta_1) g_t`,
    :math:`d_t = \sqrt{(\beta_2 \kappa_t s_{t-1}^2 + (1 - \beta_2) g_t^2) / (1 - \beta_2^t)}`
    (:math:`\kappa_t` the history's bias correction, module docstring)
    and :math:`K_t` = :func:`adam_update_bound` (no entry steps further than exact Adam
    could); with ``current_gradient=False`` :math:`m_t = (m_B m_A)_t` and
    :math:`d_t = |s_t| / (1 - \beta_u^t)`, :math:`\beta_u = \sqrt{\beta_2}` for
    ``second_moment="abs"`` (``s`` tracks the EMA of ``|g|``) or
    :math:`d_t = \sqrt{\max(s_t, 0) / (1 - \beta_2^t)}` for ``second_moment="square"``
    (``s`` tracks Adam's ``v``).

    Only parameters that are plain tensors are accepted: one on a manifold (a
    ``geoopt.ManifoldParameter``, e.g. a low-rank weight on
    :class:`~lowrank_manifolds.FixedRankManifold`) raises ``TypeError`` before anything
    is changed, since a dense step would take it off its manifold.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups (dicts). Each group may override any
        of the keyword arguments below.
    lr : float, optional
        Learning rate ``eta >= 0`` (default ``1e-3``).
    betas : tuple of float, optional
        ``(beta1, beta2)``, each in ``[0, 1)`` (default ``(0.9, 0.999)``).
    eps : float, optional
        Denominator term ``epsilon >= 0`` (default ``1e-8``).
    weight_decay : float, optional
        Decoupled (AdamW) weight decay ``lambda >= 0`` (default ``0``).
    rank : int, optional
        Rank ``r >= 1`` of the factored moments (default ``8``); a parameter
        uses ``min(rank, p, q)``.
    second_moment : {"abs", "square"}, optional
        What the second pair of factors tracks (default ``"abs"``, the
        paper's choice; ``"square"`` reproduces AdamW at full square rank but
        is unstable at low rank, see the module docstring).
    solve_eps : float or None, optional
        Relative threshold of the ``r x r`` solves: singular values of the
        factor below ``solve_eps * ||M||_F / sqrt(r)`` are damped (Tikhonov shift
        ``solve_eps**2 * trace(M^T M) / r``); ``None`` (default) means
        ``finfo(dtype).eps`` of the solve dtype. ``0`` disables the relative term
        (for diagnostics).
    always_factor : bool, optional
        Factor matrices even when that does not save memory (default
        ``False``). Parameters with fewer than two dimensions always keep
        dense Adam state.
    muon : bool, optional
        Muon variant (default ``False``): factored parameters keep only the
        first-moment factors and step along ``0.2 sqrt(max(p, q))`` times the
        Newton--Schulz orthogonalisation of the reconstructed momentum (see
        the module docstring); ``betas[1]``, ``eps`` and ``second_moment``
        then only matter for the parameters with dense Adam state.
    ns_steps : int, optional
        Newton--Schulz iterations of the Muon variant (default ``5``).
    factor_first_moment : bool, optional
        ``True`` (default, the paper's method): both moments factored.
        ``False``: Adam's dense first moment and a factored second moment,
        ``p q + (p + q) r`` numbers per matrix (see the module docstring); not
        with ``muon=True``.
    current_gradient : bool or None, optional
        ``True`` (the default unless ``muon=True``): the paper's step, in which
        ``g_t`` enters in full and only the history is low rank,
        ``m_t = beta1 (B A)_{t-1} + (1 - beta1) g_t``,
        ``v_t = beta2 (B_v A_v)_{t-1}**2 + (1 - beta2) g_t**2``, bias-corrected
        by ``1 - beta1**t`` and ``1 - beta2**t`` (module docstring). ``False``:
        the reconstruction form, stepping with the factors after they absorbed
        ``g_t`` (the Muon variant's only form). The state is the same.
    update_bound : "adam", float or None, optional
        Per-entry bound ``K_t`` on ``|update| / lr`` (weight decay aside):
        ``"adam"`` (default) the largest value exact Adam with these betas can
        take at step ``t`` (:func:`adam_update_bound`), a number ``> 0`` a fixed
        bound, ``None`` none. Applies to the factored parameters outside the Muon
        variant; the dense-state ones are exact Adam(W), which obeys it anyway.
    history_bias_correction : bool, optional
        ``True`` (default): in the current-gradient form with ``second_moment="abs"``
        the squared ``|g|`` history is rescaled to Adam's bias,
        ``kappa_t = (1 - beta2**(t-1)) / (1 - sqrt(beta2)**(t-1))**2``; ``False``: the
        paper's formula (``kappa_t = 1``). ``False`` elsewhere raises ``ValueError``
        (it would change nothing).
    factor_update : {"sequential", "simultaneous"}, optional
        The order of each pair of Newton steps: ``"sequential"`` (default; ``A``'s step
        uses the new ``B``, which composes to the EMA exactly at full square rank) or
        ``"simultaneous"`` (both from the old factors, Eq. 12 of the paper as printed).

    Notes
    -----
    State per factored parameter: ``step`` (a 0-d tensor on the parameter's
    device), ``m_B``, ``m_A``, ``v_B``, ``v_A`` (with
    ``factor_first_moment=False``: ``exp_avg``, a dense ``p x q`` matrix, in
    place of ``m_B``, ``m_A``). State per dense parameter:
    ``step``, ``exp_avg``, ``exp_avg_sq`` exactly as in ``torch.optim.Adam``.
    :meth:`step` performs no host-device synchronisation other than its finiteness
    check, and is taken whole or not at all: the hyperparameters in ``param_groups`` (edited
    mid-run, say) are checked first by the constructor's checks (``ValueError`` naming the
    param group and the key; they are Python numbers: a tensor is refused); with
    ``check_finite = True`` (default; an attribute) a non-finite gradient raises
    ``FloatingPointError`` naming the parameter before anything is written (one multi-tensor
    max-abs per device and dtype, one host sync per step, free on the CPU), and a parameter
    whose gradient exceeds :func:`~lowrank_manifolds.optim._faults.grad_limit` (9.2e18 in
    float32) is stepped on copies and checked first (one more host sync in such a step): a
    finite gradient never leaves a weight or a state non-finite. Where a value truly cannot be
    represented (Adam's ``exp_avg_sq`` of a dense-state parameter, or ``"square"``'s factors,
    from gradients of ~1e20 to 1e30 on in float32) the step raises ``FloatingPointError``
    with everything unchanged; the factored ``"abs"`` moments hold ``|g|``-sized values and
    take such steps. ``state_dict`` saves the optimizer's class name in each param group;
    ``load_state_dict`` refuses another optimizer's state dict, hyperparameters the
    constructor refuses and states that are not this optimizer's for these parameters, with
    nothing loaded.
    """

    check_finite: bool = True

    def __init__(
        self,
        params: Iterable[Union[Tensor, Dict[str, Any]]],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        *,
        second_moment: str = "abs",
        solve_eps: Optional[float] = None,
        always_factor: bool = False,
        muon: bool = False,
        ns_steps: int = 5,
        factor_first_moment: bool = True,
        current_gradient: Optional[bool] = None,
        update_bound: Union[str, float, None] = "adam",
        history_bias_correction: bool = True,
        factor_update: str = "sequential",
    ) -> None:
        if current_gradient is None:
            current_gradient = not muon
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, second_moment=second_moment,
            solve_eps=solve_eps, always_factor=always_factor, muon=muon, ns_steps=ns_steps,
            factor_first_moment=factor_first_moment, current_gradient=current_gradient,
            update_bound=update_bound, history_bias_correction=history_bias_correction,
            factor_update=factor_update,
        )
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_hyperparameters(group: Dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, (Tensor, bool)) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: lr={lr!r} (need a finite number >= 0)")
        betas = group["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (need a pair)") from None
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid {name}: {beta!r} (need 0 <= {name} < 1)")
        eps = group["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid eps: {eps!r} (need a finite eps >= 0)")
        wd = group["weight_decay"]
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0.0 <= wd < math.inf:
            raise ValueError(f"Invalid weight_decay: {wd!r} (need a finite weight_decay >= 0)")
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (need an integer >= 1)")
        mode = group["second_moment"]
        if mode not in _SECOND_MOMENT_MODES:
            raise ValueError(
                f"Invalid second_moment: {mode!r} (need one of {_SECOND_MOMENT_MODES})"
            )
        solve_eps = group["solve_eps"]
        if solve_eps is not None and (
            not isinstance(solve_eps, (int, float)) or not 0.0 <= solve_eps < math.inf
        ):
            raise ValueError(f"Invalid solve_eps: {solve_eps!r} (need None or finite >= 0)")
        if not isinstance(group.get("muon", False), bool):
            raise ValueError(f"Invalid muon: {group['muon']!r} (need a bool)")
        ns = group.get("ns_steps", 5)
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 1:
            raise ValueError(f"Invalid ns_steps: {ns!r} (need an integer >= 1)")
        if not isinstance(group["always_factor"], bool):
            raise ValueError(f"Invalid always_factor: {group['always_factor']!r} (need a bool)")
        first = group.get("factor_first_moment", True)
        if not isinstance(first, bool):
            raise ValueError(f"Invalid factor_first_moment: {first!r} (need a bool)")
        if not first and group.get("muon", False):
            raise ValueError("muon=True needs the factored first moment (factor_first_moment=True)")
        cur = group["current_gradient"]
        if not isinstance(cur, bool):
            raise ValueError(f"Invalid current_gradient: {cur!r} (need a bool)")
        if cur and group["muon"]:
            raise ValueError(
                "current_gradient=True is not defined for muon=True (pass current_gradient=False)"
            )
        bound = group["update_bound"]
        if not (bound is None or bound == "adam" or (
            isinstance(bound, (int, float)) and not isinstance(bound, bool) and 0.0 < bound <= math.inf
        )):
            raise ValueError(f"Invalid update_bound: {bound!r} (need 'adam', a number > 0 or None)")
        if group["factor_update"] not in ("sequential", "simultaneous"):
            raise ValueError(
                f"Invalid factor_update: {group['factor_update']!r} (need 'sequential' or 'simultaneous')"
            )
        correction = group["history_bias_correction"]
        if not isinstance(correction, bool):
            raise ValueError(f"Invalid history_bias_correction: {correction!r} (need a bool)")
        if not correction and not (cur and mode == "abs"):
            raise ValueError(
                "history_bias_correction=False has an effect only on the current-gradient form "
                "with second_moment='abs' (current_gradient=True)"
            )

    def state_dict(self) -> Dict[str, Any]:
        """As ``torch.optim.Optimizer``'s, with the optimizer's class name in each param group
        (``"saved_by"``; :meth:`load_state_dict` removes it)."""
        return tag_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``'s, after the checks of
        :func:`~lowrank_manifolds.optim._faults.checked_state_dict`: a state dict saved by
        another optimizer, hyperparameters the constructor refuses (an error names the param
        group and the key), and states that are not this optimizer's for these parameters (a
        ``torch.optim.Adam`` state for a factored matrix, factors of another rank, a
        non-finite value) raise with nothing loaded. Groups without this optimizer's options
        (a ``torch.optim.Adam`` state dict for dense-state parameters) take its defaults."""
        super().load_state_dict(checked_state_dict(self, state_dict, self._loaded_group, self._state_layout))

    @staticmethod
    def _with_current_gradient(group: Dict[str, Any]) -> Dict[str, Any]:
        # current_gradient=None follows muon (the constructor's default)
        if group.get("current_gradient") is None and "muon" in group:
            return dict(group, current_gradient=not group["muon"])
        return group

    def _loaded_group(self, saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
        group = {**self.defaults, **self._with_current_gradient(saved)}
        self._check_hyperparameters(group)
        return group

    def _state_layout(self, p: Tensor, group: Dict[str, Any]) -> Layout:
        """The states :meth:`step` keeps for ``p`` (all of them, or none yet)."""
        r = factored_rank(p.shape, group["rank"], group["always_factor"])
        if r is None:
            shape = tuple(p.shape)
            expected = {"exp_avg": floating(shape, "Adam's first moment"),
                        "exp_avg_sq": floating(shape, "Adam's second moment")}
        else:
            rows, cols = matrix_shape(p.shape)
            expected = {}
            if group["factor_first_moment"]:
                expected["m_B"] = floating((rows, r), f"the first moment's left factor, rank {r}")
                expected["m_A"] = floating((r, cols), f"the first moment's right factor, rank {r}")
            else:
                expected["exp_avg"] = floating((rows, cols), "Adam's first moment of the matrix view")
            if not group["muon"]:
                expected["v_B"] = floating((rows, r), f"the second moment's left factor, rank {r}")
                expected["v_A"] = floating((r, cols), f"the second moment's right factor, rank {r}")
        expected = {"step": counter(tensor_only=True), **expected}
        return expected, (tuple(expected),)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group, validating its (possibly overridden) settings."""
        refuse_manifold_parameters(type(self).__name__, param_group, lowrank=False)
        param_group = self._with_current_gradient(param_group)
        self._check_hyperparameters({**self.defaults, **param_group})  # before anything is added
        super().add_param_group(param_group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _init_state(self, p: Tensor, grad: Tensor, group: Dict[str, Any],
                    state: Dict[str, Any]) -> None:
        step_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
        r = factored_rank(p.shape, group["rank"], group["always_factor"])
        if r is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        g = grad.reshape(p.shape[0], -1)
        rows = g.shape[0]
        if group["factor_first_moment"]:
            state["m_B"] = torch.zeros(rows, r, dtype=p.dtype, device=p.device)
            state["m_A"] = _top_right_singular_vectors(g, r)
        else:
            state["exp_avg"] = torch.zeros_like(g, memory_format=torch.contiguous_format)
        if group["muon"]:
            return
        state["v_B"] = torch.zeros(rows, r, dtype=p.dtype, device=p.device)
        state["v_A"] = _top_right_singular_vectors(
            self._second_target(g, group["second_moment"]), r
        )

    @staticmethod
    def _second_target(g: Tensor, mode: str) -> Tensor:
        return g.abs() if mode == "abs" else g * g

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimisation step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss.

        Returns
        -------
        Any
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_groups(self, self._check_hyperparameters)
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LoRAPreAdam does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("LoRAPreAdam does not support complex parameters")
                params.append((p, group))
        staged = {}
        if self.check_finite:
            over, _ = admit_step(self, lambda p: grad_limit(p.dtype))
            flagged = [(p, group) for p, group in params if id(p) in over]
            if flagged:  # gradients whose squares could overflow: stepped on copies and checked first
                staged = stage_on_copies(self, [p for p, _ in flagged], lambda values, states: [
                    self._param_step(value, p.grad, group, state)
                    for (p, group), value, state in zip(flagged, values, states)])
        for p, group in params:
            if id(p) not in staged:
                self._param_step(p, p.grad, group, self.state[p])
        commit(self, staged)
        return loss

    def _param_step(self, p: Tensor, grad: Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        """One step of ``p`` (a parameter, or a copy of one) with ``grad``, in place, and of its
        ``state``."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if len(state) == 0:
            self._init_state(p, grad, group, state)
        step_t = state["step"]
        if step_t.device != p.device:
            step_t = state["step"] = step_t.to(p.device)
        step_t.add_(1)
        if wd != 0:
            p.mul_(1.0 - lr * wd)
        bias1 = 1.0 - beta1 ** step_t
        if "m_B" in state and group["muon"]:
            m_B, m_A = state["m_B"], state["m_A"]
            g = grad.reshape(m_B.shape[0], -1)
            _newton_pair_(m_B, m_A, g, 1.0 - math.sqrt(beta1), group["solve_eps"],
                          group["factor_update"] == "simultaneous")
            # m = B A with orthonormal rows of A: NS(B A) = NS(B) A.
            ortho = newton_schulz(m_B, group["ns_steps"]) @ m_A
            scale = 0.2 * math.sqrt(max(g.shape))
            p.add_(ortho.view_as(p), alpha=-lr * scale)
            return
        if "v_B" in state:
            num, denom = self._factored_direction(grad, state, group, step_t)
            num = num.view_as(p)
            denom = denom.view_as(p)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias2 = 1.0 - beta2 ** step_t
            denom = (exp_avg_sq.sqrt() / bias2.sqrt()).add_(eps)
            num = exp_avg
        if "v_B" in state and group["update_bound"] is not None:
            ratio = (num / denom).mul_((1.0 / bias1).to(num.dtype))
            bound = _update_bound(group["update_bound"], beta1, beta2, step_t)
            p.add_(ratio.clamp_(-bound, bound), alpha=-lr)
        else:
            p.addcdiv_(num * (lr / bias1).to(p.dtype), denom, value=-1.0)

    def _factored_direction(self, grad: Tensor, state: Dict[str, Any],
                            group: Dict[str, Any], step_t: Tensor) -> Tuple[Tensor, Tensor]:
        r"""Update the factors and return ``(m_t, d_t + eps)`` as matrices.

        Reconstruction form (``current_gradient=False``): ``m_t`` and ``d_t`` come from the
        factors *after* their Newton steps on ``g_t``. Current-gradient form: from the factors
        *before* them, :math:`m_t = \beta_1 (BA)_{t-1} + (1-\beta_1) g_t` and
        :math:`v_t = \beta_2 \kappa_t s_{t-1}^{\circ 2} + (1-\beta_2) g_t^{\circ 2}` (``"abs"``;
        ``"square"``: :math:`\beta_2 \max(s_{t-1}, 0) + \ldots`), ``d_t = sqrt(v_t / (1 - beta2^t))``.
        """
        beta1, beta2 = group["betas"]
        mode, solve_eps = group["second_moment"], group["solve_eps"]
        current = group["current_gradient"]
        simultaneous = group["factor_update"] == "simultaneous"
        v_B, v_A = state["v_B"], state["v_A"]
        g = grad.reshape(v_B.shape[0], -1)
        scale = kappa = None
        if current:  # the history, read before the factors absorb g_t
            if mode == "abs":
                # beta2 kappa s^2 + (1 - beta2) g^2 squares |g|-sized values, which overflow
                # float32 from ~1e19 on although its root, the denominator, is representable: it
                # is formed from s / c and g / c, c a power of two (exactly 1 for ordinary values:
                # no bit changes), and c multiplies the root back. |s| <= sqrt(r) max|v_B|, for
                # v_A has orthonormal rows.
                if group["history_bias_correction"]:
                    kappa = _history_rescale(beta2, step_t).to(g.dtype)
                big = max_abs(v_B) * math.sqrt(v_B.shape[-1])
                big = torch.maximum(big if kappa is None else big * kappa.sqrt(), max_abs(g))
                scale = pow2_scale(big, grad_limit(g.dtype))
                s = (v_B / scale) @ v_A
            else:
                s = v_B @ v_A
            m = state["m_B"] @ state["m_A"] if "m_B" in state else None
        if "m_B" in state:
            _newton_pair_(state["m_B"], state["m_A"], g, 1.0 - math.sqrt(beta1), solve_eps, simultaneous)
            m = m.lerp_(g, 1.0 - beta1) if current else state["m_B"] @ state["m_A"]
        else:  # factor_first_moment=False: Adam's own EMA
            m = state["exp_avg"].lerp_(g, 1.0 - beta1)  # read-only below
        if mode == "abs":
            _newton_pair_(v_B, v_A, g.abs(), 1.0 - beta2 ** 0.25, solve_eps, simultaneous)
        else:
            _newton_pair_(v_B, v_A, g * g, 1.0 - math.sqrt(beta2), solve_eps, simultaneous)
        if current:
            root = (1.0 - beta2 ** step_t).sqrt().to(s.dtype)
            if mode == "abs":
                s = s.square_()
                if kappa is not None:
                    s.mul_(kappa)
                g, root = g / scale, root / scale
            else:
                s = s.clamp_min_(0.0)
            s.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            return m, (s.sqrt_() / root).add_(group["eps"])
        s = v_B @ v_A
        if mode == "abs":
            bias2 = 1.0 - math.sqrt(beta2) ** step_t
            denom = (s.abs_() / bias2.to(s.dtype)).add_(group["eps"])
        else:
            bias2 = 1.0 - beta2 ** step_t
            denom = (s.clamp_min_(0.0).sqrt_() / bias2.sqrt().to(s.dtype)).add_(group["eps"])
        return m, denom

    # -------------------------------------------------------------- utilities
    def moments(self, p: Tensor) -> Tuple[Tensor, Tensor]:
        """Dense reconstruction of the (not bias-corrected) moments of ``p``.

        Parameters
        ----------
        p : Tensor
            A parameter managed by this optimizer that has state.

        Returns
        -------
        (Tensor, Tensor)
            ``(m, s)`` in the shape of ``p``: ``m`` the first moment; ``s``
            what the second pair of factors tracks (EMA of ``|g|`` for
            ``second_moment="abs"``, EMA of ``g^2`` for ``"square"``; ``None``
            for factored parameters of the Muon variant), or Adam's
            ``exp_avg_sq`` for parameters with dense state.
        """
        state = self.state[p]
        if not state:
            raise KeyError("parameter has no optimizer state yet")
        if "m_B" in state:
            m = (state["m_B"] @ state["m_A"]).view_as(p)
        else:
            m = state["exp_avg"].clone().view_as(p)
        if "v_B" in state:
            return m, (state["v_B"] @ state["v_A"]).view_as(p)
        if "exp_avg_sq" in state:
            return m, state["exp_avg_sq"].clone()
        return m, None  # Muon variant: no second moment

    def is_factored(self, p: Tensor) -> bool:
        """Whether ``p`` has (or will get) factored state."""
        state = self.state.get(p, {})
        if state:
            return "m_B" in state or "v_B" in state
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return factored_rank(p.shape, group["rank"], group["always_factor"]) is not None
        raise KeyError("parameter is not managed by this optimizer")

    def state_numel(self, include_step: bool = False) -> int:
        """Number of stored optimizer-state elements (moments; ``step`` optional).

        A factored ``p x q`` parameter of rank ``r`` holds ``2 (p + q) r``
        moment elements, a dense one ``2 p q`` (as ``torch.optim.Adam``).
        """
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and (include_step or key != "step"):
                    total += value.numel()
        return total

    def state_bytes(self, include_step: bool = True) -> int:
        """Bytes held by the optimizer-state tensors."""
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and (include_step or key != "step"):
                    total += value.numel() * value.element_size()
        return total
