"""Faults and training-loop contracts of the optimizers: a non-finite gradient raises before
anything is written (every parameter and state tensor compared bitwise), GradScaler skips
such steps, checkpoints with non-finite state are refused at load, torch.compile runs our
steps eagerly, and functional_call works with the layers' packed weights.

References: the same run without the fault (bitwise), torch.optim's own GradScaler
protocol, and the eager step for the compiled one.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from lowrank_manifolds.nn import LowRankAdapterLinear, LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, LoRAPreAdam

torch.set_num_threads(1)
F64 = torch.float64

OPTIMIZERS = {
    "geometric-sgd": lambda m: GeometricSGD(m.parameters(), lr=0.05, momentum=0.9),
    "geometric-adam": lambda m: GeometricAdam(m.parameters(), lr=0.01),
    "dlrt-recorded": lambda m: DLRT(m.parameters(), lr=0.1, tol=0.1, euclidean="adam", model=m),
    "lora-pre": lambda m: LoRAPreAdam(m.parameters(), lr=0.01, rank=2),
}


def make_model(name, dtype=F64):
    torch.manual_seed(0)
    if name == "lora-pre":
        return nn.Sequential(nn.Linear(6, 8, dtype=dtype), nn.Tanh(), nn.Linear(8, 5, dtype=dtype))
    return nn.Sequential(
        nn.Linear(6, 8, dtype=dtype), nn.Tanh(), LowRankLinear(8, 5, rank=2, max_rank=3, dtype=dtype)
    )


def data(dtype=F64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 5, generator=g, dtype=dtype)


def backward(model, opt, x, y, scale=1.0):
    opt.zero_grad()
    (scale * ((model(x) - y) ** 2).mean()).backward()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters())}
    return params, state


def assert_bitwise_equal(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for k in sa[i]:
            if torch.is_tensor(sa[i][k]):
                assert torch.equal(sa[i][k], sb[i][k]), (i, k)
            else:
                assert sa[i][k] == sb[i][k], (i, k)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("where", [0, 2])  # the dense weight; the low-rank (or last) weight
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_gradient_raises_before_anything_is_written(name, where, value):
    x, y = data()
    model, twin = make_model(name), make_model(name)
    opt, twin_opt = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            backward(m, o, x, y)
            o.step()
    before = snapshot(model, opt)
    backward(model, opt, x, y)
    params = list(model.parameters())
    bad = params[where]
    bad.grad.view(-1)[0] = value
    with pytest.raises(FloatingPointError, match=re.escape(f"parameter {where} of param group 0 (shape {tuple(bad.shape)})")):
        opt.step()
    assert_bitwise_equal(snapshot(model, opt), before)
    # the next clean step trains, exactly as if the fault had not happened
    for m, o in ((model, opt), (twin, twin_opt)):
        backward(m, o, x, y)
        o.step()
    assert_bitwise_equal(snapshot(model, opt), snapshot(twin, twin_opt))
    assert not all(torch.equal(a, b) for a, b in zip(before[0], snapshot(model, opt)[0]))


@pytest.mark.parametrize("name", ["geometric-sgd", "geometric-adam", "dlrt-flow"])
@pytest.mark.parametrize("where", [1, 2])  # a weight inside a shape group of three; the last one
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_gradient_in_a_shape_group_names_its_weight(name, where, value):
    """A shape group's gradients are checked as one stacked tensor: the error still names the
    weight whose gradient is not finite, and nothing of the group (or any other) is written."""
    make = dict(OPTIMIZERS, **{"dlrt-flow": lambda m: DLRT(m.parameters(), lr=0.1, tol=0.1)})[name]
    torch.manual_seed(0)
    model = nn.Sequential(*(LowRankLinear(6, 6, rank=2, max_rank=3, dtype=F64) for _ in range(3)))
    opt = make(model)
    x = torch.randn(16, 6, dtype=F64)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    before = snapshot(model, opt)
    opt.zero_grad()
    model(x).square().mean().backward()
    bad = list(model.parameters())[where]
    bad.grad.view(-1)[3] = value
    with pytest.raises(FloatingPointError, match=re.escape(f"parameter {where} of param group 0 ")):
        opt.step()
    assert_bitwise_equal(snapshot(model, opt), before)


def test_check_finite_can_be_switched_off():
    x, y = data()
    model = nn.Linear(6, 5, dtype=F64)
    opt = GeometricAdam(model.parameters(), lr=0.01)
    opt.check_finite = False
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model.bias.grad[0] = math.nan
    opt.step()  # no check: the NaN goes through, as in torch.optim.Adam
    assert torch.isnan(model.bias.detach()[0])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradscaler_clean_steps_equal_unscaled_and_inf_step_is_skipped(name):
    x, y = data(torch.float32)
    model, ref = make_model(name, torch.float32), make_model(name, torch.float32)
    opt, ref_opt = OPTIMIZERS[name](model), OPTIMIZERS[name](ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        backward(ref, ref_opt, x, y)
        ref_opt.step()
    # a power-of-two scale is exact: the scaled run is the unscaled one
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-6), name
    before = snapshot(model, opt)
    opt.zero_grad()
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    list(model.parameters())[-1].grad.view(-1)[0] = math.inf
    scaler.step(opt)  # skipped: GradScaler found the inf
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert_bitwise_equal(snapshot(model, opt), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_rejects_nonfinite_state_by_name(name):
    x, y = data()
    model = make_model(name)
    opt = OPTIMIZERS[name](model)
    backward(model, opt, x, y)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    index, key = next((i, k) for i, st in sd["state"].items() for k, v in st.items()
                      if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 0)
    sd["state"][index][key].view(-1)[0] = math.nan
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"state '{key}' of parameter {index} of param group 0"):
        opt.load_state_dict(sd)
    assert_bitwise_equal(snapshot(model, opt), before)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
def _compile_available():
    try:
        torch.compile(lambda t: t + 1, backend="eager")(torch.zeros(1))
        return True
    except Exception:  # pragma: no cover - depends on the build
        return False


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available in this build")
@pytest.mark.parametrize("name", ["geometric-sgd", "geometric-adam", "dlrt-recorded"])
def test_compiled_step_equals_eager_and_stays_on_the_manifold(name):
    """Inside a compiled frame isinstance(p, ManifoldParameter) is False; our step runs
    eagerly (a graph break), so the compiled call is the eager step (geoopt's
    RiemannianAdam, compiled the same way, takes a Euclidean step: |dW| 1.5)."""
    x, y = data(torch.float32)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model(name, torch.float32)
        opt = OPTIMIZERS[name](model)
        step = torch.compile(lambda: opt.step(), backend="eager") if compiled else opt.step
        for _ in range(3):
            backward(model, opt, x, y)
            step()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-5)
    layer = runs[1][2]
    u, _, v = layer.manifold.unpack(layer.weight.detach())
    r = layer.manifold.active_rank(layer.weight)
    eye = torch.eye(int(r))
    assert torch.allclose(u[:, :r].T @ u[:, :r], eye, atol=1e-5)
    assert torch.allclose(v[:, :r].T @ v[:, :r], eye, atol=1e-5)


def test_lowrank_parameters_are_recognised_by_their_manifold_attribute():
    from lowrank_manifolds.optim import is_lowrank_parameter

    layer = LowRankLinear(4, 3, rank=2)
    plain = layer.weight.detach().clone()
    assert is_lowrank_parameter(layer.weight) and not is_lowrank_parameter(plain)
    plain.manifold = layer.manifold  # what survives tracing
    assert is_lowrank_parameter(plain)


# --------------------------------------------------------------------------
# paths where the parameter loses its manifold
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "adaptive", "adapter"])
def test_functional_call_with_plain_packed_tensors(kind):
    torch.manual_seed(0)
    if kind == "adapter":
        layer = LowRankAdapterLinear(nn.Linear(5, 4, dtype=F64), rank=2)
        name = "delta"
    else:
        layer = LowRankLinear(5, 4, rank=2, max_rank=3 if kind == "adaptive" else None, dtype=F64)
        name = "weight"
    x = torch.randn(3, 5, dtype=F64)
    point = getattr(layer, name)
    params = {k: torch.Tensor(v.detach().clone()) for k, v in layer.named_parameters()}
    assert not hasattr(params[name], "manifold")
    out = torch.func.functional_call(layer, params, (x,))
    assert torch.equal(out, layer(x))
    # gradients through the substituted tensor equal those through the parameter
    params[name].requires_grad_(True)
    torch.func.functional_call(layer, params, (x,)).sum().backward()
    layer(x).sum().backward()
    assert torch.allclose(params[name].grad, point.grad, rtol=0, atol=1e-14)
    params[name] = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(TypeError, match=rf"the {name} of this {type(layer).__name__} is a Tensor of shape \(2, 2\)"):
        torch.func.functional_call(layer, params, (x,))


# --------------------------------------------------------------------------
# finite gradients too large for a step's values
# --------------------------------------------------------------------------
F32 = torch.float32
HUGE = {
    **OPTIMIZERS,  # dlrt-recorded: abc-PSI
    "geometric-adam-k3": lambda m: GeometricAdam(m.parameters(), lr=0.01, augment_every=3),
    "dlrt-augmented-flow": lambda m: DLRT(m.parameters(), lr=0.1, integrator="augmented-bug", model=m),
    "dlrt-augmented-momentum": lambda m: DLRT(m.parameters(), lr=0.05, integrator="augmented-bug", core="momentum",
                                              momentum=0.9, model=m),
    "dlrt-augmented-adam": lambda m: DLRT(m.parameters(), lr=0.01, integrator="augmented-bug", core="adam",
                                          euclidean="adam", model=m),
    "lora-pre-reconstruction": lambda m: LoRAPreAdam(m.parameters(), lr=0.01, rank=2, current_gradient=False),
}


def scaled_backward(model, opt, x, y, magnitude):
    """A backward pass whose gradients are scaled uniformly (as GradScaler's, which the recorded
    field accepts) so that their largest entry is ``magnitude``."""
    backward(model, opt, x, y)
    scale = magnitude / max(float(p.grad.abs().max()) for p in model.parameters())
    for p in model.parameters():
        p.grad.copy_((p.grad.double() * scale).to(p.grad.dtype))


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e38])
@pytest.mark.parametrize("name", list(HUGE))
def test_a_finite_gradient_never_makes_a_weight_or_state_nonfinite(name, magnitude):
    """float32. Before: 1e30 put inf into GeometricAdam's exp_avg_sq and NaN into the weight one
    step later, stalled augmented BUG + Adam into an SVD error, and LoRAPreAdam made NaN
    weights. Now each step (the huge one, then an ordinary one) is either taken with every
    weight and state finite, or refused by FloatingPointError with all of them bitwise as
    before. 1e20, whose (1 - beta2) g^2 float32 holds, is taken (torch.optim.Adam takes it)."""
    x, y = data(F32)
    model = make_model(name.split("-reconstruction")[0], F32)
    opt = HUGE[name](model)
    for _ in range(2):
        backward(model, opt, x, y)
        opt.step()
    for huge in (True, False):
        if huge:
            scaled_backward(model, opt, x, y, magnitude)
        else:
            backward(model, opt, x, y)
        before = snapshot(model, opt)
        try:
            opt.step()
        except FloatingPointError:
            assert not (huge and magnitude == 1e20)
            assert_bitwise_equal(snapshot(model, opt), before)
            continue
        params, states = snapshot(model, opt)
        assert all(bool(torch.isfinite(p).all()) for p in params)
        assert all(bool(torch.isfinite(v).all()) for s in states.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("ours, torchs, refused_at", [
    (lambda ps: GeometricAdam(ps, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01), 1e30),
    (lambda ps: DLRT(ps, lr=0.01, euclidean="adamw", weight_decay=0.1),
     lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), 1e30),
    (lambda ps: GeometricSGD(ps, lr=0.01, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), None),
], ids=["adam", "adamw", "sgd"])
def test_an_ordinary_parameter_with_a_huge_gradient_steps_as_torch_or_is_refused(ours, torchs, refused_at):
    """Above sqrt(float max)/2 an ordinary parameter's step is taken on copies and checked:
    where torch's values are finite it is torch's, bitwise (Adam at 1e20, SGD up to 3e38); where
    torch.optim.Adam's exp_avg_sq becomes inf (from 1e30 on) it is refused, nothing changed."""
    gen = torch.Generator().manual_seed(0)
    model = nn.ParameterList([nn.Parameter(torch.randn(5, 4, generator=gen))])
    w, ref = model[0], nn.Parameter(model[0].detach().clone())
    opt, ref_opt = ours([w]), torchs([ref])
    for magnitude in (1.0, 1.0, 1e20, 1e30, 3e38):
        g = torch.randn(5, 4, generator=gen)
        w.grad, ref.grad = g * (magnitude / g.abs().max()), g * (magnitude / g.abs().max())
        before = snapshot(model, opt)
        ref_opt.step()
        if magnitude == refused_at:
            assert not bool(torch.isfinite(ref_opt.state[ref]["exp_avg_sq"]).all())  # torch's inf
            with pytest.raises(FloatingPointError, match=r"parameter 0 of param group 0 .* would make its "
                                                          r"state 'exp_avg_sq' non-finite"):
                opt.step()
            assert_bitwise_equal(snapshot(model, opt), before)
            return
        opt.step()
        assert torch.equal(w, ref)
        for key, value in ref_opt.state[ref].items():
            assert torch.equal(opt.state[w][key], value), key
    assert refused_at is None


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
@pytest.mark.parametrize("current", [True, False])
def test_lora_pre_factored_moments_step_through_a_huge_gradient_as_in_float64(current, magnitude):
    """LoRAPreAdam's factored "abs" moments hold |g|-sized values, so float32 can take the step of
    a 1e30 gradient; the squares on the way (the denominator's beta2 s^2 + (1 - beta2) g^2, the
    solves' shift) are formed after an exact power-of-two scaling. The float32 run follows the
    float64 one (the reference, far from overflow) to 2.7e-5 of the update (measured), where
    the squares before the scaling gave NaN weights."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 10, generator=gen, dtype=F64)
    grads = [torch.randn(12, 10, generator=gen, dtype=F64) for _ in range(6)]
    updates = []
    for dtype in (F64, F32):
        w = nn.Parameter(w0.to(dtype, copy=True))
        opt = LoRAPreAdam([w], lr=0.01, rank=3, current_gradient=current)
        for i, g in enumerate(grads):
            w.grad = (g * ((magnitude if i == 3 else 1.0) / g.abs().max())).to(dtype)
            opt.step()
        updates.append(w.detach().double() - w0)
    assert bool(torch.isfinite(updates[1]).all())
    assert (updates[1] - updates[0]).abs().max() < 1e-4 * updates[0].abs().max()
