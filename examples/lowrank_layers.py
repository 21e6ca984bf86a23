"""Compress an MLP to low rank, fine-tune it on the manifold, export plain layers.

    python examples/lowrank_layers.py [--seed 0] [--threads 1]
    python examples/lowrank_layers.py --smoke    # a smaller task, a few steps per stage

1. train a small dense MLP on a synthetic regression task (a stand-in for a
   pretrained model);
2. ``convert_to_low_rank``: truncated SVD of its hidden layers (relative tolerance);
3. fine-tune the compressed model with geoopt's stock ``RiemannianAdam``: the
   weights stay on the fixed-rank manifold, so the rank never grows;
4. ``export_dense(..., factored=True)``: two thin ``nn.Linear`` per layer, no
   dependence on this library, same outputs;
5. fine-tuning mode: ``add_adapters`` (frozen dense base + rank-r correction),
   then merge back into plain ``nn.Linear`` layers.

Seeded; runs in a few seconds on a CPU.
"""
import argparse
import copy

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_manifolds.nn import add_adapters, convert_to_low_rank, export_dense


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(model, x, y, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def main():
    parser = argparse.ArgumentParser(description="compress an MLP, fine-tune it on the manifold, export it")
    parser.add_argument("--smoke", action="store_true", help="a smaller task, a few steps per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    # The matrices here are tiny: one thread is fastest (no OpenMP spin-waiting on
    # a busy machine) and makes the printed numbers reproducible.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d_in, hidden, d_out, n = (32, 64, 8, 128) if args.smoke else (32, 128, 8, 1024)
    pre_steps, tune_steps = (20, 10) if args.smoke else (200, 100)
    # a teacher whose hidden maps have a decaying spectrum, so low rank is a fair model
    teacher = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    with torch.no_grad():
        for lin in (teacher[0], teacher[2]):
            u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
            s = 3 * s[0] * 0.7 ** torch.arange(s.numel(), dtype=s.dtype)
            lin.weight.copy_(u @ torch.diag(s) @ vh)
    x = torch.randn(n, d_in)
    y = teacher(x).detach()
    x_test = torch.randn(512, d_in)
    y_test = teacher(x_test).detach()

    # 1. "pretrained" dense model
    dense = nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)
    )
    loss = train(dense, x, y, torch.optim.Adam(dense.parameters(), lr=3e-3), pre_steps)
    print(f"dense model:       {n_params(dense):7d} parameters, train MSE {loss:.4f}")

    # 2. compress: every layer whose rank-r factors store fewer numbers than W
    low = convert_to_low_rank(copy.deepcopy(dense), rank=16, svd_tol=0.3)
    ranks = [m.rank for m in low.modules() if hasattr(m, "rank")]
    with torch.no_grad():
        loss0 = F.mse_loss(low(x), y).item()
    print(f"low-rank model:    {n_params(low):7d} parameters, ranks {ranks}, MSE after SVD {loss0:.4f}")

    # 3. fine-tune on the manifold (stock geoopt optimizer)
    opt = geoopt.optim.RiemannianAdam(low.parameters(), lr=3e-3)
    loss1 = train(low, x, y, opt, tune_steps)
    print(f"after fine-tuning:                     train MSE {loss1:.4f}")
    for name, p in low.named_parameters():
        if isinstance(p, geoopt.ManifoldParameter):
            assert p.manifold.check_point_on_manifold(p), name

    # 4. export to plain PyTorch layers
    factored = export_dense(copy.deepcopy(low), factored=True)
    flat = export_dense(copy.deepcopy(low))
    with torch.no_grad():
        ref = low(x_test)
        diff_f = (factored(x_test) - ref).abs().max().item()
        diff_d = (flat(x_test) - ref).abs().max().item()
        test_mse = F.mse_loss(ref, y_test).item()
    print(f"exported factored: {n_params(factored):7d} parameters, max |diff| {diff_f:.2e}, test MSE {test_mse:.4f}")
    print(f"exported dense:    {n_params(flat):7d} parameters, max |diff| {diff_d:.2e}")

    # 5. fine-tuning mode: a shifted task, frozen dense base + rank-4 corrections
    y_shift = y + 0.3 * torch.tanh(x[:, :d_out])
    adapted = add_adapters(copy.deepcopy(dense), rank=4, exclude="4")
    with torch.no_grad():
        same = (adapted(x_test) - dense(x_test)).abs().max().item()
        before = F.mse_loss(adapted(x), y_shift).item()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    after = train(adapted, x, y_shift, geoopt.optim.RiemannianAdam(trainable, lr=1e-2), tune_steps)
    merged = export_dense(copy.deepcopy(adapted))
    with torch.no_grad():
        diff_m = (merged(x_test) - adapted(x_test)).abs().max().item()
    print(
        f"adapters:          {n_trainable(adapted):7d} trainable of {n_params(adapted)}, "
        f"init max |diff| {same:.2e}, shifted-task MSE {before:.4f} -> {after:.4f}"
    )
    print(f"merged adapters:   {n_params(merged):7d} parameters, max |diff| {diff_m:.2e}")


if __name__ == "__main__":
    main()
