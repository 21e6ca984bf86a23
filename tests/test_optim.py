"""Tests of the geometry-aware and DLRT optimizers (lowrank_manifolds.optim).

Independent references: dense autograd gradients, the manifold's dense-formula-tested
projection and retraction, the integrators (their own dense tests), torch.optim.SGD /
Adam / AdamW, and an uninterrupted run for state_dict resumes.
"""
from __future__ import annotations

import copy
import io
import warnings

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.integrators import ABCPSI, AugmentedBUG, MatrixField, ParallelBUG, Truncation
from lowrank_manifolds.nn import LowRankAdapterLinear, LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, GradientRecorder
from lowrank_manifolds.optim._base import truncate

torch.set_num_threads(1)
F64 = torch.float64
M, N, CAP, R_TRUE = 20, 16, 6, 3


def planted_problem(seed=0, batch=200):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(M, R_TRUE, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(N, R_TRUE, generator=g, dtype=F64))
    w = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) @ v.T
    x = torch.randn(batch, N, generator=g, dtype=F64)
    return w, x, x @ w.T


def make_layer(seed=1, cap=CAP, bias=False):
    torch.manual_seed(seed)
    return LowRankLinear(N, M, rank=cap, bias=bias, max_rank=cap, dtype=F64)


def loss_fn(layer, x, y):
    return 0.5 * ((layer(x) - y) ** 2).sum(-1).mean()


OPTIMIZERS = {
    "geometric-sgd": lambda layer, tol: GeometricSGD(layer.parameters(), lr=0.05, momentum=0.8, tol=tol, fixed_rank=tol is None),
    # Adam's steps have size ~lr in every coefficient: its tolerance must sit above that
    # noise floor (1e-4 keeps spurious directions alive), hence 0.05 when adaptive.
    "geometric-adam": lambda layer, tol: GeometricAdam(
        layer.parameters(), lr=0.01, tol=None if tol is None else max(tol, 0.05), fixed_rank=tol is None
    ),
    "abc-psi": lambda layer, tol: DLRT(layer.parameters(), lr=0.2, integrator="abc-psi", tol=tol, fixed_rank=tol is None, model=layer),
    "augmented-bug": lambda layer, tol: DLRT(
        layer.parameters(), lr=0.2, integrator="augmented-bug", tol=tol, fixed_rank=tol is None, model=layer
    ),
    "parallel-bug": lambda layer, tol: DLRT(
        layer.parameters(), lr=0.2, integrator="parallel-bug", tol=tol, fixed_rank=tol is None, model=layer
    ),
}


def train(layer, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(layer, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def check_point(p, atol=1e-12):
    """Orthonormal active columns, exact zero padding, diagonal positive S."""
    mf = p.manifold
    u, s, v = mf.unpack(p.detach())
    r = int(p.manifold.active_rank(p))
    assert 1 <= r <= p.shape[-1]
    eye = torch.eye(r, dtype=p.dtype)
    assert torch.allclose(u[:, :r].T @ u[:, :r], eye, atol=atol)
    assert torch.allclose(v[:, :r].T @ v[:, :r], eye, atol=atol)
    assert torch.all(u[:, r:] == 0) and torch.all(v[:, r:] == 0)
    assert torch.all(s[r:, :] == 0) and torch.all(s[:, r:] == 0)
    d = torch.diagonal(s)[:r]
    assert torch.all(d > 0)
    assert torch.allclose(s, torch.diag(torch.diagonal(s)))
    return r


def check_states(opt, p, r):
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        t = opt.state[p].get(key)
        if t is None:
            continue
        assert t.shape == (p.shape[-1], p.shape[-1])
        assert torch.all(t[r:, :] == 0) and torch.all(t[:, r:] == 0), key
        assert torch.isfinite(t).all()
    if "exp_avg_sq" in opt.state[p]:
        assert torch.all(opt.state[p]["exp_avg_sq"] >= 0)


# --------------------------------------------------------------------------
# manifold invariants, descent and the planted rank
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_descent_invariants_and_planted_rank(name):
    _, x, y = planted_problem()
    layer = make_layer()
    opt = OPTIMIZERS[name](layer, 1e-4)
    ranks = []
    for _ in range(6):
        losses = train(layer, opt, x, y, 25)
        r = check_point(layer.weight)
        check_states(opt, layer.weight, r)
        ranks.append(r)
    first = float(loss_fn(make_layer(), x, y).detach())
    # Adam at a constant lr hovers at a noise floor ~ lr; the others converge linearly
    factor = 1e-2 if name == "geometric-adam" else 1e-4
    assert losses[-1] < factor * first, (name, first, losses[-1])
    assert ranks[-1] == R_TRUE, (name, ranks)


@pytest.mark.parametrize("name", ["geometric-sgd", "geometric-adam", "abc-psi"])
def test_fixed_rank_mode_keeps_rank(name):
    _, x, y = planted_problem()
    layer = make_layer()
    opt = OPTIMIZERS[name](layer, None)
    losses = train(layer, opt, x, y, 40)
    assert check_point(layer.weight) == CAP
    assert losses[-1] < losses[0]


def test_rank_grows_from_padded_start():
    """A capacity-6 point of active rank 1 grows to the planted rank 3."""
    _, x, y = planted_problem()
    layer = make_layer()
    with torch.no_grad():
        u, s, v = layer.manifold.unpack(layer.weight)
        u[:, 1:] = 0
        v[:, 1:] = 0
        s[1:, :] = 0
        s[:, 1:] = 0
    assert int(layer.weight.manifold.active_rank(layer.weight)) == 1
    # (not geometric Adam: its first step in a new direction has size ~lr, below the
    # truncation tolerance it needs, so it cannot grow the rank from 1; see docs)
    for name in ("geometric-sgd", "abc-psi", "augmented-bug", "parallel-bug"):
        lay = copy.deepcopy(layer)
        opt = OPTIMIZERS[name](lay, 1e-4)
        train(lay, opt, x, y, 150)
        assert check_point(lay.weight) == R_TRUE, name


# --------------------------------------------------------------------------
# agreement with independent references
# --------------------------------------------------------------------------
def constant_gradient_setup(seed=3, batch=7):
    """A loss linear in W: L = <C, x W^T>, so G = C^T x does not depend on W."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, generator=g, dtype=F64)
    c = torch.randn(batch, M, generator=g, dtype=F64)
    return x, c, c.T @ x


@pytest.mark.parametrize("cls", [ABCPSI, AugmentedBUG, ParallelBUG])
@pytest.mark.parametrize("tol", [None, 0.3])
@pytest.mark.parametrize("padded", [False, True])
def test_dlrt_step_equals_integrator_step(cls, tol, padded):
    x, c, g = constant_gradient_setup()
    layer = make_layer(cap=CAP)
    cap = CAP
    if padded:  # active rank 4 of capacity 6
        with torch.no_grad():
            u, s, v = layer.manifold.unpack(layer.weight)
            u[:, 4:] = 0
            v[:, 4:] = 0
            s[4:, :] = 0
            s[:, 4:] = 0
    r0 = int(layer.weight.manifold.active_rank(layer.weight))
    u0, s0, v0 = (t.detach().clone() for t in layer.manifold.unpack(layer.weight))
    name = {ABCPSI: "abc-psi", AugmentedBUG: "augmented-bug", ParallelBUG: "parallel-bug"}[cls]
    h = 0.37
    opt = DLRT(layer.parameters(), lr=h, integrator=name, tol=tol, fixed_rank=tol is None, model=layer)
    opt.zero_grad()
    (layer(x) * c).sum().backward()
    opt.step()
    if tol is None:
        trunc = Truncation(0.0, min_rank=r0, max_rank=r0)
    else:
        trunc = Truncation(tol, max_rank=cap, pad=True)
    integ = cls(truncation=trunc)
    u1, s1, v1 = integ.step(u0[:, :r0], s0[:r0, :r0], v0[:, :r0], MatrixField(-g), h)
    ref = u1 @ s1 @ v1.T
    got = layer.dense_weight().detach()
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    r1 = check_point(layer.weight)
    assert r1 == int(torch.linalg.matrix_rank(ref))


def test_parallel_bug_and_geometric_sgd_equal_projected_gradient_step():
    """With a constant G: X - h P_X G, truncated (the GeoLoRA step), from three routes."""
    x, c, g = constant_gradient_setup()
    h = 0.21
    layer = make_layer()
    mf = FixedRankManifold(M, N, CAP)
    x0 = layer.weight.detach().clone()
    ref = mf.to_dense(mf.retr(x0, -h * mf.proj_dense(x0, g)))
    for make in (
        lambda l: DLRT(l.parameters(), lr=h, integrator="parallel-bug", model=l),
        lambda l: GeometricSGD(l.parameters(), lr=h, momentum=0.0),
        lambda l: GeometricSGD(l.parameters(), lr=h, momentum=0.5),  # first step: buffer = gradient
    ):
        lay = copy.deepcopy(layer)
        opt = make(lay)
        opt.zero_grad()
        (lay(x) * c).sum().backward()
        opt.step()
        assert torch.allclose(lay.dense_weight().detach(), ref, atol=1e-12, rtol=0)


def test_geometric_adam_step_is_tangent():
    """With active rank 3 in capacity 6, X + xi (rank <= 6) fits: with tol=0 the
    Adam step is X - lr * D exactly, and D must be tangent (no normal part), even with
    eps so small that rounding-level coefficients would become unit steps."""
    x, c, g = constant_gradient_setup()
    layer = make_layer()
    with torch.no_grad():
        u, s, v = layer.manifold.unpack(layer.weight)
        u[:, 3:] = 0
        v[:, 3:] = 0
        s[3:, :] = 0
        s[:, 3:] = 0
    mf = FixedRankManifold(M, N, CAP)
    x0 = layer.weight.detach().clone()
    lr = 1e-3
    opt = GeometricAdam(layer.parameters(), lr=lr, eps=1e-30, tol=0.0)
    opt.zero_grad()
    (layer(x) * c).sum().backward()
    opt.step()
    check_point(layer.weight)
    dx = layer.dense_weight().detach() - mf.to_dense(x0)
    u, _, v = (t[:, :3] if t.shape[0] != CAP else t for t in mf.unpack(x0))
    normal = dx - u @ (u.T @ dx) - (dx @ v) @ v.T + u @ (u.T @ dx @ v) @ v.T
    assert normal.norm() < 1e-10 * dx.norm()
    # every coefficient of D has modulus <= 1 (first Adam step: D = g / |g|)
    assert dx.norm() <= lr * (4 * CAP * CAP) ** 0.5
    assert dx.norm() > 0.1 * lr


def test_truncation_transport_is_projection_onto_new_bases():
    g = torch.Generator().manual_seed(5)
    k, cap = 8, 5
    uh, _ = torch.linalg.qr(torch.randn(M, k, generator=g, dtype=F64))
    vh, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=F64))
    sh = torch.randn(k, k, generator=g, dtype=F64)
    mom = torch.randn(k, k, generator=g, dtype=F64)
    u1, s1, v1, p_r, q_r = truncate(uh, sh, vh, Truncation(0.0, max_rank=cap, pad=True), torch.tensor(3))
    assert torch.all(u1[:, 3:] == 0) and torch.all(s1[3:] == 0)
    dense = uh @ mom @ vh.T
    moved = u1 @ (p_r.T @ mom @ q_r) @ v1.T
    assert torch.allclose(moved, u1 @ u1.T @ dense @ v1 @ v1.T, atol=1e-12)
    # the truncated point is the best rank-3 approximation of uh sh vh^T
    sv = torch.linalg.svdvals(sh)
    err = (u1 @ s1 @ v1.T - uh @ sh @ vh.T).norm()
    assert abs(float(err) - float(sv[3:].norm())) < 1e-12


# --------------------------------------------------------------------------
# the recorded field
# --------------------------------------------------------------------------
def test_recorded_pair_equals_dense_gradient():
    torch.manual_seed(0)
    layer = LowRankLinear(N, M, rank=4, dtype=F64)
    adapter = LowRankAdapterLinear(nn.Linear(M, 9, dtype=F64), rank=3)
    model = nn.Sequential(layer, nn.Tanh(), adapter)
    rec = GradientRecorder(model)
    x = torch.randn(3, 5, N, dtype=F64)
    # dense twins with the same weights
    w1 = layer.dense_weight().detach().clone().requires_grad_(True)
    w2 = adapter.base.weight.detach() + adapter.manifold.to_dense(adapter.delta).detach()
    w2 = w2.clone().requires_grad_(True)

    def dense_forward(inp):
        h = torch.tanh(inp @ w1.T + layer.bias)
        return h @ w2.T + adapter.base.bias

    for _ in range(2):  # two backward passes accumulate, like .grad
        (model(x) ** 3).sum().backward()
        (dense_forward(x) ** 3).sum().backward()
    for param, w in ((layer.weight, w1), (adapter.delta, w2)):
        a, b = rec.pair(param)
        assert torch.allclose(a @ b.T, w.grad, atol=1e-12, rtol=1e-12)
        # consistent with autograd's factor gradient dS = U^T G V
        u, _, v = param.manifold.unpack(param.detach())
        ds = param.manifold.unpack(param.grad)[1]
        assert torch.allclose(u.T @ w.grad @ v, ds, atol=1e-12)
    # nothing recorded under no_grad / without backward; clear forgets
    rec.clear()
    with torch.no_grad():
        model(x)
    model(x)
    assert rec.pair(layer.weight) is None
    rec.remove()


def test_recorder_cleared_by_zero_grad_and_step():
    _, x, y = planted_problem()
    layer = make_layer()
    opt = DLRT(layer.parameters(), lr=0.1, model=layer)
    loss_fn(layer, x, y).backward()
    assert opt.recorder.pair(layer.weight) is not None
    opt.zero_grad()
    assert opt.recorder.pair(layer.weight) is None
    loss_fn(layer, x, y).backward()
    opt.step()
    assert opt.recorder.pair(layer.weight) is None


def test_dlrt_without_model_warns_and_uses_projected_gradient():
    x, c, g = constant_gradient_setup()
    h = 0.1
    layer = make_layer()
    ref = copy.deepcopy(layer)
    opt = DLRT(layer.parameters(), lr=h, integrator="abc-psi")  # parallel BUG needs no recording: no warning
    opt.zero_grad()
    (layer(x) * c).sum().backward()
    with pytest.warns(RuntimeWarning, match="no recorded") as caught:
        opt.step()
    assert caught[0].filename == __file__  # attributed to the line that called step()
    opt2 = DLRT(ref.parameters(), lr=h, integrator="parallel-bug", model=ref)
    (ref(x) * c).sum().backward()
    opt2.step()
    assert torch.allclose(layer.dense_weight(), ref.dense_weight(), atol=1e-12)


# --------------------------------------------------------------------------
# torch.optim conventions
# --------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.low = LowRankLinear(N, M, rank=CAP, max_rank=CAP, dtype=F64)
        self.dense = nn.Linear(M, 4, dtype=F64)

    def forward(self, x):
        return self.dense(torch.tanh(self.low(x)))


def make_opt(kind, net):
    groups = [
        {"params": [net.low.weight]},
        {"params": [net.low.bias, *net.dense.parameters()], "lr": 0.01},
    ]
    if kind == "sgd":
        return GeometricSGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, tol=0.5)
    if kind == "adam":
        return GeometricAdam(groups, lr=0.02, weight_decay=1e-2, decoupled_weight_decay=True, tol=0.5)
    return DLRT(groups, lr=0.2, integrator="abc-psi", tol=0.5, euclidean="adam", weight_decay=1e-3, model=net)


def net_data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, N, generator=g, dtype=F64)
    y = torch.randn(64, 4, generator=g, dtype=F64)
    return x, y


def net_steps(net, opt, x, y, steps, sched=None):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "dlrt"])
def test_state_dict_resume_reproduces_trajectory(kind):
    x, y = net_data()
    net = Net()
    opt = make_opt(kind, net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    net_steps(net, opt, x, y, 8, sched)
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    net_steps(net, opt, x, y, 12, sched)
    ranks = int(net.low.weight.manifold.active_rank(net.low.weight))

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    net2 = Net()
    net2.load_state_dict(saved["net"])
    opt2 = make_opt(kind, net2)
    opt2.load_state_dict(saved["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=5, gamma=0.5)
    sched2.load_state_dict(saved["sched"])
    net_steps(net2, opt2, x, y, 12, sched2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert int(net2.low.weight.manifold.active_rank(net2.low.weight)) == ranks < CAP  # the rank did change


def test_mixed_groups_euclidean_updates_match_torch():
    x, y = net_data()
    for kind, ref_cls, kwargs in (
        ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        ("adam", torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2)),
        ("dlrt", torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
    ):
        net = Net()
        ref = Net()
        opt = make_opt(kind, net)
        ref_opt = ref_cls([ref.low.bias, *ref.dense.parameters()], **kwargs)
        for _ in range(5):
            for model, o in ((net, opt), (ref, ref_opt)):
                o.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                o.step()
            # keep the low-rank weights equal so that the gradients agree
            with torch.no_grad():
                ref.low.weight.copy_(net.low.weight)
        for a, b in ((net.low.bias, ref.low.bias), (net.dense.weight, ref.dense.weight), (net.dense.bias, ref.dense.bias)):
            assert torch.allclose(a, b, atol=1e-13, rtol=1e-12), kind
        check_point(net.low.weight)


@pytest.mark.parametrize("case", [
    # (DLRT options, groups given as one or split with the dense lr, torch reference)
    (dict(lr=1.0), "one", torch.optim.Adam, dict(lr=1e-3)),  # flow core: h is not a rate
    (dict(lr=1.0), "split", torch.optim.Adam, dict(lr=0.02)),  # their own group: its lr
    (dict(lr=1.0, euclidean_lr=3e-3), "one", torch.optim.Adam, dict(lr=3e-3)),
    (dict(lr=0.02, integrator="augmented-bug", core="adam"), "one", torch.optim.Adam, dict(lr=0.02)),
    (dict(lr=0.02, integrator="augmented-bug", core="adam", decoupled_weight_decay=True, weight_decay=0.1),
     "one", torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1)),
    (dict(lr=0.05, integrator="augmented-bug", core="momentum", momentum=0.9), "one", torch.optim.SGD,
     dict(lr=0.05, momentum=0.9)),
    (dict(lr=1.0, euclidean="sgd", euclidean_lr=0.05), "one", torch.optim.SGD, dict(lr=0.05)),
])
def test_dlrt_ordinary_parameters_default_to_the_optimizer_of_the_core(case):
    """Without ``euclidean=``, ordinary parameters take Adam (AdamW with decoupled decay) beside
    the flow and Adam cores, SGD with the core's momentum beside the momentum core; beside a
    flow core's step size ``h`` their rate is Adam's default 1e-3 unless given. Reference:
    torch's optimizer on a copy with the same gradients."""
    options, layout, ref_cls, ref_kwargs = case

    def ours(net):
        dense = [net.low.bias, *net.dense.parameters()]
        groups = ([{"params": [net.low.weight]}, {"params": dense, "lr": ref_kwargs["lr"]}] if layout == "split"
                  else net.parameters())
        return DLRT(groups, tol=0.5, **options)

    x, y = net_data()
    net, ref = Net(), Net()
    opt = ours(net)
    ref_opt = ref_cls([ref.low.bias, *ref.dense.parameters()], **ref_kwargs)
    for _ in range(6):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # no model=: the projected gradient
                o.step()
        with torch.no_grad():  # keep the low-rank weights equal so that the gradients agree
            ref.low.weight.copy_(net.low.weight)
    for a, b in ((net.low.bias, ref.low.bias), (net.dense.weight, ref.dense.weight)):
        assert torch.allclose(a, b, atol=1e-13, rtol=1e-12), case


def test_old_dlrt_checkpoint_keeps_its_ordinary_parameters_rate():
    """A state dict saved before ``euclidean_lr`` (flow core, ``euclidean="sgd"``: the dense
    parameters stepped by SGD at the group's lr) resumes with that step."""
    x, y = net_data()
    net, ref = Net(), Net()
    opt = DLRT(net.parameters(), lr=0.3, tol=0.5, euclidean="sgd")
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["euclidean_lr"]
    fresh = DLRT(net.parameters(), lr=0.3, tol=0.5)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["euclidean"] == "sgd" and fresh.param_groups[0]["euclidean_lr"] == 0.3
    ref_opt = torch.optim.SGD([ref.low.bias, *ref.dense.parameters()], lr=0.3)
    for model, o in ((net, fresh), (ref, ref_opt)):
        o.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            o.step()
    assert torch.allclose(net.dense.weight, ref.dense.weight, atol=1e-14)


def test_lr_scheduler_controls_the_lowrank_step():
    _, x, y = planted_problem()
    for kind in OPTIMIZERS:
        layer = make_layer()
        opt = OPTIMIZERS[kind](layer, None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
        train(layer, opt, x, y, 1)
        sched.step()
        w = layer.dense_weight().detach().clone()
        train(layer, opt, x, y, 2)
        assert torch.allclose(layer.dense_weight().detach(), w, atol=1e-12), kind


def test_bad_hyperparameters_raise():
    layer = make_layer()
    ps = lambda: layer.parameters()  # noqa: E731
    bad = [
        lambda: GeometricSGD(ps(), lr=-1.0),
        lambda: GeometricSGD(ps(), lr=0.1, momentum=1.0),
        lambda: GeometricSGD(ps(), lr=0.1, momentum=0.0, nesterov=True),
        lambda: GeometricSGD(ps(), lr=0.1, tol=-0.1),
        lambda: GeometricSGD(ps(), lr=0.1, tol=float("nan")),
        lambda: GeometricSGD(ps(), lr=0.1, min_rank=0),
        lambda: GeometricAdam(ps(), lr=0.1, betas=(1.0, 0.9)),
        lambda: GeometricAdam(ps(), lr=0.1, betas=(0.9,)),
        lambda: GeometricAdam(ps(), lr=0.1, eps=-1e-8),
        lambda: GeometricAdam(ps(), lr=0.1, weight_decay=-1.0),
        lambda: DLRT(ps(), lr=0.1, integrator="ksl"),
        lambda: DLRT(ps(), lr=0.1, euclidean="rmsprop"),
        lambda: DLRT(ps(), lr=float("inf")),
        lambda: GeometricAdam(
            [geoopt.ManifoldParameter(geoopt.Sphere().random(3), manifold=geoopt.Sphere())], lr=0.1
        ),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()
    opt = GeometricAdam(ps(), lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -3.0})


# --------------------------------------------------------------------------
# capacity layers (max_rank), fixed-rank layers, convolutions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["geometric-sgd", "abc-psi", "augmented-bug", "parallel-bug"])
def test_capacity_layer_from_constructor_reaches_planted_rank(name):
    """Layers built with rank=1, max_rank=6 (no manual zeroing): the optimizers grow the
    active rank to the planted 3 with the manifold's padding convention, and stock geoopt
    can continue on the same weight."""
    _, x, y = planted_problem()
    torch.manual_seed(5)
    layer = LowRankLinear(N, M, rank=1, max_rank=CAP, tol=1e-4, bias=False, dtype=F64)
    assert layer.active_rank == 1
    opt = OPTIMIZERS[name](layer, 1e-4)
    train(layer, opt, x, y, 150)
    assert check_point(layer.weight) == R_TRUE == layer.active_rank
    ok, msg = layer.manifold._check_point_on_manifold(layer.weight.detach(), atol=1e-10, rtol=0)
    assert ok, msg
    rsgd = geoopt.optim.RiemannianSGD(layer.parameters(), lr=0.2)
    losses = train(layer, rsgd, x, y, 5)
    assert layer.active_rank == R_TRUE and losses[-1] <= losses[0] * (1 + 1e-9)


@pytest.mark.parametrize("name", ["geometric-sgd", "geometric-adam", "parallel-bug"])
def test_fixed_rank_layers_keep_their_rank_and_reject_tol(name):
    _, x, y = planted_problem()
    torch.manual_seed(6)
    layer = LowRankLinear(N, M, rank=4, bias=False, dtype=F64)  # no capacity
    assert not layer.manifold.adaptive and layer.capacity == 4
    opt = OPTIMIZERS[name](layer, None)
    losses = train(layer, opt, x, y, 30)
    assert losses[-1] < losses[0]
    assert check_point(layer.weight) == 4
    ok, msg = layer.manifold._check_point_on_manifold(layer.weight.detach(), atol=1e-10, rtol=0)
    assert ok, msg
    with pytest.raises(ValueError, match="max_rank"):
        OPTIMIZERS[name](layer, 1e-3)


CONV_CASES = [
    dict(stride=1, padding=1, dilation=1, padding_mode="zeros"),
    dict(stride=2, padding=0, dilation=1, padding_mode="zeros"),
    dict(stride=1, padding="same", dilation=2, padding_mode="zeros"),
    dict(stride=(2, 1), padding=(1, 2), dilation=1, padding_mode="reflect"),
    dict(stride=1, padding="same", dilation=1, padding_mode="circular"),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_recorded_conv_pair_equals_dense_gradient(case):
    from lowrank_manifolds.nn import LowRankConv2d

    torch.manual_seed(7)
    kernel = (3, 2) if case["padding"] != "same" else (3, 3)
    conv = LowRankConv2d(3, 5, kernel, rank=2, max_rank=4, dtype=F64, **case)
    rec = GradientRecorder(conv)
    dense = conv.to_dense_conv()
    kern = dense.weight
    xs = [torch.randn(2, 3, 7, 8, dtype=F64), torch.randn(3, 7, 8, dtype=F64)]  # batched + unbatched
    for x in xs:  # two calls per backward and two backward passes accumulate, like .grad
        c = torch.randn_like(conv(x))
        ((conv(x) * c).sum() + 0.5 * (conv(x) ** 2).sum()).backward()
        ((dense(x) * c).sum() + 0.5 * (dense(x) ** 2).sum()).backward()
    a, b = rec.pair(conv.weight)
    n_pos = sum(conv(x).shape[-1] * conv(x).shape[-2] * (x.shape[0] if x.dim() == 4 else 1) for x in xs)
    # two recorded calls per input (the forward inside randn_like had no backward)
    assert a.shape == (5, 2 * n_pos) and b.shape == (kern[0].numel(), 2 * n_pos)
    g = kern.grad.reshape(5, -1)
    assert torch.allclose(a @ b.T, g, atol=1e-12, rtol=1e-12)
    u, _, v = conv.manifold.unpack(conv.weight.detach())
    assert torch.allclose(u.T @ g @ v, conv.manifold.unpack(conv.weight.grad)[1], atol=1e-12)
    rec.remove()


def test_dlrt_uses_the_recorded_conv_pair():
    """With model= a conv gets the exact field (no warning); abc-PSI's step then equals the
    integrator on the dense gradient."""
    from lowrank_manifolds.nn import LowRankConv2d

    torch.manual_seed(8)
    conv = LowRankConv2d(3, 6, 3, rank=2, max_rank=4, padding=1, dtype=F64)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    c = torch.randn(2, 6, 5, 5, dtype=F64)
    dense = conv.to_dense_conv()
    (dense(x) * c).sum().backward()
    g = dense.weight.grad.reshape(6, -1)
    u0, s0, v0 = (t.detach().clone() for t in conv.manifold.unpack(conv.weight))
    opt = DLRT(conv.parameters(), lr=0.3, integrator="abc-psi", tol=0.1, model=conv)
    opt.zero_grad()
    (conv(x) * c).sum().backward()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    ref = ABCPSI(truncation=Truncation(0.1, max_rank=4, pad=True)).step(
        u0[:, :2], s0[:2, :2], v0[:, :2], MatrixField(-g), 0.3
    )
    assert torch.allclose(conv.dense_weight().detach(), ref[0] @ ref[1] @ ref[2].T, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------
# GeometricAdam at fixed rank on the completion problem of examples/matrix_problem.py
# --------------------------------------------------------------------------
def completion_problem(full):
    """60 x 50, rank 4, singular values 1, 0.3, 0.1, 0.03; half the entries observed (or
    all); start X0 = U0 (0.1 I) V0^T: the data and start of examples/matrix_problem.py."""
    m, n, r = 60, 50, 4
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    a = u @ torch.diag(torch.tensor([1.0, 0.3, 0.1, 0.03], dtype=F64)) @ v.T
    mask = (torch.rand(m, n, generator=g, dtype=F64) < 0.5).to(F64)
    g = torch.Generator().manual_seed(1)
    u0, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    v0, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    mf = FixedRankManifold(m, n, r)
    w = geoopt.ManifoldParameter(torch.cat([u0, 0.1 * torch.eye(r, dtype=F64), v0]), manifold=mf)
    return a, torch.ones_like(mask) if full else mask, mf, w


def completion_errors(opt, a, mask, mf, w, steps):
    errs = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((mask * (mf.to_dense(w) - a)) ** 2).sum()).backward()
        opt.step()
        errs.append(float((mf.to_dense(w).detach() - a).norm() / a.norm()))
    return errs


@pytest.mark.parametrize("transport", ["sqrt", "squared"])
def test_geometric_adam_converges_on_fully_observed_completion(transport):
    """Regression: the Up/Vp blocks of the augmented coefficient space are fresh basis
    directions at every step; with an entrywise second moment there (no history: the
    transported state is zero on them) their step was sign(g) * (1-b1)/sqrt(1-b2) ~ 3.2 lr
    whatever the gradient, and the error plateaued at 2e-2 (geoopt's RiemannianAdam,
    scalar second moment: 1e-13). Now they carry one scalar second moment each."""
    a, mask, mf, w = completion_problem(full=True)
    errs = completion_errors(GeometricAdam([w], lr=3e-3, m2_transport=transport, perp_second_moment="scalar"), a, mask, mf, w, 2000)
    assert errs[-1] < 1e-6, (transport, errs[999], errs[-1])
    assert max(errs) < 1.05


@pytest.mark.parametrize("transport", ["sqrt", "squared"])
@pytest.mark.parametrize("lr", [1e-2, 3e-2])
def test_geometric_adam_does_not_diverge_on_half_observed_completion(transport, lr):
    """50 % observed, fixed rank 4: before the fix every lr of 1e-3..3e-2 ended near 1.4
    (from 0.77 at best); now the error never rises above the start, and at lr 3e-2 it
    reaches 1e-6. The square-root transport of m2 at truncation used to cancel (|D| up to
    282 at lr 1e-2, error 2.99); at lr 1e-2 neither transport reaches 1e-6 in 2200 steps
    (0.15 and 0.18), which is the landscape's speed, not a defect."""
    a, mask, mf, w = completion_problem(full=False)
    errs = completion_errors(GeometricAdam([w], lr=lr, m2_transport=transport, perp_second_moment="scalar"), a, mask, mf, w, 2200)
    assert max(errs) < 1.05, (transport, lr, max(errs))
    if lr == 3e-2:
        assert min(errs) < 1e-6, (transport, lr, errs[-1])


def test_geometric_adam_rejects_unknown_m2_transport():
    with pytest.raises(ValueError):
        GeometricAdam([torch.zeros(3, requires_grad=True)], lr=0.1, m2_transport="abs")
    with pytest.raises(ValueError):
        GeometricAdam([torch.zeros(3, requires_grad=True)], lr=0.1, perp_second_moment="block")


def test_geometric_adam_default_entrywise_plateaus_on_fully_observed_completion():
    """Documents the default (the paper's entrywise second moment everywhere): its
    memoryless sign-like steps of ~3.2 lr in the Up/Vp blocks keep it at ~1e-2."""
    a, mask, mf, w = completion_problem(full=True)
    errs = completion_errors(GeometricAdam([w], lr=3e-3), a, mask, mf, w, 1500)
    assert 1e-3 < errs[-1] < 1e-1, errs[-1]


@pytest.mark.parametrize("cls", [ABCPSI, AugmentedBUG, ParallelBUG])
def test_dlrt_takes_integrator_instances_as_their_names(cls):
    name = {ABCPSI: "abc-psi", AugmentedBUG: "augmented-bug", ParallelBUG: "parallel-bug"}[cls]
    _, x, y = planted_problem()
    layers = [make_layer(), make_layer()]
    opts = [DLRT(layers[0].parameters(), lr=0.1, integrator=name, tol=0.1, model=layers[0]),
            DLRT(layers[1].parameters(), lr=0.1, integrator=cls(), tol=0.1, model=layers[1])]
    assert opts[1].param_groups[0]["integrator"] == name  # stored by name: state_dict stays plain
    for layer, opt in zip(layers, opts):
        for _ in range(3):
            opt.zero_grad()
            loss_fn(layer, x, y).backward()
            opt.step()
    assert torch.equal(layers[0].weight, layers[1].weight)
    with pytest.raises(ValueError, match="without a truncation"):
        DLRT(make_layer().parameters(), lr=0.1, integrator=cls(truncation=Truncation(0.1, max_rank=CAP)))
    with pytest.raises(TypeError, match="integrator must be"):
        DLRT(make_layer().parameters(), lr=0.1, integrator=object())


POLICY_OPTIMIZERS = {
    "geometric-sgd": lambda ps, **kw: GeometricSGD(ps, lr=0.05, momentum=0.8, **kw),
    "geometric-adam": lambda ps, **kw: GeometricAdam(ps, lr=0.01, **kw),
    "dlrt": lambda ps, **kw: DLRT(ps, lr=0.2, integrator="augmented-bug", **kw),
}


def _layer_with_tol(tol, rank=2):
    torch.manual_seed(3)
    return LowRankLinear(N, M, rank=rank, bias=False, max_rank=CAP, tol=tol, dtype=F64)


@pytest.mark.filterwarnings("ignore:DLRT. no recorded")
@pytest.mark.parametrize("name", sorted(POLICY_OPTIMIZERS))
def test_optimizers_truncate_by_the_weights_own_policy(name):
    """One truncation policy per weight: an optimizer without a group ``tol`` truncates by the
    layer's ``tol`` (the same steps, bitwise, as a group ``tol`` overriding a layer at 0), and
    ``fixed_rank`` keeps the active rank."""
    _, x, y = planted_problem()
    runs = {}
    for key, layer_tol, opts in (("layer", 0.3, {}), ("group", 0.0, {"tol": 0.3}), ("grow", 0.0, {}),
                                 ("fixed", 0.3, {"fixed_rank": True})):
        layer = _layer_with_tol(layer_tol)
        opt = POLICY_OPTIMIZERS[name](layer.parameters(), **opts)
        ranks = []
        for _ in range(6):
            opt.zero_grad()
            loss_fn(layer, x, y).backward()
            opt.step()
            ranks.append(layer.active_rank)
        runs[key] = (layer.weight.detach().clone(), ranks)
    assert torch.equal(runs["layer"][0], runs["group"][0]) and runs["layer"][1] == runs["group"][1]
    assert runs["fixed"][1] == [2] * 6
    assert max(runs["grow"][1]) == CAP  # tol 0 keeps every non-zero direction: the rank grows to the capacity
    assert runs["layer"][1] != runs["grow"][1]


@pytest.mark.parametrize("name", sorted(POLICY_OPTIMIZERS))
def test_deprecated_truncation_names_and_old_checkpoints(name):
    """``rank_tol`` / ``rank_relative`` (constructor and param groups) warn and mean ``tol`` /
    ``relative``; an old checkpoint (``rank_tol=None`` then kept the active rank) loads as
    ``fixed_rank=True``."""
    layer = _layer_with_tol(0.0)
    with pytest.warns(DeprecationWarning) as caught:
        opt = POLICY_OPTIMIZERS[name](layer.parameters(), rank_tol=0.2, rank_relative=False)
    assert sorted(str(w.message).split("argument ")[1].split("=")[0] for w in caught) == ["rank_relative", "rank_tol"]
    group = opt.param_groups[0]
    assert group["tol"] == 0.2 and group["relative"] is False and "rank_tol" not in group
    with pytest.warns(DeprecationWarning, match="rank_tol"):
        opt = POLICY_OPTIMIZERS[name]([{"params": layer.parameters(), "rank_tol": 0.1}])
    assert opt.param_groups[0]["tol"] == 0.1
    with pytest.raises(TypeError, match="tol"), pytest.warns(DeprecationWarning):
        POLICY_OPTIMIZERS[name](layer.parameters(), tol=0.1, rank_tol=0.1)
    opt = POLICY_OPTIMIZERS[name](layer.parameters())
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["rank_tol"], g["rank_relative"] = g.pop("tol"), g.pop("relative")
        del g["fixed_rank"]
    with pytest.warns(DeprecationWarning, match="rank_tol"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["fixed_rank"] is True and opt.param_groups[0]["tol"] is None
    with pytest.raises(ValueError, match="fixed_rank"):
        POLICY_OPTIMIZERS[name](layer.parameters(), tol=0.1, fixed_rank=True)


@pytest.mark.filterwarnings("ignore:DLRT. no recorded")
@pytest.mark.parametrize("name", ["dlrt-recorded", "dlrt", "geometric-adam", "geometric-sgd"])
def test_one_step_checks_shapes_once_and_computes_each_mask_once(name, monkeypatch):
    """The hot path: no packed-shape check in a step (done once when the weight joins a
    group), one active-mask computation per shape group, no integrator built, one field check."""
    from lowrank_manifolds.integrators import RankAdaptiveIntegrator, base

    counts = {"shape": 0, "mask": 0, "field": 0, "integrator": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(FixedRankManifold, "_check_packed", counting("shape", FixedRankManifold._check_packed))
    monkeypatch.setattr(FixedRankManifold, "active_mask", counting("mask", FixedRankManifold.active_mask))
    monkeypatch.setattr(base, "check_ambient", counting("field", base.check_ambient))
    monkeypatch.setattr(RankAdaptiveIntegrator, "__init__", counting("integrator", RankAdaptiveIntegrator.__init__))
    _, x, y = planted_problem()
    layers = [_layer_with_tol(0.1), _layer_with_tol(0.1, rank=3)]
    model = nn.Sequential(*layers)
    params = list(model.parameters())
    opt = {
        "dlrt-recorded": lambda: DLRT(params, lr=0.1, model=model),
        "dlrt": lambda: DLRT(params, lr=0.1),
        "geometric-adam": lambda: GeometricAdam(params, lr=1e-2),
        "geometric-sgd": lambda: GeometricSGD(params, lr=1e-2),
    }[name]()
    assert counts["shape"] == 2  # once per weight, at add_param_group
    lin = nn.Linear(M, N, bias=False, dtype=F64)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(lambda t: layers[1](lin(layers[0](t))), x, y).backward()
        for key in counts:
            counts[key] = 0
        opt.step()
        assert counts["shape"] == 0 and counts["integrator"] == 0
        # the two weights share a shape (and recorded pairs of one shape): stepped as one
        # batch, one mask, one field check
        assert counts["mask"] == 1
        assert counts["field"] == (1 if name.startswith("dlrt") else 0)


def _rank_one_start(seed=1):
    torch.manual_seed(seed)
    return LowRankLinear(N, M, rank=1, bias=False, max_rank=CAP, tol=0.01, dtype=F64)


def test_augment_every_cycle_core_steps_are_adam_on_the_core():
    """Inside a cycle the bases stay fixed and the core takes torch.optim.Adam's steps on
    autograd's dS (the reference: Adam on a plain core tensor in the same bases, started from
    the state the cycle's first step left); the cycle's last step truncates to a diagonal core."""
    k = 6
    _, x, y = planted_problem()
    layer = _rank_one_start()
    opt = GeometricAdam(layer.parameters(), lr=1e-2, augment_every=k)
    opt.zero_grad()
    loss_fn(layer, x, y).backward()
    opt.step()  # the cycle's augmentation
    u0, s0, v0 = (t.detach().clone() for t in layer.manifold.unpack(layer.weight))
    core = s0.clone().requires_grad_(True)
    ref = torch.optim.Adam([core], lr=1e-2)
    st = opt.state[layer.weight]
    ref.state[core] = {"step": torch.tensor(float(st["step"])), "exp_avg": st["exp_avg"].clone(),
                       "exp_avg_sq": st["exp_avg_sq"].clone()}
    for _ in range(k - 2):
        opt.zero_grad()
        loss_fn(layer, x, y).backward()
        opt.step()
        ref.zero_grad()
        (0.5 * ((x @ v0 @ core.T @ u0.T - y) ** 2).sum(-1).mean()).backward()
        ref.step()
        u, s, v = layer.manifold.unpack(layer.weight.detach())
        assert torch.equal(u, u0) and torch.equal(v, v0)
        torch.testing.assert_close(s, core.detach(), atol=1e-12, rtol=0)
    opt.zero_grad()
    loss_fn(layer, x, y).backward()
    opt.step()  # the cycle's end: truncation by the layer's policy
    s = layer.manifold.unpack(layer.weight.detach())[1]
    assert torch.equal(s, torch.diag_embed(torch.diagonal(s)))
    assert check_point(layer.weight) >= 1


@pytest.mark.parametrize("make", [
    lambda layer, k: GeometricAdam(layer.parameters(), lr=1e-2, augment_every=k),
    lambda layer, k: DLRT(layer.parameters(), lr=1e-2, integrator="augmented-bug", core="adam", augment_every=k,
                          model=layer),
], ids=["geometric-adam", "dlrt-adam"])
def test_augment_every_grows_the_rank_the_every_step_schedule_truncates(make):
    """From rank 1 with tol 0.01, augmenting and truncating at every step drops each new
    direction (its coefficients, ~lr, sit below the tolerance); the authors' cycle (augment
    every 10 steps, core steps in between) finds the planted rank-3 matrix."""
    w, x, y = planted_problem()
    errors = {}
    for k in (1, 10):
        layer = _rank_one_start()
        opt = make(layer, k)
        train(layer, opt, x, y, 400)
        errors[k] = (torch.linalg.matrix_norm(layer.dense_weight() - w) / torch.linalg.matrix_norm(w)).item()
        if k == 1:
            assert layer.active_rank == 1
        else:
            assert layer.active_rank >= R_TRUE
    assert errors[10] < 0.1 < 0.5 < errors[1]
    with pytest.raises(ValueError, match="fixed_rank"):
        GeometricAdam(layer.parameters(), augment_every=10, fixed_rank=True)
    with pytest.raises(ValueError, match="augment_every"):
        GeometricAdam(layer.parameters(), augment_every=0)
    with pytest.raises(ValueError, match="augment_every"):
        DLRT(layer.parameters(), lr=0.1, integrator="augmented-bug", augment_every=10)  # core="flow"


def test_dlrt_adam_core_first_steps_against_a_dense_reference():
    """``DLRT(integrator="augmented-bug", core="adam")``: augmented BUG's spans in the
    coordinates [U, orth((I - UU^T) GV)] x [V, orth((I - VV^T) G^T U)], Adam on the Galerkin
    coefficients of the dense float64 gradient (the QRs' triangles exact, the recorded normal
    block kept), moments embedded by zero padding and carried by the truncation's singular
    vectors; two steps against formulas on dense matrices. The spans are checked against the
    integrator's own orth[K_1, U]."""
    _, x, y = planted_problem()
    layer = _layer_with_tol(0.05)
    opt = DLRT(layer.parameters(), lr=0.02, integrator="augmented-bug", core="adam", model=layer)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.02
    m1 = m2 = None

    def pad(c):  # r x r coefficients of the old bases in the augmented ones
        return torch.nn.functional.pad(c, (0, c.shape[1], 0, c.shape[0]))

    def pos_qr(a):
        q, r = torch.linalg.qr(a)
        d = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(a.dtype)
        return q * d, r * d[:, None]

    for t in (1, 2):
        u, s, v = (z.detach().clone() for z in layer.manifold.unpack(layer.weight))
        r = int(layer.active_rank)
        u, s, v = u[:, :r], s[:r, :r], v[:, :r]
        w = (u @ s @ v.T).requires_grad_(True)
        loss_fn(lambda z: z @ w.T, x, y).backward()
        g = w.grad
        qu, ru = pos_qr(g @ v - u @ (u.T @ g @ v))
        qv, rv = pos_qr(g.T @ u - v @ (v.T @ g.T @ u))
        uh, vh = torch.cat([u, qu], 1), torch.cat([v, qv], 1)
        bug_u, _, bug_v = AugmentedBUG().augmented_step(u, s, v, MatrixField(-g), lr)
        torch.testing.assert_close(uh @ uh.T, bug_u @ bug_u.T, atol=1e-10, rtol=0)
        torch.testing.assert_close(vh @ vh.T, bug_v @ bug_v.T, atol=1e-10, rtol=0)
        gh = torch.cat([torch.cat([u.T @ g @ v, rv.T], 1), torch.cat([ru, qu.T @ g @ qv], 1)])
        m1 = (1 - b1) * gh if m1 is None else b1 * pad(m1) + (1 - b1) * gh
        m2 = (1 - b2) * gh**2 if m2 is None else b2 * pad(m2) + (1 - b2) * gh**2
        sh = pad(s) - lr / (1 - b1**t) * m1 / (torch.sqrt(m2 / (1 - b2**t)) + eps)
        p_, sv, qh = torch.linalg.svd(sh)
        k = int(truncation_rank_ref(sv, 0.05))
        w_ref = (uh @ p_[:, :k]) @ torch.diag(sv[:k]) @ (qh[:k].T.T @ vh.T)
        m1 = p_[:, :k].T @ m1 @ qh[:k].T
        m2 = (p_[:, :k] ** 2).T @ m2 @ (qh[:k].T ** 2)
        opt.zero_grad()
        loss_fn(layer, x, y).backward()
        opt.step()
        torch.testing.assert_close(layer.dense_weight().detach(), w_ref, atol=1e-10, rtol=0)
        assert layer.active_rank == k


def truncation_rank_ref(sv, tol):
    """The smallest rank whose discarded tail has norm <= tol * ||s|| (dense reference)."""
    total = torch.linalg.vector_norm(sv)
    for k in range(1, len(sv) + 1):
        if torch.linalg.vector_norm(sv[k:]) <= tol * total:
            return k
    return len(sv)


def test_dlrt_momentum_and_adam_cores_train_and_checkpoint():
    """The heavy-ball core grows the rank from 1 to the planted 3 and converges; the Adam core
    (whose steps are ~lr in every coefficient, so the tolerance must sit above that floor)
    trains from rank 3 as GeometricAdam does; both resume bit-identically from a checkpoint.
    abc-PSI is refused."""
    w, x, y = planted_problem()
    for core, lr, start, tol, bound in (("momentum", 0.1, 1, 0.01, 1e-6), ("adam", 1e-2, 3, 0.05, 0.05)):
        torch.manual_seed(1)
        layer = LowRankLinear(N, M, rank=start, bias=False, max_rank=CAP, tol=tol, dtype=F64)
        opt = DLRT(layer.parameters(), lr=lr, integrator="augmented-bug", core=core, momentum=0.9, model=layer)
        train(layer, opt, x, y, 150)
        twin = copy.deepcopy(layer)
        opt2 = DLRT(twin.parameters(), lr=lr, integrator="augmented-bug", core=core, momentum=0.9, model=twin)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf))
        train(layer, opt, x, y, 150)
        train(twin, opt2, x, y, 150)
        assert torch.equal(layer.weight, twin.weight)
        err = (torch.linalg.matrix_norm(layer.dense_weight() - w) / torch.linalg.matrix_norm(w)).item()
        assert err < bound and layer.active_rank == R_TRUE, (core, err, layer.active_rank)
    with pytest.raises(ValueError, match="augmented-bug"):  # parallel BUG's tangent bases are allowed now
        DLRT(layer.parameters(), lr=0.1, integrator="abc-psi", core="adam")
