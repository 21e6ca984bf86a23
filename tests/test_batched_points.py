"""A weight holding a batch of points steps each point as if it were its own weight.

The points of one batch may have different active ranks (a rank is data, a column mask);
every configuration of the optimizer family must then take, for each point, the step it
takes on that point alone. The reference is the same optimizer on single-point weights.
"""
from __future__ import annotations

import geoopt
import pytest
import torch

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD

F64 = torch.float64
M, N, CAP = 10, 8, 4
RANKS = (1, 2, 4)


def _configs():
    """Every distinct configuration that steps a low-rank weight from p.grad alone."""
    out = {
        "GeometricSGD": lambda ps, tol: GeometricSGD(ps, lr=0.3, momentum=0.9, tol=tol),
        "GeometricAdam": lambda ps, tol: GeometricAdam(ps, lr=0.05, tol=tol),
        "GeometricAdam-scalar": lambda ps, tol: GeometricAdam(ps, lr=0.05, tol=tol, perp_second_moment="scalar"),
    }
    for integrator in ("parallel-bug", "augmented-bug", "abc-psi"):
        cores = ("flow",) if integrator == "abc-psi" else ("flow", "momentum", "adam")
        for core in cores:
            for k in ((1,) if core == "flow" else (1, 3)):
                def make(ps, tol, integrator=integrator, core=core, k=k):
                    return DLRT(ps, lr=0.05 if core == "adam" else 0.3, integrator=integrator, core=core,
                                augment_every=k, tol=tol, momentum=0.9 if core == "momentum" else 0.0)
                out[f"DLRT-{integrator}-{core}-k{k}"] = make
    return out


CONFIGS = _configs()


def _points(seed):
    """Three points of capacity 4 with active ranks 1, 2, 4 and distinct singular values."""
    gen = torch.Generator().manual_seed(seed)
    manifold = FixedRankManifold(M, N, rank=1, max_rank=CAP, tol=0.05)
    packed = []
    for r in RANKS:
        u = torch.linalg.qr(torch.randn(M, r, generator=gen, dtype=F64))[0]
        v = torch.linalg.qr(torch.randn(N, r, generator=gen, dtype=F64))[0]
        s = torch.diag(torch.tensor([2.0, 1.3, 0.8, 0.5], dtype=F64)[:r])
        packed.append(manifold.pad(u, s, v))
    targets = torch.randn(len(RANKS), M, N, generator=gen, dtype=F64)
    return manifold, torch.stack(packed), targets


def _loss(manifold, x, target):
    u, s, v = manifold.unpack(x)
    return 0.5 * ((u @ s @ v.mT - target) ** 2).sum()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_batch_of_mixed_ranks_steps_each_point_as_its_own_weight(name):
    manifold, x0, targets = _points(0)
    batched = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    alone = [geoopt.ManifoldParameter(x0[i].clone(), manifold=manifold) for i in range(len(RANKS))]
    opt_b = CONFIGS[name]([batched], None)
    opt_a = CONFIGS[name](alone, None)
    for _ in range(4):
        for opt, params in ((opt_b, [batched]), (opt_a, alone)):
            opt.zero_grad()
            if params is alone:
                sum(_loss(manifold, p, t) for p, t in zip(alone, targets)).backward()
            else:
                _loss(manifold, batched, targets).backward()
            opt.step()
        for i, p in enumerate(alone):
            ub, sb, vb = manifold.unpack(batched.detach()[i])
            ua, sa, va = manifold.unpack(p.detach())
            assert torch.equal(manifold.active_mask(ub), manifold.active_mask(ua)), (name, i)
            err = (ub @ sb @ vb.mT - ua @ sa @ va.mT).abs().max()
            assert err < 1e-12, (name, i, float(err))


@pytest.mark.parametrize("name", ["augmented-bug", "parallel-bug", "abc-psi"])
def test_integrators_step_padded_points_as_their_active_factors(name):
    """``augmented_step(..., active=mask)`` on a batch of padded points (ranks 1, 2, 4 in
    capacity 4) with a general constant field (not tangent: it has components on every
    direction) equals, point by point, the step of the active factors alone, and its core
    is exactly zero beyond each point's 2r augmented directions."""
    from lowrank_manifolds.integrators import INTEGRATORS, MatrixField

    manifold, x0, _ = _points(1)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(len(RANKS), M, 3, generator=gen, dtype=F64)
    b = torch.randn(len(RANKS), N, 3, generator=gen, dtype=F64)
    integrator = INTEGRATORS[name]()
    u, s, v = manifold.unpack(x0)
    active = manifold.active_mask(u) > 0
    U1, S1, V1 = integrator.augmented_step(u, s, v, MatrixField((a, b)), 0.3, active=active)
    for i, r in enumerate(RANKS):
        u_i, s_i, v_i = integrator.augmented_step(u[i, :, :r], s[i, :r, :r], v[i, :, :r],
                                                  MatrixField((a[i], b[i])), 0.3)
        y_alone = u_i @ s_i @ v_i.mT
        y_batched = U1[i] @ S1[i] @ V1[i].mT
        assert (y_batched - y_alone).abs().max() < 1e-12, (i, r)
        assert torch.count_nonzero(S1[i, 2 * r:]) == 0 and torch.count_nonzero(S1[i, :, 2 * r:]) == 0
        sv_b = torch.linalg.svdvals(S1[i])[: min(2 * r, CAP * 2)]
        sv_a = torch.linalg.svdvals(s_i)
        assert torch.allclose(sv_b[: sv_a.numel()], sv_a, atol=1e-12)
    with pytest.raises(TypeError, match="boolean"):
        integrator.augmented_step(u, s, v, MatrixField((a, b)), 0.3, active=active.to(F64))
    with pytest.raises(ValueError, match="shape"):
        integrator.augmented_step(u, s, v, MatrixField((a, b)), 0.3, active=active[..., :2])


def _mixed_model(seed):
    """Three shape groups: three capacity-4 layers of active ranks 1, 2, 4, a fixed-rank-3
    layer of the same shape, and a lone layer of another shape; plus a dense layer."""
    from lowrank_manifolds.nn import LowRankLinear

    torch.manual_seed(seed)
    layers = [LowRankLinear(N, M, rank=r, max_rank=CAP, tol=0.05, dtype=F64) for r in RANKS]
    layers += [LowRankLinear(N, M, rank=3, dtype=F64), LowRankLinear(M, 6, rank=2, max_rank=3, tol=0.05, dtype=F64),
               torch.nn.Linear(N, 5, dtype=F64)]
    return torch.nn.ModuleList(layers)


def _run(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        for i, layer in enumerate(model):
            x = torch.randn(16, layer.in_features, generator=gen, dtype=F64)
            y = torch.randn(16, layer.out_features, generator=gen, dtype=F64)
            if i == 1 and len(out) % 3 == 2:
                continue  # this weight sometimes has no gradient
            loss = loss + ((layer(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


#: Adam on augmented BUG's coefficients (every block, some near zero) divides rounding-level
#: differences by sqrt(v) + eps: batched and per-weight products round differently, and over 12
#: steps the runs part by 1.1e-11 (k = 1) and 1.3e-13 (k = 3), measured; a 1-ulp change of one
#: target entry moves the per-weight run itself by 3.6e-13 and 2.7e-13. Every other
#: configuration agrees to 2.5e-14.
_TOLERANCE = {"DLRT-augmented-bug-adam-k1": 1e-9, "DLRT-augmented-bug-adam-k3": 1e-9}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_step_equals_the_per_weight_loop(name):
    """foreach (default): the weights of a shape group step as one batch; foreach=False: one
    by one. 12 steps with ranks moving, a weight that sometimes has no gradient, a fixed-rank
    weight beside capacity ones of its shape, a lone shape and a dense layer: equal to 1e-12,
    and the state_dict of one resumes the other."""
    import copy

    runs = {}
    for foreach in (None, False):
        model = _mixed_model(3)
        make = CONFIGS[name]
        opt = make(model.parameters(), None)
        for g in opt.param_groups:
            g["foreach"] = foreach
        runs[foreach] = (_run(model, opt, 12, 4), model, opt)
    (a, model_a, opt_a), (b, model_b, opt_b) = runs[None], runs[False]
    tol = _TOLERANCE.get(name, 1e-12)
    for t, (pa, pb) in enumerate(zip(a, b)):
        for x, y in zip(pa, pb):
            assert (x - y).abs().max() < tol, (name, t)
    for (ka, va), (kb, vb) in zip(opt_a.state_dict()["state"].items(), opt_b.state_dict()["state"].items()):
        for key in va:
            if torch.is_tensor(va[key]):
                assert (va[key] - vb[key]).abs().max() < tol * max(1.0, float(vb[key].abs().max())), (name, ka, key)
                assert va[key].untyped_storage().nbytes() == va[key].numel() * va[key].element_size()
            else:
                assert va[key] == vb[key]
    # a grouped run resumes from the per-weight run's checkpoint and continues identically
    model_c = copy.deepcopy(model_b)
    opt_c = CONFIGS[name](model_c.parameters(), None)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for g in opt_b.param_groups:
        g["foreach"] = False
    for g in opt_c.param_groups:
        g["foreach"] = None
    for x, y in zip(_run(model_b, opt_b, 3, 5)[-1], _run(model_c, opt_c, 3, 5)[-1]):
        assert (x - y).abs().max() < tol, name


def _recorded_configs():
    """Every configuration that takes a recorded field (``model=``): abc-PSI and augmented BUG."""
    out = {"abc-psi-flow-k1": dict(integrator="abc-psi")}
    for core in ("flow", "momentum", "adam"):
        for k in ((1,) if core == "flow" else (1, 3)):
            out[f"augmented-bug-{core}-k{k}"] = dict(integrator="augmented-bug", core=core, augment_every=k,
                                                     momentum=0.9 if core == "momentum" else 0.0)
    return out


RECORDED = _recorded_configs()


@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_weights_step_as_one_batch_as_one_by_one(name):
    """Recorded weights whose pairs have one shape are stepped as one batch (their fields built,
    and checked against p.grad, on the stacked point): equal to the per-weight loop over 12 steps
    with ranks 1, 2 and 4 moving inside one capacity, a fixed-rank weight of the same shape, a
    lone shape, a weight that sometimes has no gradient and a dense layer."""
    options = RECORDED[name]
    lr = 0.05 if options.get("core") == "adam" else 0.3
    runs = {}
    for foreach in (None, False):
        model = _mixed_model(3)
        opt = DLRT(model.parameters(), lr=lr, model=model, foreach=foreach, **options)
        runs[foreach] = _run(model, opt, 12, 4)
        ranks = [layer.active_rank for layer in model if hasattr(layer, "active_rank")]
        runs[foreach] = (runs[foreach], ranks)
    (a, ranks_a), (b, ranks_b) = runs[None], runs[False]
    assert ranks_a == ranks_b, (ranks_a, ranks_b)  # from 1, 2, 4 (the first steps are at mixed ranks)
    tol = 1e-9 if options.get("core") == "adam" else 1e-12  # Adam's eps amplifies rounding (above)
    for t, (pa, pb) in enumerate(zip(a, b)):
        for x, y in zip(pa, pb):
            assert (x - y).abs().max() < tol, (name, t, float((x - y).abs().max()))


def test_a_refused_gradient_edit_in_a_recorded_batch_names_its_weight():
    model = _mixed_model(5)
    opt = DLRT(model.parameters(), lr=0.3, model=model)
    gen = torch.Generator().manual_seed(0)
    opt.zero_grad()
    sum(((layer(torch.randn(16, layer.in_features, generator=gen, dtype=F64))) ** 2).mean() for layer in model).backward()
    model[1].weight.grad.add_(1e-3 * torch.randn_like(model[1].weight.grad))  # not a uniform scaling
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"shape \(22, 4\)"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))


def test_foreach_must_be_none_or_a_bool():
    manifold, x0, _ = _points(0)
    with pytest.raises(ValueError, match="foreach"):
        GeometricAdam([geoopt.ManifoldParameter(x0.clone(), manifold=manifold)], lr=0.1, foreach="yes")
