"""FixedRankManifold inside a custom nn.Module, trained by geoopt's stock optimizers."""
import copy

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.nn import LowRankLinear

F64 = torch.float64
M, N, R = 30, 25, 3


def ground_truth():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(M, R, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(N, R, generator=g, dtype=F64))
    a = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) @ v.T
    mask = (torch.rand(M, N, generator=g, dtype=F64) < 0.6).to(F64)
    return a, mask


class Completion(nn.Module):
    """Fit a rank-R matrix to the observed entries of a target."""

    def __init__(self, target, mask, seed=0):
        super().__init__()
        self.manifold = FixedRankManifold(M, N, R, second_moment="scalar")  # the rates below are its
        self.weight = geoopt.ManifoldParameter(self.manifold.origin(dtype=F64, seed=seed), manifold=self.manifold)
        self.register_buffer("target", target)
        self.register_buffer("mask", mask)

    def forward(self):
        residual = self.mask * (self.manifold.to_dense(self.weight) - self.target)
        return 0.5 * (residual**2).sum()


def train(model, opt, target, max_steps):
    for step in range(max_steps):
        opt.zero_grad()
        model().backward()
        opt.step()
        err = (model.manifold.to_dense(model.weight) - target).norm() / target.norm()
        if err < 1e-6:
            break
    assert model.manifold.check_point_on_manifold(model.weight, atol=1e-10)
    return err.item(), step + 1


OPTIMIZERS = {
    "sgd": lambda p: geoopt.optim.RiemannianSGD(p, lr=1.0),
    "sgd-momentum": lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.9),
    "sgd-nesterov": lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.9, nesterov=True),
    "sgd-stabilize": lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.9, stabilize=10),
    "adam": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.05, betas=(0.9, 0.99)),
    # amsgrad keeps the largest (early) second moment, so it needs a larger lr
    "adam-amsgrad": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.3, betas=(0.9, 0.99), amsgrad=True),
    "adam-stabilize": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.05, betas=(0.9, 0.99), stabilize=10),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matrix_completion_reaches_the_ground_truth(name):
    target, mask = ground_truth()
    model = Completion(target, mask)
    err, steps = train(model, OPTIMIZERS[name](model.parameters()), target, 3000)
    assert err < 1e-6, f"{name}: relative error {err:.2e} after {steps} steps"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_converges_to_the_regularised_minimiser(optimizer):
    """Fully observed, f(X) = |X - A|^2 / 2 plus decay lam |X|^2 / 2: the rank-R
    minimiser is A / (1 + lam), because A itself has rank R."""
    target, _ = ground_truth()
    lam = 0.25
    model = Completion(target, torch.ones_like(target))
    if optimizer == "sgd":
        opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.5, momentum=0.5, weight_decay=lam)
    else:
        opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=0.05, betas=(0.9, 0.99), weight_decay=lam)
    err, _ = train(model, opt, target / (1 + lam), 3000)
    assert err < 1e-6


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-amsgrad"])
def test_optimizer_state_dict_round_trip_resumes_the_same_trajectory(name):
    target, mask = ground_truth()
    reference = Completion(target, mask)
    opt = OPTIMIZERS[name](reference.parameters())
    for _ in range(10):
        opt.zero_grad()
        reference().backward()
        opt.step()
    resumed = copy.deepcopy(reference)
    resumed_opt = OPTIMIZERS[name](resumed.parameters())
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    # torch's load_state_dict turns geoopt's integer Adam step counter into a float32
    # tensor, which rounds the bias corrections (a ~1e-7 drift after 10 steps, geoopt's
    # behaviour, not this manifold's); restoring the int makes the resume exact.
    for state in resumed_opt.state.values():
        if "step" in state:
            state["step"] = int(state["step"])
    for model, o in ((reference, opt), (resumed, resumed_opt)):
        for _ in range(10):
            o.zero_grad()
            model().backward()
            o.step()
    assert torch.equal(reference.weight, resumed.weight)
    assert isinstance(resumed.weight, geoopt.ManifoldParameter)


def test_manifold_parameter_round_trips_through_state_dict():
    target, mask = ground_truth()
    model = Completion(target, mask, seed=3)
    other = Completion(target, mask, seed=4)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.weight, model.weight)


def test_stock_geoopt_steps_parameter_by_parameter_and_a_prior_check_keeps_them_all():
    """geoopt's optimizers step one parameter at a time: a NaN gradient on the second low-rank
    weight raises in its egrad2rgrad after the first was stepped (what docs/training.md says).
    ``clip_grad_norm_(..., error_if_nonfinite=True)`` before the step (or GradScaler) raises
    with every parameter unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(6, 5, 2), LowRankLinear(5, 4, 2))
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 6)).pow(2).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert not torch.equal(model[0].weight, before[0])  # the first weight was stepped
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)
    opt.state.clear()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"), error_if_nonfinite=True)
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
