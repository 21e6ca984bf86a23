"""lowrank_manifolds.optim.RiemannianSGD / RiemannianAdam against geoopt's own optimizers.

The reference is geoopt's unmodified RiemannianSGD / RiemannianAdam on the same model: the
batched step must follow it over 20 steps in float64 for every option, in a model with
several shape groups (one of a single weight), fixed-rank and rank-adaptive weights, a
frozen weight, a weight without a gradient and ordinary parameters; checkpoints move both
ways; hooks run once; a refused gradient writes nothing. What a step costs is in
tests/test_step_cost.py.
"""
from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import RiemannianAdam, RiemannianSGD

F64 = torch.float64

OPTIONS = {
    "sgd": dict(lr=0.05),
    "sgd momentum": dict(lr=0.02, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd nesterov": dict(lr=0.02, momentum=0.9, nesterov=True, stabilize=4),
    "adam": dict(lr=1e-2),
    "adam decay": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, stabilize=3),
    "adam amsgrad": dict(lr=1e-2, amsgrad=True),
}


def _classes(name):
    return (RiemannianSGD, geoopt.optim.RiemannianSGD) if name.startswith("sgd") else (
        RiemannianAdam, geoopt.optim.RiemannianAdam)


class Net(nn.Module):
    """Three shape groups of low-rank weights (3 x 10x10 rank 3, 10x12 rank 3 alone, 2 x 8x10
    rank-adaptive of capacity 4), a frozen low-rank weight, one that gets no gradient and
    an ordinary head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = LowRankLinear(12, 10, 3, dtype=F64)
        self.mid = nn.ModuleList(LowRankLinear(10, 10, 3, dtype=F64) for _ in range(3))
        self.adaptive = nn.ModuleList(LowRankLinear(10, 8, 2, max_rank=4, tol=0.05, dtype=F64) for _ in range(2))
        self.frozen = LowRankLinear(8, 8, 2, dtype=F64).requires_grad_(False)
        self.unused = LowRankLinear(8, 8, 2, dtype=F64)
        self.head = nn.Linear(8, 3, dtype=F64)

    def forward(self, x):
        x = torch.tanh(self.first(x))
        for layer in self.mid:
            x = torch.tanh(layer(x))
        x = self.adaptive[0](x) + self.adaptive[1](x)
        return self.head(self.frozen(x))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 12, generator=g, dtype=F64), torch.randn(32, 3, generator=g, dtype=F64)


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_batched_step_follows_geoopt(name):
    ours_cls, geoopt_cls = _classes(name)
    x, y = _data()
    a, b = Net(), Net()
    ours, ref = ours_cls(a.parameters(), **OPTIONS[name]), geoopt_cls(b.parameters(), **OPTIONS[name])
    ranks = set()
    for _ in range(20):
        _train(a, ours, 1, x, y)
        _train(b, ref, 1, x, y)
        ranks.add(tuple(int(layer.active_rank) for layer in a.adaptive))
        assert [int(layer.active_rank) for layer in a.adaptive] == [int(layer.active_rank) for layer in b.adaptive]
    assert _max_diff(a, b) < 1e-10
    if "stabilize" not in OPTIONS[name]:  # (geoopt's stabilize projects every weight)
        assert torch.equal(a.unused.weight, Net().unused.weight)  # no gradient: not stepped
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = ours.state[p], ref.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert float((sa[key] - sb[key]).abs().max()) < 1e-9, key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("name", ["sgd momentum", "adam decay"])
def test_foreach_false_is_geoopts_own_step(name):
    ours_cls, geoopt_cls = _classes(name)
    x, y = _data()
    a, b = Net(), Net()
    _train(a, ours_cls(a.parameters(), foreach=False, **OPTIONS[name]), 5, x, y)
    _train(b, geoopt_cls(b.parameters(), **OPTIONS[name]), 5, x, y)
    assert _max_diff(a, b) == 0.0


def _resumed(first, second, name, x, y):
    """5 steps with ``first``, model and optimizer state through a file into ``second``, 5 more."""
    model = Net()
    opt = first(model.parameters(), **OPTIONS[name])
    _train(model, opt, 5, x, y)
    buf = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buf)
    buf.seek(0)
    weights, saved = torch.load(buf)
    resumed = Net()
    resumed.load_state_dict(weights)
    opt2 = second(resumed.parameters(), **OPTIONS[name])
    opt2.load_state_dict(saved)
    _train(resumed, opt2, 5, x, y)
    return resumed


@pytest.mark.parametrize("name", ["sgd nesterov", "adam amsgrad"])
def test_checkpoints_move_both_ways_with_geoopt(name):
    """Resumed from either kind's checkpoint, ours follows 10 uninterrupted steps of geoopt's,
    and geoopt resumed from ours does what it does resumed from its own. (torch's Adam
    loads step counters as float32 tensors, with which geoopt's bias corrections drift by
    ~1e-6 in float64; ours keeps them as ints.)"""
    ours_cls, geoopt_cls = _classes(name)
    x, y = _data()
    ref = Net()
    _train(ref, geoopt_cls(ref.parameters(), **OPTIONS[name]), 10, x, y)
    assert _max_diff(_resumed(ours_cls, ours_cls, name, x, y), ref) < 1e-10
    assert _max_diff(_resumed(geoopt_cls, ours_cls, name, x, y), ref) < 1e-10
    own = _resumed(geoopt_cls, geoopt_cls, name, x, y)
    assert _max_diff(_resumed(ours_cls, geoopt_cls, name, x, y), own) < 1e-10


def test_step_hooks_and_the_closure_run_once():
    x, y = _data()
    model = Net()
    opt = RiemannianAdam(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        calls.append("closure")
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "closure", "post"]
    assert torch.is_tensor(loss) and loss.ndim == 0


def test_a_refused_gradient_writes_nothing():
    """A NaN in one weight of a batched group: egrad2rgrad's ValueError before any weight
    (ordinary parameters included: geoopt's part runs after the batched steps are computed)
    or state is written."""
    x, y = _data()
    model = Net()
    opt = RiemannianAdam(model.parameters(), lr=1e-2)
    _train(model, opt, 2, x, y)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model.mid[1].weight.grad[0, 0] = float("nan")
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), before[0]):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for k, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after[k][key]), torch.as_tensor(value))
