"""A realistic training loop on a small model: gradient accumulation over 2 micro-batches,
GradScaler (CPU), clip_grad_norm_, an lr schedule, a checkpoint and a bit-identical resume,
with our optimizers and with stock geoopt."""
import io

import geoopt
import pytest
import torch
from torch import nn

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam

STEPS, SAVE_AT = 10, 5


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), LowRankLinear(16, 16, rank=3, max_rank=6), nn.Tanh(),
        LowRankLinear(16, 4, rank=2, max_rank=3),
    )


def make_optimizer(kind, model):
    if kind == "geometric-adam":
        return GeometricAdam(model.parameters(), lr=1e-2, tol=0.05)
    if kind == "dlrt":
        return DLRT(model.parameters(), lr=0.2, tol=0.05, euclidean="adam", model=model)
    return geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-2)


def batches():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, generator=g)
    out = []
    for _ in range(STEPS):
        x = torch.randn(2, 12, 8, generator=g)
        out.append((x, torch.tanh(x @ target)))
    return out


def train(kind, model, opt, scaler, sched, data, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = data[step]
        for micro in range(2):
            loss = ((model(x[micro]) - y[micro]) ** 2).mean() / 2
            scaler.scale(loss).backward()
            losses.append(float(loss.detach()))
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
    return losses


def components(kind):
    model = make_model()
    opt = make_optimizer(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, scaler, sched


@pytest.mark.parametrize("kind", ["geometric-adam", "dlrt", "riemannian-adam"])
def test_accumulate_scale_clip_schedule_checkpoint_resume(kind):
    data = batches()
    model, opt, scaler, sched = components(kind)
    losses = train(kind, model, opt, scaler, sched, data, 0, SAVE_AT)
    buf = io.BytesIO()
    torch.save(
        {k: c.state_dict() for k, c in zip(("model", "opt", "scaler", "sched"), (model, opt, scaler, sched))}, buf
    )
    losses += train(kind, model, opt, scaler, sched, data, SAVE_AT, STEPS)
    assert losses[-1] < losses[0]
    for layer in (model[2], model[4]):
        ok, why = layer.manifold.check_point_on_manifold(layer.weight, explain=True, atol=1e-5, rtol=1e-5)
        assert ok, why
    # resume from the checkpoint in freshly built objects: bit-identical continuation
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2, scaler2, sched2 = components(kind)
    for key, c in zip(("model", "opt", "scaler", "sched"), (model2, opt2, scaler2, sched2)):
        c.load_state_dict(ckpt[key])
    if kind == "riemannian-adam":
        # geoopt's RiemannianAdam subclasses torch.optim.Adam, whose __setstate__ turns the
        # int step into a float32 tensor, so the bias corrections would round differently
        # after a resume; restoring the int makes the continuation bit-identical.
        for state in opt2.state.values():
            state["step"] = int(state["step"])
    train(kind, model2, opt2, scaler2, sched2, data, SAVE_AT, STEPS)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    assert scaler.get_scale() == scaler2.get_scale()


def test_a_euclidean_optimizer_on_fixed_rank_points_warns_once_at_the_users_line():
    """torch.optim.AdamW on a converted model steps the packed factors as plain tensors and
    leaves the manifold: its first step warns (once per optimizer, attributed to the caller);
    Riemannian optimizers and Euclidean ones on plain tensors do not."""
    import warnings

    import geoopt

    from lowrank_manifolds.nn import LowRankLinear
    from lowrank_manifolds.optim import GeometricAdam

    def steps(make, model, n=2):
        opt = make(model.parameters())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(n):
                opt.zero_grad()
                model(torch.randn(3, 6)).sum().backward()
                opt.step()
        return [w for w in seen if "fixed-rank points" in str(w.message)]

    lowrank = torch.nn.Sequential(LowRankLinear(6, 5, 2))
    hits = steps(lambda p: torch.optim.AdamW(p, lr=1e-3), lowrank)
    assert len(hits) == 1 and "AdamW" in str(hits[0].message) and hits[0].filename == __file__
    assert not lowrank[0].manifold.check_point_on_manifold(lowrank[0].weight.detach())  # why it warns
    for make in (lambda p: geoopt.optim.RiemannianAdam(p, lr=1e-3), lambda p: GeometricAdam(p, lr=1e-3)):
        assert not steps(make, torch.nn.Sequential(LowRankLinear(6, 5, 2)))
    assert not steps(lambda p: torch.optim.AdamW(p, lr=1e-3), torch.nn.Sequential(torch.nn.Linear(6, 5)))
