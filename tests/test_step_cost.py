"""What one optimizer step asks of the device, counted (no timing): kernels and host reads.

On a GPU each computing operator is at least one kernel launch and each host read a
synchronisation, so a step must cost per shape group, not per weight: for every optimizer,
one steady-state step over 48 equal low-rank layers runs at most twice the kernels of a step
over one layer and no more host reads (geoopt's own optimizers, the reference, grow about 48x).
The counter itself (``lowrank_manifolds.testing.OpCounter``) is checked first against
operations whose counts are known.
"""
from __future__ import annotations

import warnings

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, RiemannianAdam, RiemannianSGD
from lowrank_manifolds.testing import OpCounter


def test_the_counter_sees_every_kind_of_host_read_and_no_view_as_a_kernel():
    x = torch.randn(5, 4)
    with OpCounter() as count:
        x.view(-1), x.expand(2, 5, 4), x.detach(), x.t()  # views: no kernel, no read
    assert (count.ops, count.kernels, count.reads) == (4, 0, 0)
    reads = [lambda: x.sum().tolist(), lambda: float(x.max()), lambda: bool(x.sum() > 0), lambda: x[x > 0],
             lambda: x.numpy(), lambda: torch.equal(x, x), lambda: x.nonzero(), lambda: x.sum().item()]
    for read in reads:
        with OpCounter() as count:
            read()
        assert count.reads == 1, count.by_name
    with OpCounter() as count:
        x.add(1).mul_(2).clone()
    assert (count.kernels, count.reads) == (3, 0)
    assert "tolist" not in torch.Tensor.__dict__ and x.tolist()  # the wrapper is gone
    with OpCounter(exempt=[x]) as count:  # reads of exempt tensors are counted apart
        float(x[0, 0]), float(x.sum())
    assert (count.reads, count.exempt_reads) == (1, 1)
    try:  # a torch function mode re-dispatches the wrapped method: still one read
        torch.set_default_device("cpu")
        with OpCounter() as count:
            x.sum().tolist()
    finally:
        torch.set_default_device(None)
    assert count.reads == 1


OPTIMIZERS = {
    "GeometricSGD": (lambda ps: GeometricSGD(ps, lr=1e-2), None),
    "GeometricAdam": (lambda ps: GeometricAdam(ps, lr=1e-3), None),
    "GeometricAdam, capacity": (lambda ps: GeometricAdam(ps, lr=1e-3), 8),
    "DLRT abc-PSI": (lambda ps: DLRT(ps, lr=1e-2, integrator="abc-psi"), None),
    "DLRT augmented BUG, capacity": (lambda ps: DLRT(ps, lr=1e-2, integrator="augmented-bug", tol=1e-3), 8),
    "DLRT augmented BUG + Adam, capacity": (
        lambda ps: DLRT(ps, lr=1e-3, integrator="augmented-bug", core="adam", tol=1e-3), 8),
    "DLRT parallel BUG + momentum, capacity": (
        lambda ps: DLRT(ps, lr=1e-2, integrator="parallel-bug", core="momentum", tol=1e-3), 8),
    "DLRT abc-PSI, recorded": (lambda ps, model: DLRT(ps, lr=1e-2, integrator="abc-psi", model=model), None),
    "DLRT augmented BUG + Adam, recorded, capacity": (
        lambda ps, model: DLRT(ps, lr=1e-3, integrator="augmented-bug", core="adam", tol=1e-3, model=model), 8),
    "RiemannianAdam": (lambda ps: RiemannianAdam(ps, lr=1e-3), None),
    "RiemannianSGD, momentum": (lambda ps: RiemannianSGD(ps, lr=1e-2, momentum=0.9), None),
}


def _count_step(make, layers, capacity=None, device="cpu", bias=False):
    torch.manual_seed(0)
    model = nn.Sequential(*(LowRankLinear(16, 16, 4, max_rank=capacity, bias=bias) for _ in range(layers))).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # DLRT without a recorder: from p.grad
        recorded = make.__code__.co_argcount == 2  # make(params, model)
        opt = make(model.parameters(), model) if recorded else make(model.parameters())
        x = torch.randn(8, 16, device=device)
        for k in range(3):  # states exist: a steady-state step is counted
            opt.zero_grad()
            model(x).square().mean().backward()
            if k < 2:
                opt.step()
        # torch's Adam reads its 0-dim CPU step counters per parameter: no synchronisation
        counters = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() == 0]
        with OpCounter(exempt=counters) as count:
            opt.step()
    return count


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_costs_per_shape_group_not_per_weight(name, device):
    """48 equal weights: at most 2x the kernels of one, and the same host reads. Of those, one
    is the step's finiteness decision (the family's; for RiemannianAdam/SGD the manifold's
    check, which it makes on the CPU only), one more with recorded fields (their check against
    ``p.grad``); the others are ``torch.equal`` tests the library makes only of CPU tensors,
    where a read costs no synchronisation (``S`` diagonal, active columns first), at most
    one of each per shape group. On a GPU neither CPU-only test is made: the family reads once (twice with
    recorded fields), RiemannianAdam/SGD not at all."""
    make, capacity = OPTIMIZERS[name]
    one, many = _count_step(make, 1, capacity, device), _count_step(make, 48, capacity, device)
    assert many.kernels <= 2 * one.kernels, (one.kernels, many.kernels, (many.by_name - one.by_name).most_common(8))
    assert many.reads == one.reads, (one.by_name, many.by_name)
    decisions = (2 if "recorded" in name else 1) if not name.startswith("Riemannian") or device.type == "cpu" else 0
    assert one.reads - one.by_name["equal"] == decisions, one.by_name
    assert one.by_name["equal"] <= (2 if device.type == "cpu" else 0), one.by_name


@pytest.mark.parametrize("name", ["GeometricAdam", "DLRT abc-PSI", "DLRT augmented BUG + Adam, capacity",
                                  "RiemannianAdam", "RiemannianSGD, momentum"])
def test_ordinary_parameters_do_not_make_a_step_cost_per_layer(name):
    """With a bias per layer (an ordinary parameter each, of its own shape group), 48 layers
    still cost at most twice the kernels of one and the same reads: the biases go through
    multi-tensor Adam/SGD (torch's for the family, geoopt's arithmetic for RiemannianAdam/SGD)
    and the finiteness decision reduces them together."""
    make, capacity = OPTIMIZERS[name]
    one, many = _count_step(make, 1, capacity, bias=True), _count_step(make, 48, capacity, bias=True)
    assert many.kernels <= 2 * one.kernels, (one.kernels, many.kernels, (many.by_name - one.by_name).most_common(8))
    assert many.reads == one.reads, (one.by_name, many.by_name)


@pytest.mark.parametrize("ours, stock, options", [
    (RiemannianAdam, geoopt.optim.RiemannianAdam, dict(lr=1e-3)),
    (RiemannianSGD, geoopt.optim.RiemannianSGD, dict(lr=1e-2, momentum=0.9)),
])
def test_geoopts_own_step_is_per_weight(ours, stock, options):
    """The reference the batching is measured against: geoopt's loop grows with the weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = _count_step(lambda ps: stock(ps, **options), 48)
    mine = _count_step(lambda ps: ours(ps, **options), 48)
    assert ref.kernels > 15 * mine.kernels and ref.reads >= 48 > mine.reads, (ref.kernels, mine.kernels, ref.reads)


def test_geoopts_step_on_our_manifold_reads_nothing_a_gpu_would_wait_for():
    """With the manifold's finiteness check off (its default off the CPU), a stock geoopt step
    reads only the CPU-only diagonal tests: on a GPU, nothing."""
    def make(ps):
        ps = list(ps)
        for p in ps:
            p.manifold.check_finite = False
        return geoopt.optim.RiemannianAdam(ps, lr=1e-3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        count = _count_step(make, 8)
    assert count.reads == count.by_name["equal"] == 8, count.by_name
