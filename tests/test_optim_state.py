"""What an optimizer is given besides gradients: hyperparameters (loaded, or edited in
``param_groups`` mid-run), checkpoints (its own, older ones, other optimizers'), and points
written by hand. A refused one changes nothing; an accepted one steps as the reference does.

References: a deep, tensor-by-tensor copy of the optimizer (states and param groups) and of
the model taken before the call; a twin run that never saw the refused input; torch.optim.Adam
for a checkpoint of it; the canonical point for a point whose columns were permuted.
"""
from __future__ import annotations

import copy
import math

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, LoRAPreAdam
from test_faults import F64, backward, data, make_model

pytestmark = pytest.mark.filterwarnings("ignore:DLRT. no recorded")

#: Every optimizer of the package, in configurations that keep every kind of state: momentum
#: buffers, Adam moments and counters, a cycle's phase, recorded fields, factored moments.
FACTORIES = {
    "geometric-sgd": lambda ps, m: GeometricSGD(ps, lr=0.05, momentum=0.9),
    "geometric-adam": lambda ps, m: GeometricAdam(ps, lr=0.01),
    "geometric-adam-k3": lambda ps, m: GeometricAdam(ps, lr=0.01, augment_every=3, perp_second_moment="scalar"),
    "dlrt-abc-psi": lambda ps, m: DLRT(ps, lr=0.1, tol=0.1, euclidean="adam", model=m),
    "dlrt-augmented-adam": lambda ps, m: DLRT(ps, lr=0.01, integrator="augmented-bug", core="adam", model=m),
    "dlrt-parallel-momentum": lambda ps, m: DLRT(ps, lr=0.05, integrator="parallel-bug", core="momentum",
                                                 momentum=0.9, euclidean="sgd"),
    "lora-pre": lambda ps, m: LoRAPreAdam(ps, lr=0.01, rank=2),
}
FAMILY = [name for name in FACTORIES if name != "lora-pre"]


def trained(name, steps=2, groups=False):
    """A model and its optimizer after ``steps`` steps (``groups``: the first layer in a param
    group of its own, so that group 1 is stepped after group 0's dense weights)."""
    model = make_model("lora-pre" if name == "lora-pre" else "lowrank")
    params = list(model.parameters())
    ps = [{"params": params[:2]}, {"params": params[2:]}] if groups else params
    opt = FACTORIES[name](ps, model)
    x, y = data()
    for _ in range(steps):
        backward(model, opt, x, y)
        opt.step()
    return model, opt


def everything(model, opt):
    """A deep copy of what a refused call must leave as it was: the parameters, every state
    entry and every param group (hyperparameters, and which of the model's parameters it holds)."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    return copy.deepcopy((
        [p.detach() for p in params],
        [(i, opt.state[p]) for i, p in enumerate(params) if p in opt.state],
        [({k: v for k, v in g.items() if k != "params"}, [index.get(id(p)) for p in g["params"]])
         for g in opt.param_groups],
    ))


def assert_same(a, b, path="root"):
    """Deep equality, tensors bitwise (dtype, shape, values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


# --------------------------------------------------------------------------
# load_state_dict: hyperparameters
# --------------------------------------------------------------------------
COMMON = [("lr", math.nan, "lr"), ("lr", -1.0, "lr"), ("eps", -1.0, "eps"), ("betas", (0.9, 1.5), "beta"),
          ("weight_decay", math.inf, "weight_decay")]
FAMILY_ONLY = [("core", "bogus", "core"), ("integrator", "bogus", "integrator"), ("momentum", 1.5, "momentum"),
               ("tol", -0.1, "tol"), ("augment_every", 0, "augment_every"), ("fixed_rank", "yes", "fixed_rank")]
LORA_ONLY = [("rank", 0, "rank"), ("second_moment", "cube", "second_moment"), ("update_bound", -1.0, "update_bound")]
BAD_GROUPS = (
    [(name, *case) for name in FACTORIES for case in COMMON]
    # GeometricSGD / GeometricAdam fix their integrator and core: only DLRT's are options
    + [(name, *case) for name in ("geometric-adam", "dlrt-parallel-momentum") for case in FAMILY_ONLY
       if not (name.startswith("geometric") and case[0] in ("core", "integrator"))]
    + [("lora-pre", *case) for case in LORA_ONLY]
)


@pytest.mark.parametrize("name, key, value, word", BAD_GROUPS)
def test_load_state_dict_refuses_what_the_constructor_refuses_and_loads_nothing(name, key, value, word):
    model, opt = trained(name)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][key] = value
    before = everything(model, opt)
    with pytest.raises((ValueError, TypeError), match=rf"{type(opt).__name__}\.load_state_dict: param group 0: .*{word}"):
        opt.load_state_dict(sd)
    assert_same(everything(model, opt), before)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_names_its_optimizer_and_a_checkpoint_without_the_name_loads(name):
    model, opt = trained(name)
    sd = copy.deepcopy(opt.state_dict())
    assert all(g["saved_by"] == type(opt).__name__ for g in sd["param_groups"])
    twin_model, twin = copy.deepcopy(model), None
    twin = FACTORIES[name](twin_model.parameters(), twin_model)
    for g in sd["param_groups"]:
        del g["saved_by"]  # a checkpoint saved before the name was
    twin.load_state_dict(sd)
    assert "saved_by" not in twin.param_groups[0]
    x, y = data()
    for m, o in ((model, opt), (twin_model, twin)):
        backward(m, o, x, y)
        o.step()
    assert_same([p.detach() for p in twin_model.parameters()], [p.detach() for p in model.parameters()])


# --------------------------------------------------------------------------
# load_state_dict: states of other optimizers, other capacities, other shapes
# --------------------------------------------------------------------------
def _geoopt(cls, **kw):
    def save():
        model = make_model("lowrank")
        opt = cls(model.parameters(), lr=0.01, **kw)
        x, y = data()
        backward(model, opt, x, y)
        opt.step()
        return opt.state_dict()
    return save


def _ours(name, cap=3):
    def save():
        model = make_model("lora-pre" if name == "lora-pre" else "lowrank")
        if cap != 3:
            model[2] = LowRankLinear(8, 5, rank=2, max_rank=cap, dtype=F64)
        opt = FACTORIES[name](model.parameters(), model)
        x, y = data()
        for _ in range(2):
            backward(model, opt, x, y)
            opt.step()
        return opt.state_dict()
    return save


def _torch_adam():
    model = make_model("lora-pre")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data()
    backward(model, opt, x, y)
    opt.step()
    return opt.state_dict()


FOREIGN = [
    # (state dict, loaded into, what the error says)
    (_geoopt(geoopt.optim.RiemannianAdam), "geometric-adam",
     r"parameter 2 of param group 0 \(shape \(16, 3\)\): its state 'exp_avg' is a torch.float64 tensor of shape "
     r"\(16, 3\); GeometricAdam keeps a floating-point tensor of shape \(3, 3\)"),
    (_geoopt(geoopt.optim.RiemannianSGD, momentum=0.9), "geometric-sgd",
     r"its state 'momentum_buffer' is a torch.float64 tensor of shape \(16, 3\); GeometricSGD keeps"),
    (_ours("geometric-adam"), "dlrt-augmented-adam", r"saved by GeometricAdam, not by DLRT"),
    (_ours("dlrt-augmented-adam"), "geometric-adam", r"saved by DLRT, not by GeometricAdam"),
    (_ours("geometric-sgd"), "geometric-adam", r"saved by GeometricSGD, not by GeometricAdam"),
    (_torch_adam, "lora-pre", r"parameter 0 of param group 0 \(shape \(8, 6\)\): it has a state 'exp_avg', which "
                              r"LoRAPreAdam does not keep for this parameter \(its states here: step, m_B, m_A, v_B, v_A\)"),
    # a checkpoint of a capacity-3 weight, loaded for a capacity-4 one
    (_ours("geometric-adam"), "geometric-adam@4", r"'exp_avg' is a torch.float64 tensor of shape \(3, 3\); "
                                                  r"GeometricAdam keeps a floating-point tensor of shape \(4, 4\)"),
    (_ours("dlrt-parallel-momentum"), "dlrt-parallel-momentum@4", r"'momentum_buffer' .* shape \(3, 3\); DLRT keeps .* \(4, 4\)"),
]


@pytest.mark.parametrize("save, into, message", FOREIGN, ids=[f"{i}-{c[1]}" for i, c in enumerate(FOREIGN)])
def test_a_state_dict_of_another_optimizer_or_capacity_is_refused_and_nothing_loaded(save, into, message):
    name, _, cap = into.partition("@")
    model = make_model("lora-pre" if name == "lora-pre" else "lowrank")
    if cap:
        model[2] = LowRankLinear(8, 5, rank=2, max_rank=int(cap), dtype=F64)
    opt = FACTORIES[name](model.parameters(), model)
    x, y = data()
    backward(model, opt, x, y)
    opt.step()
    before = everything(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(copy.deepcopy(save()))
    assert_same(everything(model, opt), before)


STATE_EDITS = [
    # (optimizer, parameter index in the state dict, edit, what the error names)
    ("geometric-adam", 2, lambda st: st.update(exp_avg=st["exp_avg"].to(torch.int64)), r"'exp_avg' is a torch.int64"),
    ("geometric-adam", 2, lambda st: st.pop("exp_avg_sq"), r"states \['step', 'exp_avg'\] come without \['exp_avg_sq'\]"),
    ("geometric-adam", 2, lambda st: st.update(max_exp_avg_sq=st["exp_avg"].clone()), r"'max_exp_avg_sq'"),
    ("geometric-adam", 2, lambda st: st.update(step=-1), r"'step' is int -1; GeometricAdam keeps an int >= 0"),
    ("geometric-adam", 2, lambda st: st.update(step=2.0), r"'step' is float 2.0"),
    ("geometric-adam-k3", 2, lambda st: st.update(exp_avg_sq_perp=st["exp_avg_sq_perp"][:1]), r"'exp_avg_sq_perp'"),
    ("geometric-adam", 0, lambda st: st.update(exp_avg=st["exp_avg"][:2]), r"parameter 0 .* 'exp_avg' .* \(2, 6\)"),
    ("geometric-adam", 1, lambda st: st.update(step=torch.tensor(-1.0)), r"parameter 1 .* 'step'"),
    ("lora-pre", 0, lambda st: st.update(m_B=st["m_B"][:, :1]), r"'m_B' .* shape \(8, 1\); .* \(8, 2\)"),
    ("lora-pre", 0, lambda st: st.update(step=3), r"'step' is int 3; LoRAPreAdam keeps a 0-d tensor >= 0"),
    ("lora-pre", 1, lambda st: st.pop("exp_avg"), r"parameter 1 .* come without \['exp_avg'\]"),
]


@pytest.mark.parametrize("name, index, edit, message", STATE_EDITS)
def test_each_state_is_checked_against_its_parameter_before_anything_is_loaded(name, index, edit, message):
    model, opt = trained(name, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd["state"][index])
    before = everything(model, opt)
    with pytest.raises(ValueError, match=rf"load_state_dict: .*{message}"):
        opt.load_state_dict(sd)
    assert_same(everything(model, opt), before)


def test_the_structure_is_checked_first():
    model, opt = trained("geometric-adam")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    with pytest.raises(ValueError, match="the state dict has 2 param groups, this optimizer 1"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["params"].pop()
    with pytest.raises(ValueError, match="param group 0 of the state dict has 3 parameters, this optimizer's 4"):
        opt.load_state_dict(sd)


def test_torch_adams_checkpoint_of_ordinary_parameters_is_ours_too():
    """GeometricAdam steps ordinary parameters with torch.optim.Adam's formulas: a torch.optim.Adam
    checkpoint (no low-rank weights) loads, and the run continues as torch's does, bitwise."""
    model = make_model("lora-pre")
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data()
    for _ in range(3):
        backward(model, ref, x, y)
        ref.step()
    twin = copy.deepcopy(model)
    opt = GeometricAdam(twin.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for m, o in ((model, ref), (twin, opt)):
        for _ in range(3):
            backward(m, o, x, y)
            o.step()
    assert_same([p.detach() for p in twin.parameters()], [p.detach() for p in model.parameters()])


# --------------------------------------------------------------------------
# hyperparameters edited in param_groups mid-run
# --------------------------------------------------------------------------
MID_RUN = (
    [(name, *case) for name in FACTORIES for case in COMMON]
    + [(name, *case) for name in ("geometric-sgd", "dlrt-augmented-adam") for case in FAMILY_ONLY]
    + [("lora-pre", *case) for case in LORA_ONLY]
    # a tensor, as the constructors refuse it: the check would have to read it from its device
    + [(name, "lr", torch.tensor(0.01), "lr") for name in ("geometric-adam", "lora-pre")]
)


@pytest.mark.parametrize("name, key, value, word", MID_RUN)
def test_hyperparameters_edited_mid_run_are_refused_before_the_step_writes(name, key, value, word):
    """Group 1 is edited; group 0 (dense weights, stepped first before the check) and every
    state stay bitwise as they were; set back, the step is the one a twin takes."""
    model, opt = trained(name, groups=True)
    twin_model, twin = trained(name, groups=True)
    x, y = data()
    backward(model, opt, x, y)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    before = everything(model, opt)
    with pytest.raises((ValueError, TypeError), match=rf"{type(opt).__name__}: param group 1: .*{word}.*the step "
                                                      r"was not taken"):
        opt.step()
    assert_same(everything(model, opt), before)
    opt.param_groups[1][key] = good
    opt.step()
    backward(twin_model, twin, x, y)
    twin.step()
    assert_same(everything(model, opt), everything(twin_model, twin))


# --------------------------------------------------------------------------
# points whose active columns are not first
# --------------------------------------------------------------------------
ORDER_FACTORIES = {
    **{name: FACTORIES[name] for name in FAMILY},
    "geometric-adam-fixed-rank": lambda ps, m: GeometricAdam(ps, lr=0.01, fixed_rank=True),
    "dlrt-augmented-flow": lambda ps, m: DLRT(ps, lr=0.1, integrator="augmented-bug"),
    "dlrt-parallel-flow": lambda ps, m: DLRT(ps, lr=0.1, integrator="parallel-bug", tol=0.05),
}


def _two_layers(order):
    """Two capacity-4 rank-2 layers of one shape (stepped as one batch unless recorded); the
    first one's columns in ``order`` (the active ones keep their relative order)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8, dtype=F64), nn.Tanh(), LowRankLinear(8, 8, rank=2, max_rank=4, dtype=F64),
                          nn.Tanh(), LowRankLinear(8, 8, rank=2, max_rank=4, dtype=F64), nn.Linear(8, 5, dtype=F64))
    layer = model[2]
    with torch.no_grad():
        u, s, v = layer.manifold.unpack(layer.weight)
        layer.weight.copy_(layer.manifold.pack(u[:, order], s[order][:, order], v[:, order]))
    return model


@pytest.mark.parametrize("order", [[2, 0, 3, 1], [2, 3, 0, 1]])
@pytest.mark.parametrize("name", list(ORDER_FACTORIES))
def test_a_point_with_its_active_columns_last_steps_as_the_point_it_denotes(name, order):
    """Reported: a step on such a point erased the weight (|W| 1.9 -> 0). It is the canonical
    point with its columns permuted; its steps are the canonical point's, bitwise."""
    x, y = data()
    runs = []
    for perm in (torch.arange(4), torch.tensor(order)):
        model = _two_layers(perm)
        opt = ORDER_FACTORIES[name](model.parameters(), model)
        for _ in range(3):
            backward(model, opt, x, y)
            opt.step()
        runs.append(model)
    layer = runs[1][2]
    assert layer.manifold.check_point_on_manifold(layer.weight.detach())
    assert_same([p.detach() for p in runs[1].parameters()], [p.detach() for p in runs[0].parameters()])
