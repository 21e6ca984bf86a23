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
    return float((a.float() - b.float()).norm() / b.float().norm())


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
