"""Tests of lowrank_manifolds.nn: low-rank layers, adapters and model conversion.

Gradients are checked against dense float64 formulas written here independently:
for a loss of y = x W^T + b with G = dL/dW (computed by autograd on a dense leaf W),
autograd's factor gradients must be dU = G V S^T, dS = U^T G V, dV = G^T U S and the
Riemannian gradient must be the tangent projection
P_X(G) = UU^T G + G VV^T - UU^T G VV^T.
"""
import copy
import io
import math

import geoopt
import pytest
import torch

from lowrank_manifolds.integrators import truncation_rank
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowrank_manifolds import FixedRankManifold
from lowrank_manifolds.nn import (
    LowRankAdapterLinear,
    LowRankConv2d,
    LowRankLinear,
    add_adapters,
    convert_to_low_rank,
    export_dense,
)

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are small: one thread avoids OpenMP oversubscription on a
    busy machine (a several-fold slowdown observed); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------- helpers
def orth(rows, cols, gen):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=DT, generator=gen))
    return q


def set_general_point(man, param, gen):
    """Put a packed weight at a point with a general (non-diagonal, invertible) S."""
    u, v = orth(man.m, man.rank, gen), orth(man.n, man.rank, gen)
    s = torch.randn(man.rank, man.rank, dtype=DT, generator=gen) + 3 * torch.eye(man.rank, dtype=DT)
    with torch.no_grad():
        param.copy_(man.pack(u, s, v))
    return u, s, v


def dense_projection(u, v, g):
    pu, pv = u @ u.T, v @ v.T
    return pu @ g + g @ pv - pu @ g @ pv


def loss_fn(y, c):
    return (y * c).sum() + 0.5 * (y**2).sum()


def check_factor_and_riemannian_grads(man, param, g, atol=1e-11):
    """Compare param.grad and egrad2rgrad with dense formulas in G = dL/dW."""
    u, s, v = (t.detach() for t in man.unpack(param))
    du, ds, dv = man.unpack(param.grad)
    torch.testing.assert_close(du, g @ v @ s.T, atol=atol, rtol=0)
    torch.testing.assert_close(ds, u.T @ g @ v, atol=atol, rtol=0)
    torch.testing.assert_close(dv, g.T @ u @ s, atol=atol, rtol=0)
    rgrad = man.egrad2rgrad(param.detach(), param.grad)
    up, mm, vp = man.unpack(rgrad)
    eye_m, eye_n = torch.eye(man.m, dtype=DT), torch.eye(man.n, dtype=DT)
    torch.testing.assert_close(mm, u.T @ g @ v, atol=atol, rtol=0)
    torch.testing.assert_close(up, (eye_m - u @ u.T) @ g @ v, atol=atol, rtol=0)
    torch.testing.assert_close(vp, (eye_n - v @ v.T) @ g.T @ u, atol=atol, rtol=0)
    torch.testing.assert_close(
        man.tangent_to_dense(param.detach(), rgrad), dense_projection(u, v, g), atol=atol, rtol=0
    )


# ------------------------------------------------------------------ Linear
@pytest.mark.parametrize("n_in,n_out,rank", [(9, 6, 3), (6, 9, 2), (8, 8, 8)])
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_linear_matches_dense_forward_backward(n_in, n_out, rank, batch):
    gen = torch.Generator().manual_seed(1)
    layer = LowRankLinear(n_in, n_out, rank, dtype=DT)
    u, s, v = set_general_point(layer.manifold, layer.weight, gen)
    w = (u @ s @ v.T).requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(*batch, n_in, dtype=DT, generator=gen)
    c = torch.randn(*batch, n_out, dtype=DT, generator=gen)

    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    loss_fn(y1, c).backward()
    x2 = x.clone().requires_grad_()
    y2 = F.linear(x2, w, b)
    loss_fn(y2, c).backward()

    assert y1.shape == (*batch, n_out)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.bias.grad, b.grad, atol=1e-12, rtol=0)
    check_factor_and_riemannian_grads(layer.manifold, layer.weight, w.grad)


def test_linear_without_bias_and_dense_weight():
    gen = torch.Generator().manual_seed(2)
    layer = LowRankLinear(7, 5, 2, bias=False, dtype=DT)
    assert layer.bias is None and layer.rank == 2
    assert isinstance(layer.manifold, FixedRankManifold) and (layer.manifold.m, layer.manifold.n) == (5, 7)
    u, s, v = set_general_point(layer.manifold, layer.weight, gen)
    torch.testing.assert_close(layer.dense_weight(), u @ s @ v.T)
    x = torch.randn(4, 7, dtype=DT, generator=gen)
    torch.testing.assert_close(layer(x), x @ (u @ s @ v.T).T, atol=1e-12, rtol=0)
    U, S, V = layer.weight_factors()
    assert U.shape == (5, 2) and S.shape == (2, 2) and V.shape == (7, 2)
    assert "rank=2" in repr(layer) and "bias=False" in repr(layer)


def test_linear_init_matches_nn_linear_scale():
    torch.manual_seed(0)
    m, n, r = 40, 30, 5
    layer = LowRankLinear(n, m, r, dtype=DT)
    man = layer.manifold
    assert man.check_point_on_manifold(layer.weight)
    # ||W||_F^2 = m / 3 = E||W_dense||_F^2 for nn.Linear's kaiming_uniform(a=sqrt(5)).
    assert math.isclose(torch.linalg.matrix_norm(layer.dense_weight()).item() ** 2, m / 3, rel_tol=1e-12)
    bound = 1 / math.sqrt(n)
    assert bool((layer.bias.abs() <= bound).all())
    # Output variance: average over several draws against nn.Linear's.
    x = torch.randn(2000, n, dtype=DT)
    lr_var = torch.stack([LowRankLinear(n, m, r, bias=False, dtype=DT)(x).var() for _ in range(30)]).mean()
    d_var = torch.stack([nn.Linear(n, m, bias=False, dtype=DT)(x).var() for _ in range(30)]).mean()
    assert abs(lr_var / d_var - 1) < 0.15


# ------------------------------------------------------------------ Conv2d
def _conv_case(n_in, n_out, k, rank, stride, padding, dilation, bias, padding_mode, gen, batch=2, hw=(9, 8)):
    layer = LowRankConv2d(
        n_in, n_out, k, rank, stride=stride, padding=padding, dilation=dilation, bias=bias,
        padding_mode=padding_mode, dtype=DT,
    )
    u, s, v = set_general_point(layer.manifold, layer.weight, gen)
    kh, kw = layer.kernel_size
    w = (u @ s @ v.T).requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    x = torch.randn(batch, n_in, *hw, dtype=DT, generator=gen)

    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    c = torch.randn(y1.shape, dtype=DT, generator=gen)
    loss_fn(y1, c).backward()

    ref = nn.Conv2d(n_in, n_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias,
                    padding_mode=padding_mode, dtype=DT)
    x2 = x.clone().requires_grad_()
    # the reference module's own forward (incl. padding modes) with the dense kernel as a function of w
    y2 = ref._conv_forward(x2, w.reshape(n_out, n_in, kh, kw), b)
    loss_fn(y2, c).backward()

    torch.testing.assert_close(y1, y2, atol=1e-11, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-11, rtol=0)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, atol=1e-11, rtol=0)
    check_factor_and_riemannian_grads(layer.manifold, layer.weight, w.grad, atol=1e-10)


@pytest.mark.parametrize(
    "n_in,n_out,k,rank,stride,padding,dilation,bias,padding_mode",
    [
        (3, 8, 3, 2, 1, 0, 1, True, "zeros"),
        (3, 8, 3, 4, 2, 1, 1, False, "zeros"),  # out <= in*k*k: S folded into U
        (2, 30, (3, 2), 3, (1, 2), (2, 1), (2, 1), True, "zeros"),  # out > in*kh*kw: S folded into V
        (4, 6, 3, 3, 1, "same", 2, True, "zeros"),
        (4, 6, (2, 3), 3, 1, "same", 1, True, "reflect"),
        (4, 6, 3, 2, 1, "valid", 1, True, "zeros"),
        (3, 5, 3, 2, 2, 2, 1, True, "circular"),
        (3, 5, 3, 2, 1, (1, 2), 1, True, "replicate"),
    ],
)
def test_conv_matches_dense(n_in, n_out, k, rank, stride, padding, dilation, bias, padding_mode):
    _conv_case(n_in, n_out, k, rank, stride, padding, dilation, bias, padding_mode, torch.Generator().manual_seed(3))


@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(1, 4), n_out=st.integers(1, 6), kh=st.integers(1, 3), kw=st.integers(1, 3),
    stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), bias=st.booleans(),
    data=st.data(),
)
def test_conv_matches_dense_hypothesis(n_in, n_out, kh, kw, stride, padding, dilation, bias, data):
    rank = data.draw(st.integers(1, min(n_out, n_in * kh * kw)))
    seed = data.draw(st.integers(0, 2**16))
    _conv_case(n_in, n_out, (kh, kw), rank, stride, padding, dilation, bias, "zeros",
               torch.Generator().manual_seed(seed), hw=(7, 8))


def test_conv_unbatched_input():
    layer = LowRankConv2d(3, 4, 3, 2, padding=1, dtype=DT)
    x = torch.randn(3, 6, 6, dtype=DT)
    torch.testing.assert_close(layer(x), layer(x[None])[0])
    assert layer(x).shape == (4, 6, 6)


# ------------------------------------------------------ conversions / export
def test_linear_from_dense_full_rank_is_exact_and_exports():
    torch.manual_seed(0)
    dense = nn.Linear(7, 5, dtype=DT)
    layer = LowRankLinear.from_dense(dense, 5)
    assert layer.rank == 5 and isinstance(layer.weight, geoopt.ManifoldParameter)
    assert layer.manifold.check_point_on_manifold(layer.weight)
    x = torch.randn(3, 2, 7, dtype=DT)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-13, rtol=0)
    torch.testing.assert_close(layer.dense_weight(), dense.weight, atol=1e-13, rtol=0)
    for plain in (layer.to_dense_linear(), layer.to_factored()):
        assert not any(isinstance(p, geoopt.ManifoldParameter) for p in plain.parameters())
        torch.testing.assert_close(plain(x), dense(x), atol=1e-13, rtol=0)
    fac = layer.to_factored()
    assert [tuple(m.weight.shape) for m in fac] == [(5, 7), (5, 5)]
    assert fac[0].bias is None and fac[1].bias is not None


def test_linear_from_dense_truncates_optimally():
    torch.manual_seed(0)
    dense = nn.Linear(12, 9, dtype=DT)
    layer = LowRankLinear.from_dense(dense, 3)
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(layer.dense_weight(), best, atol=1e-12, rtol=0)
    x = torch.randn(4, 12, dtype=DT)
    torch.testing.assert_close(layer.to_factored()(x), layer(x), atol=1e-13, rtol=0)
    torch.testing.assert_close(layer.to_dense_linear()(x), layer(x), atol=1e-13, rtol=0)


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.3, 0.6, 0.95])
def test_from_dense_tolerance_chooses_smallest_rank(tol):
    torch.manual_seed(1)
    # decaying spectrum so that different tolerances give different ranks
    m, n = 10, 14
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(n, m, dtype=DT))
    sv = 2.0 ** -torch.arange(m, dtype=DT)
    dense = nn.Linear(n, m, dtype=DT)
    with torch.no_grad():
        dense.weight.copy_(u @ torch.diag(sv) @ v.T)
    layer = LowRankLinear.from_dense(dense, svd_tol=tol)
    r = layer.rank
    w = dense.weight.detach()
    err = torch.linalg.matrix_norm(w - layer.dense_weight())
    assert err <= tol * torch.linalg.matrix_norm(w) * (1 + 1e-12) + 1e-14
    if r > 1:  # rank r - 1 would violate the bound: minimality
        tail = torch.sqrt((sv[r - 1 :] ** 2).sum())
        assert tail > tol * torch.linalg.matrix_norm(w)
    assert int(truncation_rank(sv, tol)) == r
    # rank caps the tolerance-chosen rank
    assert LowRankLinear.from_dense(dense, 2, svd_tol=tol).rank == min(r, 2)


def test_conv_from_dense_and_exports():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), dtype=DT)
    full = LowRankConv2d.from_dense(conv, 5)
    x = torch.randn(2, 3, 10, 9, dtype=DT)
    torch.testing.assert_close(full(x), conv(x), atol=1e-12, rtol=0)
    low = LowRankConv2d.from_dense(conv, 2)
    for plain in (low.to_dense_conv(), low.to_factored()):
        assert not any(isinstance(p, geoopt.ManifoldParameter) for p in plain.parameters())
        torch.testing.assert_close(plain(x), low(x), atol=1e-12, rtol=0)
    fac = low.to_factored()
    assert fac[0].weight.shape == (2, 3, 3, 2) and fac[1].weight.shape == (5, 2, 1, 1)
    assert low.to_dense_conv().weight.shape == conv.weight.shape
    w = conv.weight.detach().reshape(5, -1)
    err = torch.linalg.matrix_norm(w - low.dense_weight())
    tl = LowRankConv2d.from_dense(conv, svd_tol=err.item() / torch.linalg.matrix_norm(w).item() + 1e-9)
    assert tl.rank == 2


def small_net(dtype=DT):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=4, padding=1, dtype=dtype),  # grouped: skipped
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 64, dtype=dtype),
        nn.ReLU(),
        nn.Sequential(nn.Linear(64, 64, dtype=dtype), nn.Tanh()),
        nn.Linear(64, 3, dtype=dtype),  # r (m + n + r) >= m n: skipped
    )


def test_convert_to_low_rank_and_export_round_trip():
    torch.manual_seed(0)
    net = small_net()
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    out = convert_to_low_rank(net, 4)
    assert out is net  # in place
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["LowRankConv2d", "ReLU", "Conv2d", "Flatten", "LowRankLinear", "ReLU", "Sequential", "Linear"]
    assert isinstance(net[6][0], LowRankLinear)
    y = net(x)
    for factored in (False, True):
        plain = export_dense(copy.deepcopy(net), factored=factored)
        assert not any(isinstance(p, geoopt.ManifoldParameter) for p in plain.parameters())
        assert not any(isinstance(m, (LowRankLinear, LowRankConv2d)) for m in plain.modules())
        torch.testing.assert_close(plain(x), y, atol=1e-12, rtol=0)
    # weights of exact rank 3: a tolerance conversion finds rank 3 and is exact
    net2 = small_net()
    with torch.no_grad():
        for mod in (net2[0], net2[4], net2[6][0]):
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            mod.weight.copy_((w[:, :3] @ torch.randn(3, w.shape[1], dtype=DT)).reshape(mod.weight.shape))
    ref = copy.deepcopy(net2)
    convert_to_low_rank(net2, svd_tol=1e-10)
    assert [net2[i].rank for i in (0, 4)] == [3, 3] and net2[6][0].rank == 3
    torch.testing.assert_close(net2(x), ref(x), atol=1e-12, rtol=0)


def test_convert_include_exclude_and_skips():
    torch.manual_seed(0)
    net = small_net()
    convert_to_low_rank(net, 4, include=["4", "6.*"], exclude="6.0")
    assert isinstance(net[4], LowRankLinear)
    assert type(net[0]) is nn.Conv2d and type(net[6][0]) is nn.Linear
    # the saving rule: 8 x 8 at rank 3 stores 3 * 19 = 57 < 64 numbers, rank 4 stores 80 >= 64
    assert isinstance(convert_to_low_rank(nn.Linear(8, 8), 3), LowRankLinear)
    assert type(convert_to_low_rank(nn.Linear(8, 8), 4)) is nn.Linear
    # tied weights and nn.Linear subclasses (MultiheadAttention.out_proj) are left alone
    tied = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    tied[1].weight = tied[0].weight
    convert_to_low_rank(tied, 2)
    assert all(type(m) is nn.Linear for m in tied)
    mha = nn.MultiheadAttention(32, 4)
    convert_to_low_rank(mha, 2)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_convert_then_train_with_riemannian_adam():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 1))
    convert_to_low_rank(net, 4, exclude="4")
    x = torch.randn(128, 20)
    target = torch.sin(x[:, :3].sum(1, keepdim=True))
    opt = geoopt.optim.RiemannianAdam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for layer in (net[0], net[2]):
        assert isinstance(layer.weight, geoopt.ManifoldParameter)
        assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-5)
        assert layer.rank == 4


# ------------------------------------------------------------------ adapters
def test_adapter_exact_init_forward_backward_and_merge():
    gen = torch.Generator().manual_seed(4)
    base = nn.Linear(9, 6, dtype=DT)
    ref = copy.deepcopy(base)
    ad = LowRankAdapterLinear(base, 2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in ad.named_parameters() if p.requires_grad] == ["delta"]
    x = torch.randn(3, 9, dtype=DT, generator=gen)
    torch.testing.assert_close(ad(x), ref(x), atol=1e-13, rtol=0)  # unchanged at init
    s = ad.delta_factors()[1]
    ref_scale = torch.linalg.matrix_norm(ref.weight.detach()) / math.sqrt(6)
    torch.testing.assert_close(torch.diagonal(s), torch.full((2,), 1e-3, dtype=DT) * ref_scale)

    u, s, v = set_general_point(ad.manifold, ad.delta, gen)
    w0 = ad.base.weight.detach()
    w = (w0 + u @ s @ v.T).requires_grad_()
    c = torch.randn(3, 6, dtype=DT, generator=gen)
    x1 = x.clone().requires_grad_()
    loss_fn(ad(x1), c).backward()
    x2 = x.clone().requires_grad_()
    y2 = F.linear(x2, w, ad.base.bias)
    loss_fn(y2, c).backward()
    torch.testing.assert_close(ad(x), y2, atol=1e-12, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    check_factor_and_riemannian_grads(ad.manifold, ad.delta, w.grad)
    merged = ad.merge()
    assert type(merged) is nn.Linear and merged.weight.requires_grad
    torch.testing.assert_close(merged(x), ad(x), atol=1e-13, rtol=0)


def test_adapter_inexact_init_keeps_base():
    base = nn.Linear(9, 6, dtype=DT)
    w0 = base.weight.detach().clone()
    ad = LowRankAdapterLinear(base, 2, init_scale=1e-6, exact_init=False)
    assert torch.equal(base.weight, w0)
    x = torch.randn(3, 9, dtype=DT)
    assert (ad(x) - base(x)).abs().max() < 1e-4


def test_add_adapters_fine_tune_and_merge():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    ref = copy.deepcopy(net)
    x = torch.randn(64, 16)
    target = torch.randn(64, 2)
    add_adapters(net, 4, exclude="4")
    assert isinstance(net[0], LowRankAdapterLinear) and isinstance(net[2], LowRankAdapterLinear)
    assert type(net[4]) is nn.Linear and not net[4].weight.requires_grad
    torch.testing.assert_close(net(x), ref(x), atol=1e-6, rtol=0)
    params = [p for p in net.parameters() if p.requires_grad]
    assert len(params) == 2
    opt = geoopt.optim.RiemannianAdam(params, lr=1e-2)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    assert net[0].manifold.check_point_on_manifold(net[0].delta)
    y = net(x)
    plain = export_dense(net)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in plain)
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=0)


# -------------------------------------------- memory: no dense m x n tensor
class NumelRecorder(TorchDispatchMode):
    """Records ``(op, numel)`` for every tensor output of every aten op run under it.

    A ``TorchDispatchMode`` sees each operator after autograd, so it observes the
    forward ops and also the backward ops that the autograd engine runs (on CPU, in
    the calling thread). ``max_numel`` is the largest tensor any op produced: if it
    stays below ``m * n / 4`` no m x n weight-sized tensor was ever formed.
    """

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.records.append((str(func), t.numel()))
        return out

    @property
    def max_numel(self):
        return max(n for _, n in self.records)


def test_linear_never_forms_dense_weight():
    n = m = 4096
    layer = LowRankLinear(n, m, 8)
    x = torch.randn(4, 3, n, requires_grad=True)
    with NumelRecorder() as rec:
        y = layer(x)
        y.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert any("mm" in op for op, _ in rec.records)  # the recorder saw the products
    assert rec.max_numel < m * n // 4, sorted(rec.records, key=lambda r: -r[1])[:3]


def test_conv_never_forms_dense_kernel():
    layer = LowRankConv2d(256, 256, 3, 4)
    x = torch.randn(1, 256, 4, 4, requires_grad=True)
    with NumelRecorder() as rec:
        layer(x).sum().backward()
    assert rec.max_numel < 256 * 256 * 9 // 4


# ------------------------------------------------------------ meta / devices
def test_meta_device_forward_backward():
    lin = LowRankLinear(64, 32, 4, device="meta")
    y = lin(torch.empty(5, 64, device="meta"))
    y.sum().backward()
    assert y.shape == (5, 32) and y.device.type == "meta" and lin.weight.grad.shape == lin.weight.shape
    conv = LowRankConv2d(3, 8, 3, 2, padding=1, device="meta")
    assert conv(torch.empty(2, 3, 7, 7, device="meta")).shape == (2, 8, 7, 7)
    ad = LowRankAdapterLinear(nn.Linear(16, 8, device="meta"), 2)
    assert ad(torch.empty(3, 16, device="meta")).shape == (3, 8)


def test_orthographic_retraction_layers_train_and_keep_their_retraction():
    torch.manual_seed(1)
    lin = LowRankLinear(20, 16, 4, retraction="orthographic", dtype=DT)
    conv = LowRankConv2d(3, 6, 3, 2, retraction="orthographic", dtype=DT)
    assert lin.manifold.retraction == "orthographic" and conv.manifold.retraction == "orthographic"
    # the optimizer's step is the manifold's orthographic map, not the metric one
    x0 = lin.weight.detach().clone().as_subclass(torch.Tensor)
    xi = lin.manifold.random_tangent(x0) * 0.3
    ortho = FixedRankManifold(16, 20, 4, retraction="orthographic").retr(x0, xi)
    metric = FixedRankManifold(16, 20, 4).retr(x0, xi)
    torch.testing.assert_close(lin.manifold.retr(x0, xi), ortho)
    assert (lin.manifold.to_dense(ortho) - lin.manifold.to_dense(metric)).norm() > 1e-6
    x = torch.randn(64, 20, dtype=DT)
    planted = torch.randn(16, 4, dtype=DT) @ torch.randn(4, 20, dtype=DT) * 0.3  # rank 4: reachable
    target = x @ planted.T

    def train(retraction):
        torch.manual_seed(2)
        layer = LowRankLinear(20, 16, 4, retraction=retraction, dtype=DT, second_moment="scalar")
        opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=0.2)  # the scalar moment's rate
        for _ in range(100):
            opt.zero_grad()
            loss = F.mse_loss(layer(x), target)
            loss.backward()
            opt.step()
        return layer, loss.item()

    start = F.mse_loss(LowRankLinear(20, 16, 4, dtype=DT)(x), target).item()
    lin, loss_ortho = train("orthographic")
    _, loss_metric = train("metric")
    assert loss_ortho < 0.05 * start
    # both retractions are second order: Adam's small steps give nearly the same path
    assert abs(loss_ortho - loss_metric) < 0.05 * loss_metric
    assert lin.manifold.check_point_on_manifold(lin.weight, atol=1e-10)
    # re-wrapped parameters keep the manifold, retraction included
    moved = LowRankLinear(20, 16, 4, retraction="orthographic", device="meta").to_empty(device="cpu")
    assert moved.weight.manifold.retraction == "orthographic"
    with pytest.raises(ValueError, match="orthographic"):
        LowRankLinear(20, 16, 4, max_rank=6, retraction="orthographic")
    with pytest.raises(ValueError, match="retraction"):
        LowRankLinear(20, 16, 4, retraction="cayley")


def test_module_conversions_keep_manifold_parameter():
    lin = LowRankLinear(12, 10, 3, device="meta").to_empty(device="cpu")
    assert isinstance(lin.weight, geoopt.ManifoldParameter) and lin.weight.manifold.rank == 3
    lin.reset_parameters()
    assert lin.manifold.check_point_on_manifold(lin.weight)
    lin = lin.double()
    assert isinstance(lin.weight, geoopt.ManifoldParameter) and lin.weight.dtype == DT
    clone = copy.deepcopy(lin)
    x = torch.randn(2, 12, dtype=DT)
    torch.testing.assert_close(clone(x), lin(x))
    fresh = LowRankLinear(12, 10, 3, dtype=DT)
    fresh.load_state_dict(lin.state_dict())
    torch.testing.assert_close(fresh(x), lin(x))
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), lin(x))


def test_from_dense_does_not_consume_rng():
    dense, conv = nn.Linear(10, 8), nn.Conv2d(2, 4, 3)
    state = torch.get_rng_state()
    LowRankLinear.from_dense(dense, 3)
    LowRankConv2d.from_dense(conv, 2)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------ errors
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(5, 4, 5)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(5, 4, 0)
    with pytest.raises(TypeError, match="rank"):
        LowRankLinear(5, 4, 2.0)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 4, 1)
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(4, 4, 3, 2, groups=2)
    with pytest.raises(TypeError, match="kernel_size"):
        LowRankConv2d(4, 4, (3, 3, 3), 2)
    with pytest.raises(ValueError, match="kernel_size"):
        LowRankConv2d(4, 4, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        LowRankConv2d(1, 8, 2, 5)  # n = 1 * 2 * 2 = 4 < 5
    with pytest.raises(ValueError, match="same"):
        LowRankConv2d(4, 4, 3, 2, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        LowRankConv2d(4, 4, 3, 2, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_dense(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_dense(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="svd_tol"):
        LowRankLinear.from_dense(nn.Linear(4, 4), svd_tol=1.5)
    zero = nn.Linear(4, 4)
    with torch.no_grad():
        zero.weight.zero_()
    with pytest.raises(ValueError, match="rank < 1"):
        LowRankLinear.from_dense(zero, 1)
    with pytest.raises(ValueError, match="init_scale"):
        LowRankAdapterLinear(nn.Linear(4, 4), 2, init_scale=0.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankAdapterLinear(nn.Conv2d(4, 4, 1), 2)
    with pytest.raises(ValueError, match="rank"):
        convert_to_low_rank(nn.Linear(4, 4))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="in_features=5"):
        LowRankLinear(5, 4, 2)(torch.randn(3, 6))
    with pytest.raises(ValueError, match="in_features=5"):
        LowRankLinear(5, 4, 2)(torch.tensor(1.0))
    with pytest.raises(TypeError, match="Tensor"):
        LowRankLinear(5, 4, 2)([1.0] * 5)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        LowRankConv2d(3, 4, 3, 2)(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        LowRankConv2d(3, 4, 3, 2)(torch.randn(8, 8))
    with pytest.raises(ValueError, match="in_features=5"):
        LowRankAdapterLinear(nn.Linear(5, 4), 2)(torch.randn(2, 4))


# ------------------------------------------------------- capacity (max_rank)
def _planted_regression(n_in=14, n_out=12, rank=3, batch=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = orth(n_out, rank, g) @ torch.diag(torch.tensor([3.0, 2.0, 1.0][:rank], dtype=DT)) @ orth(n_in, rank, g).T
    x = torch.randn(batch, n_in, dtype=DT, generator=g)
    return x, x @ w.T


def _train_rsgd(layer, x, y, steps, lr=0.5):
    opt = geoopt.optim.RiemannianSGD(layer.parameters(), lr=lr)
    ranks = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((layer(x) - y) ** 2).sum(-1).mean()).backward()
        opt.step()
        ranks.append(layer.active_rank)
    return opt, ranks


def _check_capacity_point(layer):
    man, r = layer.manifold, layer.active_rank
    ok, msg = man._check_point_on_manifold(layer.weight.detach(), atol=1e-10, rtol=0)
    assert ok, msg
    u, s, v = man.unpack(layer.weight.detach())
    assert torch.all(u[:, r:] == 0) and torch.all(v[:, r:] == 0) and torch.all(s[r:] == 0)
    assert int(man.active_rank(layer.weight)) == r


@pytest.mark.parametrize("start", [1, 5])
def test_capacity_layer_rank_adapts_under_stock_geoopt(start):
    """RiemannianSGD (unmodified) on a LowRankLinear with max_rank: the active rank moves
    (grows from 1, shrinks from 5) to the planted rank 3, the shape stays, and the forward
    equals the dense equivalent all along."""
    x, y = _planted_regression()
    torch.manual_seed(1)
    layer = LowRankLinear(14, 12, rank=start, max_rank=6, tol=1e-3, dtype=DT)
    assert layer.active_rank == start and layer.capacity == 6 and layer.rank == start
    assert layer.weight.shape == (12 + 6 + 14, 6)
    assert "max_rank=6" in repr(layer)
    _, ranks = _train_rsgd(layer, x, y, 200)
    assert ranks[-1] == 3 and set(ranks) != {start}, ranks
    _check_capacity_point(layer)
    dense = layer.to_dense_linear()
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(layer.dense_weight().detach()) == 3
    loss = 0.5 * ((layer(x) - y) ** 2).sum(-1).mean()
    assert float(loss.detach()) < 1e-6


def test_capacity_state_dict_round_trip_and_export_after_rank_change():
    x, y = _planted_regression()
    torch.manual_seed(2)
    layer = LowRankLinear(14, 12, rank=5, max_rank=6, tol=1e-3, dtype=DT)
    opt, ranks = _train_rsgd(layer, x, y, 60)
    r = layer.active_rank
    assert r != 5, ranks
    # state_dict (layer and optimizer) round trip into a freshly built layer
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    torch.manual_seed(99)
    twin = LowRankLinear(14, 12, rank=5, max_rank=6, tol=1e-3, dtype=DT)
    twin.load_state_dict(saved["model"])
    assert isinstance(twin.weight, geoopt.ManifoldParameter) and twin.weight.manifold.adaptive
    assert twin.active_rank == r
    torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)
    opt2 = geoopt.optim.RiemannianSGD(twin.parameters(), lr=0.5)
    opt2.load_state_dict(saved["opt"])
    for lay, o in ((layer, opt), (twin, opt2)):
        o.zero_grad()
        (0.5 * ((lay(x) - y) ** 2).sum(-1).mean()).backward()
        o.step()
    torch.testing.assert_close(twin.weight, layer.weight, atol=0, rtol=0)
    # export trims to the active rank
    r = layer.active_rank
    fac = layer.to_factored()
    assert fac[0].weight.shape == (r, 14) and fac[1].weight.shape == (12, r)
    torch.testing.assert_close(fac(x), layer(x), atol=1e-12, rtol=0)
    model = export_dense(nn.Sequential(copy.deepcopy(layer)), factored=True)
    assert model[0][0].out_features == r
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in model.parameters())
    torch.testing.assert_close(model(x), layer(x), atol=1e-12, rtol=0)


def test_capacity_conv_and_adapter():
    torch.manual_seed(3)
    conv = LowRankConv2d(3, 8, 3, rank=2, max_rank=5, tol=1e-2, padding=1, dtype=DT)
    assert conv.weight.shape == (8 + 5 + 27, 5) and conv.active_rank == 2 and conv.capacity == 5
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    torch.testing.assert_close(conv(x), conv.to_dense_conv()(x), atol=1e-12, rtol=0)
    fac = conv.to_factored()
    assert fac[0].out_channels == 2
    torch.testing.assert_close(fac(x), conv(x), atol=1e-12, rtol=0)
    # one stock RSGD step grows the rank of a conv (gradient directions are added)
    opt = geoopt.optim.RiemannianSGD(conv.parameters(), lr=0.1)
    (conv(x) ** 2).sum().backward()
    opt.step()
    assert conv.active_rank > 2
    torch.testing.assert_close(conv(x), conv.to_dense_conv()(x), atol=1e-12, rtol=0)
    # adapters
    base = nn.Linear(10, 7, dtype=DT)
    ad = LowRankAdapterLinear(base, 2, max_rank=4, tol=1e-6)
    assert ad.delta.shape == (7 + 4 + 10, 4) and ad.active_rank == 2 and ad.capacity == 4
    xa = torch.randn(5, 10, dtype=DT)
    torch.testing.assert_close(ad(xa), ad.merge()(xa), atol=1e-12, rtol=0)
    model = add_adapters(nn.Sequential(nn.Linear(10, 7, dtype=DT)), 2, max_rank=30, tol=1e-6)
    assert model[0].capacity == 7


def test_capacity_from_dense_and_convert():
    torch.manual_seed(4)
    lin = nn.Linear(30, 20, dtype=DT)
    low = LowRankLinear.from_dense(lin, tol=0.5, max_rank=12)  # the weight's policy also cuts the SVD
    r_ref = int(truncation_rank(torch.linalg.svdvals(lin.weight.detach()), 0.5))
    assert low.capacity == 12 and low.active_rank == min(r_ref, 12)
    assert low.manifold.truncation.tol == 0.5  # tol is also the training tolerance by default
    low2 = LowRankLinear.from_dense(lin, rank=3, max_rank=8, tol=1e-4)
    assert low2.active_rank == 3 and low2.manifold.truncation.tol == 1e-4
    full = LowRankLinear.from_dense(lin, max_rank=20)
    torch.testing.assert_close(full.dense_weight(), lin.weight, atol=1e-12, rtol=0)
    conv = nn.Conv2d(4, 6, 3, dtype=DT)
    lc = LowRankConv2d.from_dense(conv, rank=2, max_rank=4)
    assert lc.capacity == 4 and lc.active_rank == 2
    model = nn.Sequential(nn.Linear(40, 30, dtype=DT), nn.ReLU(), nn.Linear(30, 40, dtype=DT))
    convert_to_low_rank(model, rank=4, max_rank=8, tol=1e-3)
    for i in (0, 2):
        assert model[i].capacity == 8 and model[i].active_rank == 4
        assert model[i].manifold.truncation.tol == 1e-3
    with pytest.raises(ValueError, match="max_rank"):
        LowRankLinear(10, 8, 3, tol=0.1)  # tol without a capacity
    with pytest.raises(ValueError, match="max_rank"):
        LowRankLinear(10, 8, 3, max_rank=2)
    with pytest.raises(ValueError, match="max_rank"):
        LowRankLinear(10, 8, 3, max_rank=9)
    with pytest.raises(ValueError, match="exceeds max_rank"):
        convert_to_low_rank(copy.deepcopy(model), rank=9, max_rank=8)


def test_conversion_deprecated_spellings_keep_their_meaning():
    """The old spellings (``tol`` as the initial cut, ``rank_tol`` as the truncation tolerance,
    a ``max_rank`` above ``min(m, n)`` clipped) warn and build what the new names build."""
    torch.manual_seed(5)
    lin = nn.Linear(30, 20, dtype=DT)
    with pytest.warns(DeprecationWarning, match="svd_tol"):
        old = LowRankLinear.from_dense(lin, tol=0.5)
    assert old.rank == LowRankLinear.from_dense(lin, svd_tol=0.5).rank
    with pytest.warns(DeprecationWarning, match="rank_tol"):
        old = LowRankLinear.from_dense(lin, tol=0.5, max_rank=12, rank_tol=1e-3)
    new = LowRankLinear.from_dense(lin, svd_tol=0.5, max_rank=12, tol=1e-3)
    assert (old.active_rank, old.capacity, old.manifold.truncation.tol) == (new.active_rank, 12, 1e-3)
    torch.testing.assert_close(old.weight, new.weight, atol=0, rtol=0)
    with pytest.warns(DeprecationWarning, match="clipped"):
        assert LowRankLinear.from_dense(lin, max_rank=25).capacity == 20
    with pytest.raises(TypeError, match="svd_tol"), pytest.warns(DeprecationWarning):
        LowRankLinear.from_dense(lin, svd_tol=0.5, max_rank=12, rank_tol=1e-3)
    with pytest.warns(DeprecationWarning, match="svd_tol"):
        model = convert_to_low_rank(nn.Sequential(copy.deepcopy(lin)), tol=0.5)
    assert model[0].rank == new.active_rank
    with pytest.warns(DeprecationWarning, match="rank_tol"):
        model = convert_to_low_rank(nn.Sequential(copy.deepcopy(lin)), rank=4, max_rank=8, rank_tol=1e-3)
    assert model[0].manifold.truncation.tol == 1e-3 and model[0].capacity == 8
