"""float16 and bfloat16 points and layers on the CPU.

LAPACK has no half-precision QR or SVD: the factorisations run in float32 (the QRs of the
bases) or float64 (the small cores) and the results are rounded back, so every path works and
agrees with float32 on the same (half-rounded) inputs to the half dtype's precision. The
reference is the float32 computation of the same operation.
"""
import copy

import pytest
import torch
from torch import nn

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.nn import add_adapters, convert_to_low_rank, export_dense

HALF = [torch.float16, torch.bfloat16]


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kw", [{}, {"max_rank": 5}, {"retraction": "orthographic"},
                                {"max_rank": 5, "retraction": "abc-psi"}], ids=["metric", "capacity", "ortho", "abc-psi"])
def test_manifold_operations_in_half_precision_agree_with_float32(dtype, kw):
    torch.manual_seed(0)
    mf = FixedRankManifold(20, 15, 3, **kw)
    x = mf.random(dtype=dtype)
    assert x.dtype == dtype
    u = mf.random_tangent(x)
    g = torch.randn_like(x)
    x32, u32, g32 = x.float(), u.float(), g.float()
    eps = torch.finfo(dtype).eps
    for op, args, args32 in (("retr", (x, 0.3 * u), (x32, 0.3 * u32)), ("projx", (x,), (x32,)),
                             ("egrad2rgrad", (x, g), (x32, g32)), ("proju", (x, g), (x32, g32))):
        out, ref = getattr(mf, op)(*args), getattr(mf, op)(*args32)
        assert out.dtype == dtype and torch.isfinite(out).all(), op
        if op in ("retr", "projx"):  # compare the matrices: the factors' gauge may differ
            out, ref = mf.to_dense(out), mf.to_dense(ref)
        assert rel(out, ref) < 20 * eps, (op, rel(out, ref))
    y = mf.retr(x, 0.3 * u)
    tol = 20 * eps
    assert mf.check_point_on_manifold(y, atol=tol, rtol=tol)
    t = mf.transp(x, y, u)
    assert t.dtype == dtype and rel(t, mf.transp(x32, y.float(), u32)) < 20 * eps


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("how", ["rank", "svd_tol", "adapters"])
def test_layers_convert_adapt_and_export_in_half_precision(dtype, how):
    """The half model against the same model (its half-rounded weights) in float32."""
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10)).to(dtype)
    ref = copy.deepcopy(half).float()
    x = torch.randn(4, 30)
    for model in (half, ref):
        torch.manual_seed(1)  # the adapters' random initial corrections alike
        if how == "rank":
            convert_to_low_rank(model, rank=4, max_rank=6)
        elif how == "svd_tol":
            convert_to_low_rank(model, svd_tol=0.5)
        else:
            add_adapters(model, rank=3)
    assert all(p.dtype == dtype for p in half.parameters())
    eps = torch.finfo(dtype).eps
    out = half(x.to(dtype))
    out.float().sum().backward()
    assert out.dtype == dtype and all(torch.isfinite(p.grad).all() for p in half.parameters() if p.requires_grad)
    assert rel(out, ref(x)) < 50 * eps, rel(out, ref(x))
    merged = export_dense(half)
    assert rel(merged(x.to(dtype)), ref(x)) < 50 * eps


def _makers():
    import geoopt

    from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD

    return {
        "GeometricSGD": lambda m: GeometricSGD(m.parameters(), lr=0.05),
        "GeometricAdam": lambda m: GeometricAdam(m.parameters(), lr=1e-2),
        # the dense head at Adam's 1e-2, as beside the other cores (DLRT's default beside a flow
        # core's h is Adam's 1e-3, too slow to show progress in 20 steps)
        "DLRT abc-psi": lambda m: DLRT(m.parameters(), lr=0.1, model=m, euclidean_lr=1e-2),
        "DLRT augmented-bug adam": lambda m: DLRT(m.parameters(), lr=1e-2, integrator="augmented-bug", core="adam",
                                                  model=m),
        "RiemannianAdam": lambda m: geoopt.optim.RiemannianAdam(m.parameters(), lr=1e-2),
    }


@pytest.mark.parametrize("name", list(_makers()))
def test_bfloat16_training_follows_float32(name):
    """20 steps of each optimizer on a rank-adaptive layer and a dense head in bfloat16 against the
    same model in float32: the losses agree to bf16's precision along the way and every weight
    stays finite and on the manifold (to bf16's tolerance)."""
    from lowrank_manifolds.nn import LowRankLinear

    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.randn(
        32, 5, generator=torch.Generator().manual_seed(2))
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(LowRankLinear(16, 24, 4, max_rank=6, tol=0.01), nn.ReLU(), nn.Linear(24, 5)).to(dtype)
        opt = _makers()[name](model)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        lr_layer = model[0]
        tol = 20 * torch.finfo(dtype).eps
        assert lr_layer.manifold.check_point_on_manifold(lr_layer.weight.detach(), atol=tol, rtol=tol)
        curves[dtype] = torch.tensor(losses)
    ref, half = curves[torch.float32], curves[torch.bfloat16]
    assert half[-1] < 0.9 * half[0]
    assert float(((half - ref).abs() / ref).max()) < 0.05, (half, ref)


def test_a_bfloat16_llama_fine_tunes_with_each_optimizer():
    """Adapters on a tiny bf16 Llama (from a config): a few steps of each optimizer lower the loss
    of a fixed batch, every weight finite, the base weights untouched."""
    transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[hf]'")
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(1))
    for name, make in _makers().items():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        add_adapters(model, rank=4, max_rank=8, tol=0.05, include=["*.q_proj", "*.v_proj"])
        base = {k: v.clone() for k, v in model.state_dict().items() if "base" in k}
        opt = make(model)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], (name, losses)
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items()), name
