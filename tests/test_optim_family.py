"""The low-rank optimizer family (DLRT and its configurations GeometricSGD, GeometricAdam).

References, all independent of the optimizers' code:

* every configuration (basis update x core x schedule), and each option that changes a step
  (fixed rank, no recorder, the second moment's square-root transport, GeometricAdam's scalar
  second moments of the rotation blocks), against a dense float64 reference of its step, written here from the formulas: dense projections P_U = U U^T, bases from QRs of
  [U, (I - UU^T) G V] (tangent, and augmented BUG's Adam) or [U S - h G V, U] (augmented BUG), the heavy-ball buffer as a
  dense matrix, Adam's moments in coordinates of the reference's own bases (the second moment
  is entrywise, hence coordinate-dependent: compared after checking that the bases agree up to
  the signs of their columns, to which the squared transport is blind);
* the transports against the dense projection identities;
* an uninterrupted run for checkpoints (bitwise), across rank changes and mid-cycle.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD
from lowrank_manifolds.optim._core import carry, embed
from lowrank_manifolds.optim._base import truncate
from lowrank_manifolds.truncation import Truncation

torch.set_num_threads(1)
F64 = torch.float64
M, N, CAP = 10, 8, 4  # 2 * CAP <= N: an augmentation never runs out of directions
B1, B2, EPS = 0.9, 0.99, 1e-8


# --------------------------------------------------------------------------
# the configurations
# --------------------------------------------------------------------------
CONFIGS = [
    ("parallel-bug", "flow", 1), ("augmented-bug", "flow", 1), ("abc-psi", "flow", 1),
    ("parallel-bug", "momentum", 1), ("parallel-bug", "momentum", 3),
    ("parallel-bug", "adam", 1), ("parallel-bug", "adam", 3),
    ("augmented-bug", "momentum", 1), ("augmented-bug", "momentum", 3),
    ("augmented-bug", "adam", 1), ("augmented-bug", "adam", 3),
]
IDS = [f"{i}-{c}-k{k}" for i, c, k in CONFIGS]


def make_optimizer(layer, integrator, core, k, hp):
    """The configuration under its public name: GeometricSGD / GeometricAdam where it is one."""
    lr, tol, wd, dec, mom, damp, nest = (hp[key] for key in ("lr", "tol", "wd", "dec", "mom", "damp", "nest"))
    params = layer.parameters()
    fixed = hp.get("fixed", False)
    tol = None if fixed else tol
    if (integrator, core, k) == ("parallel-bug", "momentum", 1) and not dec:
        return GeometricSGD(params, lr=lr, momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd, tol=tol,
                            fixed_rank=fixed)
    if (integrator, core) == ("parallel-bug", "adam"):
        return GeometricAdam(params, lr=lr, betas=(B1, B2), eps=EPS, weight_decay=wd, decoupled_weight_decay=dec,
                             tol=tol, augment_every=k, fixed_rank=fixed, m2_transport=hp.get("m2", "squared"),
                             perp_second_moment=hp.get("perp", "entrywise"))
    recorded = integrator != "parallel-bug" and hp.get("recorded", True)
    return DLRT(params, lr=lr, integrator=integrator, core=core, augment_every=k, tol=tol, weight_decay=wd,
                decoupled_weight_decay=dec, momentum=mom, dampening=damp, nesterov=nest, betas=(B1, B2), eps=EPS,
                fixed_rank=fixed, m2_transport=hp.get("m2", "squared"), model=layer if recorded else None)


def make_layer(rank, seed, tol=0.0):
    """A capacity-4 layer of active rank ``rank`` with distinct singular values (unique SVDs)."""
    torch.manual_seed(seed)
    layer = LowRankLinear(N, M, rank=rank, max_rank=CAP, bias=False, tol=tol, dtype=F64)
    with torch.no_grad():
        s = layer.manifold.unpack(layer.weight)[1]
        s.copy_(torch.diag(torch.tensor([1.5, 1.0, 0.6, 0.3], dtype=F64) * (torch.arange(CAP) < rank)))
    return layer


def step_on(layer, opt, target):
    """One step on 0.5 ||W - T||^2 (the identity as input: the layer's output is W^T), so that
    G = W - T; the recorder sees the exact G."""
    opt.zero_grad()
    (0.5 * ((layer(torch.eye(N, dtype=F64)) - target.T) ** 2).sum()).backward()
    opt.step()


# --------------------------------------------------------------------------
# the dense reference
# --------------------------------------------------------------------------
def pos_qr(a):
    """The QR with a non-negative diagonal of R (unique for full column rank)."""
    q, r = torch.linalg.qr(a)
    d = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(a.dtype)
    return q * d, r * d[:, None]


def ref_rank(sv, tol, cap):
    """The smallest rank whose discarded tail has norm <= tol * ||s||, at most ``cap``."""
    total = torch.linalg.vector_norm(sv)
    for k in range(1, len(sv) + 1):
        if torch.linalg.vector_norm(sv[k:]) <= tol * total:
            return min(k, cap)
    return min(len(sv), cap)


class Reference:
    """One configuration's steps from the formulas, on dense float64 matrices."""

    def __init__(self, u, s, v, integrator, core, k, hp):
        self.u, self.s, self.v = u, s, v  # active columns only; s may be a general matrix
        self.integrator, self.core, self.k, self.hp = integrator, core, k, hp
        self.buf = None  # heavy ball: a dense m x n matrix
        self.m1 = self.m2 = None  # Adam: coordinates in (u, v)
        self.t = 0
        self.phase = 0

    @property
    def x(self):
        return self.u @ self.s @ self.v.T

    def step(self, target):
        hp = self.hp
        lr, wd = hp["lr"], hp["wd"]
        decoupled = hp["dec"] and self.core != "flow"
        x, u, v = self.x, self.u, self.v
        g = x - target + (0.0 if decoupled else wd) * x  # L2 in the gradient
        x0 = (1 - lr * wd) * x if decoupled else x
        if not hp.get("recorded", True):  # the field from p.grad alone: P_X G
            pu, pv = u @ u.T, v @ v.T
            g = pu @ g + g @ pv - pu @ g @ pv
        phase, last = self.phase, self.phase == self.k - 1
        self.phase = (phase + 1) % self.k
        if phase > 0:  # a core-only step in the fixed bases u, v
            if self.core == "momentum":
                x_new = x0 - lr * self._momentum(u @ u.T @ g @ v @ v.T)
                core = u.T @ x_new @ v
            else:
                core = (u.T @ x0 @ v) - lr * self._adam(u.T @ g @ v)
            uh, vh = u, v
        else:
            pu, pv = u @ u.T, v @ v.T
            r = u.shape[1]
            if self.integrator == "parallel-bug" or (self.integrator, self.core) == ("augmented-bug", "adam"):
                # [U, Q_U]: augmented BUG's spans too (orth[K_1, U] = orth[U, GV]), in the
                # coordinates its Adam core uses; the heavy ball is blind to them
                qu, ru = pos_qr((torch.eye(M, dtype=F64) - pu) @ g @ v)
                qv, rv = pos_qr((torch.eye(N, dtype=F64) - pv) @ g.T @ u)
                if self.integrator == "augmented-bug":
                    # its new directions are the QR's of the field's F V = -G V: the columns of
                    # Q_U, Q_V (and their coefficients) change sign. Only the square-root
                    # transport of the second moment sees signs: (P^T sqrt(m2) Q)^2 mixes entries
                    # with the signs of the augmented basis.
                    qu, ru, qv, rv = -qu, -ru, -qv, -rv
                uh, vh = torch.cat([u, qu], 1), torch.cat([v, qv], 1)
                tangent = self.integrator == "parallel-bug" or not hp.get("recorded", True)
                dense_g = pu @ g + g @ pv - pu @ g @ pv if tangent else uh @ uh.T @ g @ vh @ vh.T
                # the coefficients blockwise: the triangles of the QRs exact, the normal block
                # zero for P_X G (the recorded G of augmented BUG has one)
                normal = torch.zeros(r, r, dtype=F64) if tangent else qu.T @ g @ qv
                gh = torch.cat([torch.cat([u.T @ g @ v, rv.T], 1), torch.cat([ru, normal], 1)])

                def emb(m, sq):  # the old directions come first: zero padding
                    out = torch.zeros(2 * r, 2 * r, dtype=F64)
                    out[:r, :r] = m
                    return out
            else:  # augmented BUG / abc-PSI: K_1 = US - hGV, U^ = orth[K_1, U]
                uh = torch.linalg.qr(torch.cat([u @ self.s - lr * g @ v, u], 1))[0]
                vh = torch.linalg.qr(torch.cat([v @ self.s.T - lr * g.T @ u, v], 1))[0]
                dense_g = uh @ uh.T @ g @ vh @ vh.T  # Galerkin S-step in the augmented bases
                gh = uh.T @ g @ vh
                mu, nv = uh.T @ u, v.T @ vh

                def emb(m, sq):
                    return (mu * mu) @ m @ (nv * nv) if sq else mu @ m @ nv
            if self.integrator == "abc-psi":  # Y_1 = Y_0 - h U^ U^^T G; its row space from Y_1 itself
                x_new = x0 - lr * uh @ uh.T @ g
                vh = pos_qr(x_new.T @ uh)[0]
                core = uh.T @ x_new @ vh
            elif self.core == "flow":
                core = uh.T @ (x0 - lr * dense_g) @ vh
            elif self.core == "momentum":
                core = uh.T @ (x0 - lr * self._momentum(dense_g)) @ vh
            else:
                if self.m1 is not None:
                    self.m1, self.m2 = emb(self.m1, False), emb(self.m2, True)
                core = (uh.T @ x0 @ vh) - lr * self._adam(gh)
        if self.k > 1 and 0 < phase < self.k - 1:  # a middle core-only step: the core stays general
            self.s = core
            return
        tol = hp["tol"] if last else 0.0  # a cycle's first step keeps what the capacity holds
        p, sv, qt = torch.linalg.svd(core)
        r1 = self.u.shape[1] if hp.get("fixed") else ref_rank(sv, tol, CAP)
        p, q = p[:, :r1], qt[:r1].T
        self.u, self.s, self.v = uh @ p, torch.diag(sv[:r1]), vh @ q
        if self.buf is not None:
            self.buf = self.u @ self.u.T @ self.buf @ self.v @ self.v.T  # P_U1 B P_V1
        if self.m1 is not None:
            squared = (p * p).T @ self.m2 @ (q * q)
            if hp.get("m2") == "sqrt":  # the paper's (P^T sqrt(m2) Q)^2, floored by the squared one
                squared = torch.maximum(squared, (p.T @ self.m2.sqrt() @ q).square())
            self.m1, self.m2 = p.T @ self.m1 @ q, squared

    def _momentum(self, dense_g):
        hp = self.hp
        mom, damp = hp["mom"], hp["damp"]
        if not mom:
            return dense_g
        self.buf = dense_g.clone() if self.buf is None else mom * self.buf + (1 - damp) * dense_g
        return dense_g + mom * self.buf if hp["nest"] else self.buf

    def _adam(self, gh):
        self.t += 1
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(gh), torch.zeros_like(gh)
        self.m1 = B1 * self.m1 + (1 - B1) * gh
        self.m2 = B2 * self.m2 + (1 - B2) * gh * gh
        denom = (self.m2 / (1 - B2**self.t)).sqrt() + EPS
        if self.hp.get("perp") == "scalar" and gh.shape[0] > self.u.shape[1]:
            # one second moment per rotation block: the EMA of its mean square (r^2 entries)
            r = self.u.shape[1]
            blocks = (gh[r:, :r], gh[:r, r:])  # Up (new x old), Vp (old x new)
            ms = torch.stack([b.square().sum() / r**2 for b in blocks])
            self.v_perp = B2 * getattr(self, "v_perp", torch.zeros(2, dtype=F64)) + (1 - B2) * ms
            rms = (self.v_perp / (1 - B2**self.t)).sqrt() + EPS
            denom[r:, :r], denom[:r, r:] = rms[0], rms[1]
        return (self.m1 / (1 - B1**self.t)) / denom


def compare(layer, opt, ref, core):
    mf = layer.manifold
    u, s, v = (t.detach() for t in mf.unpack(layer.weight))
    r = layer.active_rank
    assert r == ref.u.shape[1]
    torch.testing.assert_close(u @ s @ v.T, ref.x, atol=1e-10, rtol=0)
    state = opt.state[layer.weight]
    if core == "momentum" and ref.buf is not None:
        torch.testing.assert_close(u @ state["momentum_buffer"] @ v.T, ref.buf, atol=1e-10, rtol=0)
    if core == "adam":
        torch.testing.assert_close(u @ state["exp_avg"] @ v.T, ref.u @ ref.m1 @ ref.v.T, atol=1e-10, rtol=0)
        # the second moment is coordinate-dependent: the bases agree column by column up to sign
        for a, b in ((u[:, :r], ref.u), (v[:, :r], ref.v)):
            torch.testing.assert_close((a.T @ b).abs(), torch.eye(r, dtype=F64), atol=1e-8, rtol=0)
        torch.testing.assert_close(state["exp_avg_sq"][:r, :r], ref.m2, atol=1e-12, rtol=1e-8)
        assert torch.all(state["exp_avg_sq"] >= 0)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the recorded field is always there (or not needed)
@pytest.mark.parametrize("integrator, core, k", CONFIGS, ids=IDS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.sampled_from([2, 3]), tol=st.sampled_from([0.02, 0.2]),
       wd=st.sampled_from([0.0, 0.05]), dec=st.booleans(), heavy=st.sampled_from(["plain", "damped", "nesterov"]))
def test_each_configuration_equals_its_dense_reference(integrator, core, k, seed, rank, tol, wd, dec, heavy):
    hp = dict(lr=0.05 if core == "adam" else 0.2, tol=tol, wd=wd, dec=dec, mom=0.9,
              damp=0.3 if heavy == "damped" else 0.0, nest=heavy == "nesterov")
    layer = make_layer(rank, seed)
    u, s, v = (t.detach().clone() for t in layer.manifold.unpack(layer.weight))
    ref = Reference(u[:, :rank], s[:rank, :rank], v[:, :rank], integrator, core, k, hp)
    opt = make_optimizer(layer, integrator, core, k, hp)
    gen = torch.Generator().manual_seed(seed + 1)
    x_start = ref.x
    for _ in range(5):  # with k = 3: a cycle, then the next cycle's augmentation and a core step
        target = torch.randn(M, N, generator=gen, dtype=F64)
        step_on(layer, opt, target)
        ref.step(target)
        compare(layer, opt, ref, core)
    assert (ref.x - x_start).norm() > 1e-2  # it moved


#: The options the sampled test above leaves at their defaults, each against the same reference:
#: augmented BUG and abc-PSI from p.grad alone (no recorder: the field is P_X G), fixed rank,
#: the square-root transport of Adam's second moment, GeometricAdam's scalar second moments of
#: the rotation blocks. (name, integrator, core, k, options)
OPTION_CASES = [
    *[(f"{i}-{c}-k{k}-from-p.grad", i, c, k, dict(recorded=False))
      for i, c, k in CONFIGS if i != "parallel-bug"],
    *[(f"{i}-{c}-k1-fixed-rank", i, c, 1, dict(fixed=True)) for i, c, k in CONFIGS if k == 1],
    *[(f"{i}-adam-k{k}-sqrt-transport", i, "adam", k, dict(m2="sqrt"))
      for i, c, k in CONFIGS if c == "adam"],
    *[(f"parallel-bug-adam-k{k}-scalar-perp", "parallel-bug", "adam", k, dict(perp="scalar")) for k in (1, 3)],
]


@pytest.mark.parametrize("integrator, core, k, options", [case[1:] for case in OPTION_CASES],
                         ids=[case[0] for case in OPTION_CASES])
@pytest.mark.parametrize("seed, rank", [(0, 2), (1, 3)])
def test_each_option_equals_its_dense_reference(integrator, core, k, options, seed, rank):
    hp = dict(lr=0.05 if core == "adam" else 0.2, tol=0.2, wd=0.05, dec=False, mom=0.9, damp=0.0, nest=False,
              **options)
    layer = make_layer(rank, seed)
    u, s, v = (t.detach().clone() for t in layer.manifold.unpack(layer.weight))
    ref = Reference(u[:, :rank], s[:rank, :rank], v[:, :rank], integrator, core, k, hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if options.get("recorded", True) is False else "error", RuntimeWarning)
        opt = make_optimizer(layer, integrator, core, k, hp)
        gen = torch.Generator().manual_seed(seed + 1)
        ranks = set()
        for _ in range(5):
            target = torch.randn(M, N, generator=gen, dtype=F64)
            step_on(layer, opt, target)
            ref.step(target)
            compare(layer, opt, ref, core)
            ranks.add(layer.active_rank)
    if options.get("fixed"):
        assert ranks == {rank}


# --------------------------------------------------------------------------
# transports against the dense projection identities
# --------------------------------------------------------------------------
def orthonormal(rows, cols, gen):
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64))[0]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), r=st.integers(1, 4), kept=st.integers(1, 4), squared=st.booleans())
def test_transports_are_the_dense_projections(seed, r, kept, squared):
    gen = torch.Generator().manual_seed(seed)
    u, v = orthonormal(M, r, gen), orthonormal(N, r, gen)
    m1 = torch.randn(r, r, generator=gen, dtype=F64)
    m2 = torch.rand(r, r, generator=gen, dtype=F64)
    # augmentation: bases that contain U, V (augmented BUG's: orth[K, U]) and the tangent ones ([U, Q])
    uh = torch.linalg.qr(torch.cat([torch.randn(M, r, generator=gen, dtype=F64), u], 1))[0]
    vh = torch.linalg.qr(torch.cat([torch.randn(N, r, generator=gen, dtype=F64), v], 1))[0]
    mu, nv = uh.T @ u, v.T @ vh
    torch.testing.assert_close(uh @ carry(m1, mu, nv, "exp_avg", squared) @ vh.T, u @ m1 @ v.T, atol=1e-12, rtol=0)
    assert torch.all(carry(m2, mu, nv, "exp_avg_sq", squared) >= 0)
    ut = torch.cat([u, orthonormal(M, r, gen) - u @ (u.T @ orthonormal(M, r, gen))], 1)
    ut = torch.cat([u, torch.linalg.qr(ut[:, r:] - u @ (u.T @ ut[:, r:]))[0]], 1)
    vt = torch.cat([v, torch.linalg.qr((torch.eye(N, dtype=F64) - v @ v.T) @ torch.randn(N, r, generator=gen, dtype=F64))[0]], 1)
    torch.testing.assert_close(ut @ embed(m1, 2 * r, 2 * r) @ vt.T, u @ m1 @ v.T, atol=1e-12, rtol=0)
    # truncation: U1 m1' V1^T = P_U1 (U^ m1 V^^T) P_V1, the second moment non-negative
    big1 = torch.randn(2 * r, 2 * r, generator=gen, dtype=F64)
    big2 = torch.rand(2 * r, 2 * r, generator=gen, dtype=F64)
    sh = torch.randn(2 * r, 2 * r, generator=gen, dtype=F64)
    u1, _, v1, p_r, q_r = truncate(uh, sh, vh, Truncation(0.0, max_rank=CAP, pad=True),
                                   torch.tensor(min(kept, 2 * r)))
    dense = uh @ big1 @ vh.T
    torch.testing.assert_close(u1 @ carry(big1, p_r.T, q_r, "exp_avg", squared) @ v1.T,
                               u1 @ u1.T @ dense @ v1 @ v1.T, atol=1e-12, rtol=0)
    moved = carry(big2, p_r.T, q_r, "exp_avg_sq", squared)
    assert torch.all(moved >= 0)
    if not squared:  # the square-root transport is floored by the squared one
        assert torch.all(moved >= carry(big2, p_r.T, q_r, "exp_avg_sq", True))


# --------------------------------------------------------------------------
# the heavy ball's cycle
# --------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_cycle_core_steps_are_torch_sgd_on_the_core(nesterov):
    """Inside a cycle of core="momentum" the bases stay fixed and the core takes
    torch.optim.SGD's steps on autograd's dS, from the buffer the cycle's first step left."""
    k = 5
    layer = make_layer(2, seed=3)
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(M, N, generator=gen, dtype=F64)
    opt = DLRT(layer.parameters(), lr=0.1, integrator="parallel-bug", core="momentum", momentum=0.8,
               nesterov=nesterov, augment_every=k, tol=0.05)
    step_on(layer, opt, target)
    u0, s0, v0 = (t.detach().clone() for t in layer.manifold.unpack(layer.weight))
    core = s0.clone().requires_grad_(True)
    ref = torch.optim.SGD([core], lr=0.1, momentum=0.8, nesterov=nesterov)
    ref.state[core] = {"momentum_buffer": opt.state[layer.weight]["momentum_buffer"].clone()}
    for _ in range(k - 2):
        step_on(layer, opt, target)
        ref.zero_grad()
        (0.5 * ((u0 @ core @ v0.T - target) ** 2).sum()).backward()
        ref.step()
        u, s, v = layer.manifold.unpack(layer.weight.detach())
        assert torch.equal(u, u0) and torch.equal(v, v0)
        torch.testing.assert_close(s, core.detach(), atol=1e-12, rtol=0)
    step_on(layer, opt, target)  # the cycle's end: truncated to a diagonal core by tol
    s = layer.manifold.unpack(layer.weight.detach())[1]
    assert torch.equal(s, torch.diag_embed(torch.diagonal(s)))


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------
def planted(seed=0, batch=40):
    gen = torch.Generator().manual_seed(seed)
    w = orthonormal(M, 3, gen) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) @ orthonormal(N, 3, gen).T
    x = torch.randn(batch, N, generator=gen, dtype=F64)
    return x, x @ w.T


def train(layer, opt, x, y, steps, ranks=None):
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((layer(x) - y) ** 2).sum(-1).mean()).backward()
        opt.step()
        if ranks is not None:
            ranks.add(layer.active_rank)


# (the every-step tangent configurations need a small tol to grow the rank: a new direction's
# first coefficient is ~lr |G|, below 0.05 of ||S|| here)
ROUND_TRIPS = {
    "geometric-sgd": lambda l: GeometricSGD(l.parameters(), lr=0.1, momentum=0.8, tol=1e-3),
    "geometric-adam": lambda l: GeometricAdam(l.parameters(), lr=0.03, tol=1e-3),
    "geometric-adam-k3": lambda l: GeometricAdam(l.parameters(), lr=0.03, tol=0.05, augment_every=3),
    "parallel-momentum-k3": lambda l: DLRT(l.parameters(), lr=0.1, integrator="parallel-bug", core="momentum",
                                           momentum=0.8, tol=0.05, augment_every=3),
    "augmented-momentum-k3": lambda l: DLRT(l.parameters(), lr=0.1, integrator="augmented-bug", core="momentum",
                                            momentum=0.8, tol=0.05, augment_every=3, model=l),
    "augmented-adam-k3": lambda l: DLRT(l.parameters(), lr=0.03, integrator="augmented-bug", core="adam",
                                        decoupled_weight_decay=True, weight_decay=0.01, tol=0.05, augment_every=3,
                                        euclidean="adamw", model=l),
    "augmented-flow": lambda l: DLRT(l.parameters(), lr=0.1, integrator="augmented-bug", tol=0.05, model=l),
    "abc-psi-flow": lambda l: DLRT(l.parameters(), lr=0.1, integrator="abc-psi", tol=0.05, model=l),
    "parallel-flow": lambda l: DLRT(l.parameters(), lr=0.1, integrator="parallel-bug", tol=1e-3),
}


def fresh_layer():
    torch.manual_seed(2)
    return LowRankLinear(N, M, rank=2, max_rank=CAP, bias=True, dtype=F64)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_state_dict_round_trip_across_rank_changes_and_mid_cycle(name):
    x, y = planted()
    layer = fresh_layer()
    opt = ROUND_TRIPS[name](layer)
    ranks = {layer.active_rank}
    train(layer, opt, x, y, 7, ranks)  # 7 = 2 * 3 + 1: phase 1 of a cycle of 3
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    if "k3" in name:
        assert opt.state[layer.weight]["phase"] == 1
    train(layer, opt, x, y, 8, ranks)
    assert len(ranks) > 1, ranks  # the active rank changed
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    twin = fresh_layer()
    twin.load_state_dict(saved["model"])
    opt2 = ROUND_TRIPS[name](twin)
    opt2.load_state_dict(saved["opt"])
    train(twin, opt2, x, y, 8)
    for a, b in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for key, value in opt.state[layer.weight].items():
        other = opt2.state[twin.weight][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


#: The param-group keys of the optimizers before they were configurations of DLRT.
OLD_KEYS = {
    "geometric-sgd": {"lr", "momentum", "dampening", "nesterov", "weight_decay", "tol", "relative", "min_rank",
                      "fixed_rank"},
    "geometric-adam-k3": {"lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "m2_transport",
                          "perp_second_moment", "augment_every", "tol", "relative", "min_rank", "fixed_rank"},
    "augmented-adam-k3": {"lr", "integrator", "weight_decay", "euclidean", "momentum", "betas", "eps", "core",
                          "augment_every", "tol", "relative", "min_rank", "fixed_rank"},
}


@pytest.mark.parametrize("name", sorted(OLD_KEYS))
def test_checkpoints_without_the_family_keys_load(name):
    """A checkpoint saved before the family (its groups lack integrator, core, euclidean, ...)
    loads: the missing keys take the optimizer's defaults, and the run continues bitwise."""
    x, y = planted()
    layer = fresh_layer()
    opt = ROUND_TRIPS[name](layer)
    train(layer, opt, x, y, 4)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for key in set(g) - OLD_KEYS[name] - {"params"}:
            del g[key]
    twin = copy.deepcopy(layer)
    opt2 = ROUND_TRIPS[name](twin)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0].keys() == opt.param_groups[0].keys()
    train(layer, opt, x, y, 4)
    train(twin, opt2, x, y, 4)
    for a, b in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_geometric_adam_ties_ordinary_parameters_to_its_decay():
    layer = fresh_layer()
    groups = [{"params": [layer.weight]}, {"params": [layer.bias], "decoupled_weight_decay": True}]
    opt = GeometricAdam(groups, lr=0.01, weight_decay=0.1)
    assert [g["euclidean"] for g in opt.param_groups] == ["adam", "adamw"]
    assert all(g["integrator"] == "parallel-bug" and g["core"] == "adam" for g in opt.param_groups)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["euclidean"], g["core"], g["integrator"]
    opt.load_state_dict(sd)
    assert [g["euclidean"] for g in opt.param_groups] == ["adam", "adamw"]


# --------------------------------------------------------------------------
# the warning and the errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("core", ["flow", "momentum", "adam"])
def test_parallel_bug_needs_no_recorded_field(core):
    x, y = planted()
    layer = fresh_layer()
    opt = DLRT(layer.parameters(), lr=0.01, integrator="parallel-bug", core=core, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(layer, opt, x, y, 2)
    with pytest.warns(RuntimeWarning, match="no recorded"):  # augmented BUG does lose the normal part
        train(layer, DLRT(layer.parameters(), lr=0.01, integrator="augmented-bug", core=core), x, y, 1)


def test_refused_configurations():
    ps = lambda: fresh_layer().parameters()  # noqa: E731
    for core in ("momentum", "adam"):
        with pytest.raises(ValueError, match="abc-PSI"):
            DLRT(ps(), lr=0.1, integrator="abc-psi", core=core)
    with pytest.raises(ValueError, match="perp_second_moment"):
        DLRT(ps(), lr=0.1, integrator="augmented-bug", core="adam", perp_second_moment="scalar")
    with pytest.raises(ValueError, match="perp_second_moment"):
        DLRT(ps(), lr=0.1, integrator="parallel-bug", core="momentum", perp_second_moment="scalar")
    for make in (
        lambda: DLRT(ps(), lr=0.1, integrator="augmented-bug", core="momentum", augment_every=3, fixed_rank=True),
        lambda: GeometricAdam(ps(), augment_every=3, fixed_rank=True),
    ):
        with pytest.raises(ValueError, match="fixed_rank"):
            make()
    with pytest.raises(ValueError, match="augment_every"):
        DLRT(ps(), lr=0.1, integrator="parallel-bug", augment_every=3)  # core="flow"
    with pytest.raises(ValueError, match="m2_transport"):
        DLRT(ps(), lr=0.1, integrator="augmented-bug", core="adam", m2_transport="abs")
    with pytest.raises(ValueError, match="Nesterov"):
        DLRT(ps(), lr=0.1, core="flow", nesterov=True)


def test_options_that_would_do_nothing_are_refused():
    """An option whose configuration never reads it raises, naming it, before anything is added."""
    ps = lambda: fresh_layer().parameters()  # noqa: E731
    for core in ("flow", "momentum"):  # no second moment to transport
        with pytest.raises(ValueError, match="m2_transport='sqrt'.*core='adam'"):
            DLRT(ps(), lr=0.1, integrator="augmented-bug", core=core, m2_transport="sqrt")
    DLRT(ps(), lr=0.1, integrator="augmented-bug", core="adam", m2_transport="sqrt")  # where it does something
    with pytest.raises(ValueError, match="grad_rtol.*model="):
        DLRT(ps(), lr=0.1, grad_rtol=1e-3)
    layer = fresh_layer()
    DLRT(layer.parameters(), lr=0.1, grad_rtol=1e-3, model=layer)
    # a truncation option on a fixed-rank weight (tol raised before; min_rank and relative did nothing)
    fixed = LowRankLinear(N, M, rank=2, dtype=F64)
    for option in (dict(tol=0.1), dict(min_rank=2), dict(relative=False)):
        with pytest.raises(ValueError, match=f"{next(iter(option))}=.*fixed-rank"):
            DLRT(fixed.parameters(), lr=0.1, **option)
    # an edit of the group to such a value is refused at the next step, before anything is written
    opt = DLRT(ps(), lr=0.1, integrator="augmented-bug", core="momentum")
    opt.param_groups[0]["m2_transport"] = "sqrt"
    with pytest.raises(ValueError, match="param group 0.*m2_transport"):
        opt.step()


# --------------------------------------------------------------------------
# the coordinates of the augmentation
# --------------------------------------------------------------------------
CORES = {
    "GeometricSGD": lambda ps, model: GeometricSGD(ps, lr=0.1, momentum=0.9, tol=0.01),
    "GeometricAdam": lambda ps, model: GeometricAdam(ps, lr=1e-2, tol=0.01),
    "augmented-bug momentum": lambda ps, model: DLRT(ps, lr=0.1, integrator="augmented-bug", core="momentum",
                                                     tol=0.01, model=model),
    "augmented-bug adam": lambda ps, model: DLRT(ps, lr=1e-2, integrator="augmented-bug", core="adam", tol=0.01,
                                                 model=model),
}


def _trajectory(name, factors, cap, dtype, steps=3, record=True):
    """The dense weights of ``steps`` steps of ``CORES[name]`` from the active ``factors``
    (u, s, v) padded to capacity ``cap``, on a least-squares fit of a fixed batch (float64
    copies of the weights); ``record``: the layer is the optimizer's ``model=``."""
    u, s, v = factors
    r = s.shape[0]
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, v.shape[0], generator=g, dtype=F64), torch.randn(64, u.shape[0], generator=g, dtype=F64)
    layer = LowRankLinear(v.shape[0], u.shape[0], rank=r, max_rank=cap, bias=False, tol=0.01, dtype=dtype)
    pad = cap - r
    with torch.no_grad():
        layer.weight.copy_(torch.cat([_pad(u, 0, pad), _pad(s, pad, pad), _pad(v, 0, pad)]).to(dtype))
    opt = CORES[name](layer.parameters(), layer if record else None)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((layer(x.to(dtype)).to(F64) - y) ** 2).mean()).backward()
        opt.step()
        out.append(layer.dense_weight().detach().to(F64))
    return out


def _pad(a, rows, cols):
    return torch.nn.functional.pad(a, (0, cols, 0, rows))


def _point(seed, m=24, n=16, r=2):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
    return u, torch.diag(torch.linspace(1.5, 0.5, r, dtype=F64)), v


@pytest.mark.parametrize("name", list(CORES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_step_does_not_depend_on_the_capacitys_headroom(name, seed):
    """Two steps from a rank-2 point at capacity 8 (room for every augmented direction: rank
    <= 4, then <= 8) and at capacity 11: the same weights, to rounding. (With the zero columns
    of the padded basis inside the QR of [U, GV], Adam's steps used the arbitrary directions
    they became, and the weights differed by ~1e-4.)"""
    for a, b in zip(_trajectory(name, _point(seed), 8, F64, 2), _trajectory(name, _point(seed), 11, F64, 2)):
        assert float((a - b).norm() / a.norm()) < 1e-12


@pytest.mark.parametrize("name", list(CORES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_steps_follow_float64(name, seed):
    """Three steps from the same point in float32 and in float64 differ at float32's rounding
    level (observed <= 1e-6 relative), for every core. In augmented BUG's own coordinates
    orth[K_1, U], whose second block is known to a relative eps / h only, Adam's entrywise
    division made one step differ by 1.2e-2."""
    ref, low = _trajectory(name, _point(seed), 6, F64), _trajectory(name, _point(seed), 6, torch.float32)
    for a, b in zip(ref, low):
        assert float((a - b).norm() / a.norm()) < 1e-4


def test_augmented_bug_adam_without_a_recording_is_geometric_adam():
    """Without a recorded field augmented BUG's spans are those of the tangent augmentation
    and its Adam core sees -P_X G: the same steps as GeometricAdam, to rounding."""
    with pytest.warns(RuntimeWarning, match="no recorded"):
        aug = _trajectory("augmented-bug adam", _point(3), 6, F64, record=False)
    geo = _trajectory("GeometricAdam", _point(3), 6, F64)
    for a, b in zip(aug, geo):
        assert float((a - b).norm() / a.norm()) < 1e-12
