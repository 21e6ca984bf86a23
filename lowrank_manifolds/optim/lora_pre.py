r"""LoRA-Pre: Adam whose moment estimates are stored as low-rank factors.

Reference: Wang et al., "Taming Momentum: Rethinking Optimizer States Through
Low-Rank Approximation" (2026, arXiv:2602.24283).

Maths
-----
Adam's exponential moving average (EMA)

.. math:: m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t

is one damped step of online least squares: it minimises
:math:`\beta \|m - m_{t-1}\|_F^2 + (1-\beta) \|m - g_t\|_F^2`. LoRA-Pre
restricts the ``p x q`` moment to rank ``r`` as :math:`m = B A`,
:math:`B \in \mathbb{R}^{p \times r}`, :math:`A \in \mathbb{R}^{r \times q}`,
and takes one damped Newton step on :math:`\tfrac12\|BA - g\|_F^2` for each
factor, *sequentially* (the ``A`` step uses the already updated ``B``):

.. math::

    B &\leftarrow (1 - c)\, B + c\, g A^\top (A A^\top)^{-1}, \\
    A &\leftarrow (1 - c)\, A + c\, (B^\top B)^{-1} B^\top g .

If ``A`` and ``B`` are square and invertible (``r = p = q``), the first half
step gives :math:`B'A = (1-c) m + c g` and the second
:math:`B'A' = (1-c) B'A + c g`, so :math:`B'A' = (1-c)^2 m + (1-(1-c)^2) g`:
with :math:`(1 - c)^2 = \beta` the reconstruction is *exactly* the EMA.

For ``r = min(p, q) < max(p, q)`` the reconstruction is *not* the EMA in
general: with ``p > q`` (``A`` square) one gets
:math:`B'A' = P_{B'}\,(\beta m + (1-\beta) g)`, the EMA target projected on
the column space of the new ``B``; the component of ``g`` outside that space
is lost. This is a property of the alternating scheme, not of the rank. The
exact-EMA statement therefore holds for square matrices only.

Second moment
-------------
Following the paper, the second moment is *not* factored directly (a low-rank
approximation of :math:`v \ge 0` may be negative). With the default
``second_moment="abs"`` the factors track

.. math:: u_t = \beta_u\, u_{t-1} + (1 - \beta_u)\, |g_t|, \qquad
          \beta_u = \sqrt{\beta_2}

(per half step :math:`1 - c = \beta_2^{1/4}`), and the update uses
:math:`\hat v_t = \hat u_t^2` with the bias correction of :math:`u` itself,
:math:`\hat u_t = u_t / (1 - \beta_u^t)`, i.e. the Adam denominator
:math:`\sqrt{\hat v_t} + \epsilon` becomes :math:`|\hat u_t| + \epsilon`. At
full (square) rank this is exactly "Adam with the root-mean-square replaced by
the (bias-corrected) EMA of ``|g|`` with decay ``sqrt(beta2)``". It is *not*
Adam (``(E|g|)^2 <= E g^2``), but its first step equals Adam's first step.

With ``second_moment="square"`` the factors track Adam's own
:math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` (per half step
:math:`1 - c = \sqrt{\beta_2}`), negative reconstructed entries are clamped to
zero, and at full (square) rank the optimizer reproduces
:class:`torch.optim.AdamW` (``torch.optim.Adam`` when ``weight_decay=0``).

Initialisation
--------------
The state starts at ``m = B A = 0`` with ``B = 0``. ``A`` cannot be zero
(``A A^T`` would be singular), so on the first step ``A`` is set to the top
``r`` right singular vectors of the first target (``g`` for the first moment,
``|g|`` or ``g^2`` for the second), which have orthonormal rows. The usual two
half steps then give

.. math:: B_1 A_1 = (1 - \beta)\, [g]_r ,

where :math:`[g]_r` is the best rank-``r`` approximation of ``g``
(Eckart--Young); at full rank this is exactly :math:`(1-\beta) g`. A
rank-deficient first gradient leaves some columns of ``B`` at zero but the
matching rows of ``A`` stay orthonormal, so those directions revive as soon as
a later gradient has a component in them. The initialisation costs one thin
SVD per factored parameter and moment, once.

Gauge and regularisation
------------------------
``B A`` is invariant under :math:`(B, A) \mapsto (B S, S^{-1} A)` and so are
the Newton steps (they are equivariant). Left alone, this gauge drifts and
both factors become ill-conditioned within tens of steps (condition numbers
of ``1e6`` after 40 random steps at ``8 x 8``), which ruins the solves. After
every pair of steps the rows of ``A`` are therefore re-orthonormalised by a
thin QR, :math:`A^\top = Q R`, :math:`A \leftarrow Q^\top`,
:math:`B \leftarrow B R^\top`; this does not change ``B A`` and keeps
:math:`A A^\top = I` and :math:`\operatorname{cond}(B) =
\operatorname{cond}(BA)`.

Each Newton target is a least-squares solution,
:math:`g A^\top (A A^\top)^{-1} = \arg\min_X \|X A - g\|_F` and
:math:`(B^\top B)^{-1} B^\top g = \arg\min_X \|B X - g\|_F`. The ``r x r``
normal equations :math:`G X = M^\top g` (:math:`G = M^\top M`, ``M`` being
``A^T`` or ``B``) are regularised by a relative Tikhonov shift

.. math:: \lambda = \varepsilon_s^2\, \frac{\operatorname{tr} G}{r} + \tau,

with :math:`\varepsilon_s` = ``solve_eps`` (default ``finfo.eps`` of the
solve dtype: ``2.2e-16`` in float64, ``1.2e-7`` in float32), i.e. singular
values of ``M`` below :math:`\varepsilon_s \|M\|_F / \sqrt r` are damped: the
rounding floor of the QR route below, whose relative accuracy is
:math:`\operatorname{cond}(M)\,\varepsilon`. (A shift :math:`\varepsilon_s
\operatorname{tr} G / r`, the threshold of normal equations, damps singular
values below :math:`\sqrt{\varepsilon_s}\|M\|_F` and biased a direction of a
``6 x 6`` factor with :math:`\operatorname{cond} = 2 \cdot 10^6` by
:math:`(\varepsilon \operatorname{cond}^2)^2 \approx 10^{-6}`, so the full-rank EMA
was off by ``2e-9`` instead of ``3e-12``.) :math:`\tau` is
the smallest normal number of that dtype (only there so that
``G = 0`` stays solvable; it then returns ``0`` because the right-hand side is
zero too), followed by one step of *iterated Tikhonov* refinement
:math:`X \leftarrow X + (G + \lambda I)^{-1}(M^\top g - G X)`. On an
eigenvalue :math:`\sigma` of ``G`` the result is
:math:`\varphi(\sigma)\,\sigma^{-1}` times the exact one, with the filter
:math:`\varphi(\sigma) = 1 - (\lambda / (\sigma + \lambda))^2`: well-resolved
directions (:math:`\sigma \gg \lambda`) are solved to a relative
:math:`(\lambda/\sigma)^2` (plain Tikhonov would give :math:`\lambda/\sigma`),
while
directions with :math:`\sigma \ll \lambda` get a gain of at most
:math:`2/\lambda` instead of blowing up (a rank-deficient first gradient, a
parameter whose gradient vanishes in some directions). ``G`` is never formed:
everything goes through a thin QR of ``M`` and a QR of the ``2r x r`` matrix
:math:`[R_M; \sqrt{\lambda} I]`, so rounding errors scale with
:math:`\operatorname{cond}(M)`, not :math:`\operatorname{cond}(M)^2` (with
normal equations, random ``4 x 4`` gradients already gave ``1e-9`` errors).
The solves run in float32 for half precision parameters. Only QR, triangular
solves and matrix products are used, none of which synchronises with the
device (no ``.item()``, no error checks).

Caveats at low rank
-------------------
The low-rank reconstruction of ``u`` (EMA of ``|g|``) can have entries near
zero, or negative, where ``m`` is not small; ``|u|`` then sits in the
denominator and single entries take steps of up to ``|m| / eps``. On the
planted teacher-student MLP of the tests (rank 16 of 32/64, float32) this
shows as an occasional loss spike (largest entry of ``|m / u|`` about ``1e5``
on the very first step, where ``u = (1 - beta_u) [|g|]_r``); training
recovers. ``second_moment="square"`` is far worse at low rank (the clamp sends
entries of ``v`` to zero and the run diverges to NaN on that problem) and is
meant for verification at full rank.

Factoring only the second moment
--------------------------------
``factor_first_moment=False`` keeps Adam's dense first moment (the exact EMA,
``p q`` numbers) and factors only the second-moment quantity, for ``p q +
(p + q) r`` numbers per matrix instead of ``2 p q``. On the character
transformer of ``examples/`` the rank-``d/8`` first moment is what costs
LoRA-Pre its validation loss (1.12-1.13x Adam's), while the factored second
moment alone costs 1.006-1.018x (``benchmarks/study_lorapre_moments.py``,
``docs/lora_pre.md``): this variant trades memory back for that loss. It is not
part of the paper's method, and it cannot be combined with ``muon=True`` (whose
point is the factored first moment).

Muon variant
------------
With ``muon=True`` only the first moment is factored (no second pair of
factors, so half the state) and the update of a factored parameter is the
Newton--Schulz orthogonalisation of the reconstructed momentum, as in Muon
(Jordan et al. 2024):

.. math:: \theta \leftarrow \theta - \eta\, \alpha\, \mathrm{NS}_k(m_t), \qquad
          \alpha = 0.2 \sqrt{\max(p, q)},

with ``k = ns_steps`` quintic iterations :math:`X \leftarrow aX + b X(X^\top X)
+ c X(X^\top X)^2`, :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`, started at
:math:`X_0 = m / \|m\|_F` (so the bias correction of ``m`` is irrelevant);
they push the singular values of ``X`` towards 1 (into roughly
``[0.7, 1.2]``, not exactly). The scale :math:`\alpha` makes the update's
RMS about that of an Adam update (Liu et al. 2025, "Muon is scalable"), so
Adam's learning rate is a reasonable start. The momentum is the plain EMA
``m_t`` (no Nesterov term). Because ``m = B A`` with orthonormal rows of
``A`` (after the gauge reset), :math:`m^\top m = A^\top B^\top B A` and every
iterate is :math:`X_k = B_k A` with :math:`B_{k+1} = aB_k + bB_k(B_k^\top
B_k) + cB_k(B_k^\top B_k)^2`: the iteration runs on the ``p x r`` factor
with ``r x r`` Gram matrices, :math:`O(k\,p\,r^2)`, and equals the
iteration on the dense reconstruction up to rounding (tested). The
iteration runs in float32 (float64 for float64 parameters). Parameters with
dense state (vectors, matrices that are not factored) keep the Adam(W)
update.

Parameters with more than two dimensions (convolution kernels) are viewed as
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

from ._faults import check_finite_grads, check_finite_state_dict

__all__ = ["LoRAPreAdam", "matrix_shape", "factored_rank", "newton_schulz"]

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


def _ridge_lstsq(mat: Tensor, rhs: Tensor, solve_eps: Optional[float]) -> Tensor:
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
    (``r x k``) in the dtype of ``rhs``.
    """
    work = _solve_dtype(mat.dtype)
    finfo = torch.finfo(work)
    if solve_eps is None:
        solve_eps = finfo.eps
    mat_w = mat.to(work)
    r = mat_w.shape[-1]
    q, r_m = torch.linalg.qr(mat_w)
    y = q.mT @ rhs.to(work)
    lam = (r_m * r_m).sum() * (solve_eps * solve_eps / r) + finfo.tiny
    eye = torch.eye(r, dtype=work, device=mat.device)
    q2, r2 = torch.linalg.qr(torch.cat([r_m, eye * lam.sqrt()], dim=0))
    q2_top_t = q2[:r].mT
    x = torch.linalg.solve_triangular(r2, q2_top_t @ y, upper=True)
    x = x + torch.linalg.solve_triangular(r2, q2_top_t @ (y - r_m @ x), upper=True)
    return x.to(rhs.dtype)


def _newton_pair_(B: Tensor, A: Tensor, target: Tensor, c: float,
                  solve_eps: Optional[float]) -> None:
    r"""One sequential pair of damped Newton steps, in place.

    .. math::
        B \leftarrow (1-c) B + c\, T A^\top (A A^\top)^{-1}, \quad
        A \leftarrow (1-c) A + c\, (B^\top B)^{-1} B^\top T,

    the second using the updated ``B``; then the gauge is reset
    (:func:`_regauge_`). Both Newton targets are least-squares solutions,
    :math:`T A^\top (A A^\top)^{-1} = \arg\min_X \|X A - T\|` and
    :math:`(B^\top B)^{-1} B^\top T = \arg\min_X \|B X - T\|`, computed by
    :func:`_ridge_lstsq`.
    """
    B.lerp_(_ridge_lstsq(A.mT, target.mT, solve_eps).mT, c)
    A.lerp_(_ridge_lstsq(B, target, solve_eps), c)
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
    y = x.to(work)
    y = y / (torch.linalg.matrix_norm(y) + eps)
    for _ in range(steps):
        gram = y.mT @ y
        y = a * y + y @ (b * gram + c * (gram @ gram))
    return y.to(x.dtype)


def _top_right_singular_vectors(target: Tensor, r: int) -> Tensor:
    """``r x q`` matrix of the leading right singular vectors of ``target``."""
    work = _solve_dtype(target.dtype)
    _, _, vh = torch.linalg.svd(target.to(work), full_matrices=False)
    return vh[:r].to(target.dtype).contiguous()


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
        \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
                 \frac{m_t}{d_t + \epsilon},

    with :math:`d_t = |s_t| / (1 - \beta_u^t)`, :math:`\beta_u =
    \sqrt{\beta_2}` for ``second_moment="abs"`` (``s`` tracks the EMA of
    ``|g|``) and :math:`d_t = \sqrt{\max(s_t, 0) / (1 - \beta_2^t)}` for
    ``second_moment="square"`` (``s`` tracks Adam's ``v``).

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

    Notes
    -----
    State per factored parameter: ``step`` (a 0-d tensor on the parameter's
    device), ``m_B``, ``m_A``, ``v_B``, ``v_A`` (with
    ``factor_first_moment=False``: ``exp_avg``, a dense ``p x q`` matrix, in
    place of ``m_B``, ``m_A``). State per dense parameter:
    ``step``, ``exp_avg``, ``exp_avg_sq`` exactly as in ``torch.optim.Adam``.
    :meth:`step` performs no host-device synchronisation other than its finiteness
    check: with ``check_finite = True`` (default; an attribute) a non-finite gradient raises
    ``FloatingPointError`` naming the parameter before anything is written (one
    ``isfinite`` reduction per gradient, one host sync per step, free on the CPU).
    ``load_state_dict`` rejects non-finite state tensors by name.
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
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            second_moment=second_moment,
            solve_eps=solve_eps,
            always_factor=always_factor,
            muon=muon,
            ns_steps=ns_steps,
            factor_first_moment=factor_first_moment,
        )
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_hyperparameters(group: Dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: lr={lr!r} (need a number >= 0)")
        betas = group["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (need a pair)") from None
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid {name}: {beta!r} (need 0 <= {name} < 1)")
        eps = group["eps"]
        if not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps!r} (need eps >= 0)")
        wd = group["weight_decay"]
        if not isinstance(wd, (int, float)) or not wd >= 0.0:
            raise ValueError(f"Invalid weight_decay: {wd!r} (need weight_decay >= 0)")
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

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``'s, after checking that every floating-point state
        tensor is finite (a ``ValueError`` names the parameter and the state key)."""
        check_finite_state_dict(self, state_dict)
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group, validating its (possibly overridden) settings."""
        super().add_param_group(param_group)
        self._check_hyperparameters(self.param_groups[-1])

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
        if self.check_finite:
            check_finite_grads(self)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("LoRAPreAdam does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("LoRAPreAdam does not support complex parameters")
                state = self.state[p]
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
                    _newton_pair_(m_B, m_A, g, 1.0 - math.sqrt(beta1), group["solve_eps"])
                    # m = B A with orthonormal rows of A: NS(B A) = NS(B) A.
                    ortho = newton_schulz(m_B, group["ns_steps"]) @ m_A
                    scale = 0.2 * math.sqrt(max(g.shape))
                    p.add_(ortho.view_as(p), alpha=-lr * scale)
                    continue
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
                p.addcdiv_(num * (lr / bias1).to(p.dtype), denom, value=-1.0)
        return loss

    def _factored_direction(self, grad: Tensor, state: Dict[str, Any],
                            group: Dict[str, Any], step_t: Tensor) -> Tuple[Tensor, Tensor]:
        """Update the factors and return ``(m_t, d_t + eps)`` as matrices."""
        beta1, beta2 = group["betas"]
        mode, solve_eps = group["second_moment"], group["solve_eps"]
        v_B, v_A = state["v_B"], state["v_A"]
        g = grad.reshape(v_B.shape[0], -1)
        if "m_B" in state:
            _newton_pair_(state["m_B"], state["m_A"], g, 1.0 - math.sqrt(beta1), solve_eps)
            m = state["m_B"] @ state["m_A"]
        else:  # factor_first_moment=False: Adam's own EMA
            m = state["exp_avg"].lerp_(g, 1.0 - beta1)  # read-only below
        if mode == "abs":
            _newton_pair_(v_B, v_A, g.abs(), 1.0 - beta2 ** 0.25, solve_eps)
        else:
            _newton_pair_(v_B, v_A, g * g, 1.0 - math.sqrt(beta2), solve_eps)
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
