"""DLRT with a recorder follows p.grad: what DDP, GradScaler, clipping, accumulation and
hooks do to it reaches the step, or the step is refused before anything is written.

References: the integrators run on the dense float64 gradient G (an independent field),
and DLRT on the loss scaled by the same factor."""
import copy
import pickle

import pytest
import torch
from torch import nn

from lowrank_manifolds.integrators import ABCPSI, AugmentedBUG, MatrixField, ParallelBUG, Truncation
from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT

F64 = torch.float64
NAMES = {"abc-psi": ABCPSI, "augmented-bug": AugmentedBUG, "parallel-bug": ParallelBUG}


def problem(seed=0, batch=16, shape=(9, 7, 2, 5)):
    n, m, rank, cap = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, generator=g, dtype=F64)
    y = torch.randn(batch, m, generator=g, dtype=F64)
    torch.manual_seed(seed)
    layer = LowRankLinear(n, m, rank=rank, max_rank=cap, dtype=F64)
    return layer, x, y


def loss_of(layer, x, y):
    return ((layer(x) - y) ** 2).mean()


def dense_reference(layer, x, y, scale, name, h, tol):
    """The integrator on the dense field -scale * G, G from autograd on the dense weight."""
    w = layer.dense_weight().detach().clone().requires_grad_(True)
    ((x @ w.T + layer.bias - y) ** 2).mean().backward()
    mf = layer.manifold
    r = int(mf.active_rank(layer.weight))
    u, s, v = (t.detach() for t in mf.unpack(layer.weight))
    integ = NAMES[name](truncation=Truncation(tol, max_rank=mf.capacity, pad=True))
    u1, s1, v1 = integ.step(u[:, :r], s[:r, :r], v[:, :r], MatrixField(-scale * w.grad), h)
    return u1 @ s1 @ v1.T


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("shape", [(9, 7, 2, 5), (12, 3, 2, 2), (12, 3, 3, 3)], ids=["wide", "m<2r", "m=r"])
def test_clipping_scales_the_whole_step(name, shape):
    """Also where (I - UU^T) G V is rank deficient (m = 3 < 2r = 4): the new directions must
    stay orthogonal to U, or a rounding-dependent term enters the step; and where there are
    none (m = r: U spans everything)."""
    layer, x, y = problem(shape=shape)
    ref = dense_reference(layer, x, y, 1.0, name, 0.5, 0.05)  # unclipped, for contrast
    opt = DLRT([layer.weight], lr=0.5, integrator=name, tol=0.05, model=None if name == "parallel-bug" else layer)  # parallel BUG: p.grad alone
    loss_of(layer, x, y).backward()
    total = torch.nn.utils.clip_grad_norm_([layer.weight], 1e-3)
    coef = float(1e-3 / (total + 1e-6))  # clip_grad_norm_'s own coefficient
    clipped_ref = dense_reference(layer, x, y, coef, name, 0.5, 0.05)
    opt.step()
    got = layer.dense_weight().detach()
    assert torch.allclose(got, clipped_ref, atol=1e-12, rtol=0)
    assert not torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_recorded_layers_of_one_shape_step_as_one_batch_against_the_dense_reference(name):
    """Three recorded layers of one shape at active ranks 1, 2, 4 (capacity 5) are stepped as
    one batch; each ends where the integrator on its own dense gradient takes it."""
    layers, data = [], []
    for seed, rank in zip((0, 1, 2), (1, 2, 4)):
        layer, x, y = problem(seed, shape=(9, 7, rank, 5))
        layers.append(layer)
        data.append((x, y))
    refs = [dense_reference(layer, x, y, 1.0, name, 0.5, 0.05) for layer, (x, y) in zip(layers, data)]
    model = nn.ModuleList(layers)
    opt = DLRT([layer.weight for layer in layers], lr=0.5, integrator=name, tol=0.05, model=None if name == "parallel-bug" else model)
    sum(loss_of(layer, x, y) for layer, (x, y) in zip(layers, data)).backward()
    opt.step()
    for layer, ref in zip(layers, refs):
        assert torch.allclose(layer.dense_weight().detach(), ref, atol=1e-12, rtol=0)


def test_a_batch_of_recorded_weights_copies_at_most_pair_stack_bytes_of_pairs():
    """Stacking the recorded pairs copies them: a shape group is split into batches of at most
    pair_stack_bytes of pairs (here one weight's pair: per weight), with the same step."""
    from lowrank_manifolds.testing import OpCounter

    runs = []
    for limit in (DLRT.pair_stack_bytes, 1):
        layers = [problem(seed, shape=(9, 7, rank, 5))[0] for seed, rank in zip((0, 1, 2), (1, 2, 4))]
        data = [problem(seed, shape=(9, 7, 2, 5))[1:] for seed in (0, 1, 2)]
        opt = DLRT([layer.weight for layer in layers], lr=0.5, tol=0.05, model=nn.ModuleList(layers))
        opt.pair_stack_bytes = limit
        sum(loss_of(layer, x, y) for layer, (x, y) in zip(layers, data)).backward()
        with OpCounter() as count:
            opt.step()
        runs.append((count.by_name["linalg_qr"], [layer.weight.detach().clone() for layer in layers]))
    (qr_batched, batched), (qr_alone, alone) = runs
    assert qr_alone == 3 * qr_batched  # one batch of three, then three batches of one
    for a, b in zip(batched, alone):
        assert (a - b).abs().max() < 1e-12


def test_grad_scaler_unscales_and_skips_infs():
    layer, x, y = problem(1)
    ref = dense_reference(layer, x, y, 1.0, "abc-psi", 0.3, 0.1)
    opt = DLRT([layer.weight, layer.bias], lr=0.3, tol=0.1, model=layer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(loss_of(layer, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(layer.dense_weight().detach(), ref, atol=1e-12, rtol=0)
    # an inf gradient: the step is skipped and the scale backs off
    opt.zero_grad()
    before = [t.detach().clone() for t in (layer.weight, layer.bias)]
    scaler.scale(loss_of(layer, x, y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.weight, layer.bias)))


def test_accumulation_over_micro_batches_equals_the_full_batch():
    layer, x, y = problem(2, batch=12)
    twin = copy.deepcopy(layer)
    opt = DLRT(layer.parameters(), lr=0.4, tol=0.05, model=layer)
    opt_twin = DLRT(twin.parameters(), lr=0.4, tol=0.05, model=twin)
    for xs, ys in ((x[:6], y[:6]), (x[6:], y[6:])):
        (loss_of(layer, xs, ys) / 2).backward()
    opt.step()
    loss_of(twin, x, y).backward()
    opt_twin.step()
    assert torch.allclose(layer.dense_weight(), twin.dense_weight(), atol=1e-12, rtol=0)


def test_other_grad_edits_are_refused_before_anything_is_written():
    layer, x, y = problem(3)
    other = nn.Linear(3, 3, dtype=F64)
    opt = DLRT([layer.weight, layer.bias, other.weight], lr=0.3, euclidean="adam", model=layer)
    loss = loss_of(layer, x, y) + other(torch.ones(3, dtype=F64)).sum()
    loss.backward()
    layer.weight.grad.add_(1e-3 * torch.randn_like(layer.weight.grad))  # not a uniform scaling
    params = [layer.weight, layer.bias, other.weight]
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="not a scalar multiple"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(not s for s in opt.state.values())
    # p.grad alone (model=None) takes the edited gradient
    with pytest.warns(RuntimeWarning, match="no recorded"):
        DLRT(params, lr=0.3).step()
    assert not torch.equal(before[0], layer.weight)


def test_frozen_weight_is_not_moved():
    layer, x, y = problem(4)
    opt = DLRT(layer.parameters(), lr=0.3, model=layer)
    loss_of(layer, x, y).backward()
    layer.weight.grad = None
    before = layer.weight.detach().clone()
    opt.step()
    assert torch.equal(before, layer.weight)


def test_copies_of_the_model_do_not_feed_the_recorder():
    layer, x, y = problem(5)
    reference = copy.deepcopy(layer)
    opt_ref = DLRT(reference.parameters(), lr=0.3, model=reference)
    loss_of(reference, x, y).backward()
    opt_ref.step()

    opt = DLRT(layer.parameters(), lr=0.3, model=layer)
    teacher = copy.deepcopy(layer)  # e.g. an EMA or distillation copy, trained by the same loss
    for p in teacher.parameters():
        p.requires_grad_(True)
    (loss_of(layer, x, y) + loss_of(teacher, x, y)).backward()
    assert len(opt.recorder.pair(layer.weight)[1].T) == len(x)  # the copy added nothing
    opt.step()
    assert torch.allclose(layer.weight, reference.weight, atol=1e-13, rtol=0)
    # the copy trains on its own without the recorder seeing it
    loss_of(teacher, x, y).backward()
    assert opt.recorder.pair(layer.weight) is None


def test_pickle_and_deepcopy_of_a_recorded_model_and_optimizer():
    layer, x, y = problem(6)
    opt = DLRT(layer.parameters(), lr=0.3, model=layer)
    restored = pickle.loads(pickle.dumps(layer))
    assert torch.equal(restored(x), layer(x))
    model2, opt2 = copy.deepcopy((layer, opt))
    loss_of(model2, x, y).backward()
    assert opt2.recorder.pair(model2.weight) is not None
    assert opt.recorder.pair(layer.weight) is None
    opt2.step()
    assert not torch.equal(model2.weight, layer.weight)


def test_the_recorder_keeps_activations_only_for_steps_that_read_them():
    """parallel BUG steps from p.grad, and the core-only steps of a cycle read no field: nothing
    is recorded for them (no activations held between backward and step); the augmentation
    steps of a cycle record."""
    layer, x, y = problem(7)
    opt = DLRT(layer.parameters(), lr=0.1, integrator="parallel-bug", model=layer)
    loss_of(layer, x, y).backward()
    assert opt.recorder.pair(layer.weight) is None
    opt.step()
    opt = DLRT(layer.parameters(), lr=0.05, integrator="augmented-bug", core="adam", augment_every=3, model=layer)
    recorded = []
    for _ in range(6):
        opt.zero_grad()
        loss_of(layer, x, y).backward()
        recorded.append(opt.recorder.pair(layer.weight) is not None)
        opt.step()
    assert recorded == [True, False, False, True, False, False]
    twin = copy.deepcopy(opt)  # a copy's recorder asks the copy which steps read a field
    assert twin.recorder.wants.__self__ is twin and opt.recorder.wants.__self__ is opt
