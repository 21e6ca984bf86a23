"""Low-rank training of an MLP on scikit-learn's bundled digits (8x8, no download).

MLP 64-256-256-10 (ReLU); the two hidden layers are low-rank
(``LowRankLinear(n, m, rank=R, max_rank=R, tol=tol)``: capacity R), the output layer dense.
Compared:

* dense Adam (the reference);
* LoRA + Adam: plain factors W = P Q^T of rank R (Euclidean);
* geoopt RiemannianAdam (unmodified) on the layers' rank-adaptive FixedRankManifold
  (capacity R, truncation by ``--tol`` at every retraction), at its own rate on the low-rank
  weights (``--riemannian-lr``; the row-wise second moment, the default, takes Adam-like rates);
* GeometricAdam (this package), rank adaptive (``--tol``);
* DLRT with abc-PSI and with augmented BUG, rank adaptive, one forward/backward per step
  (the recorded (x, dY) pair serves every product with G).

Reports test accuracy, parameters and compression of the hidden layers (a rank-r
layer stores r (m + n) + r numbers: U, V and the diagonal of S), final ranks and time
per epoch; saves accuracy and rank curves to ``examples/output/digits.png``.

    python examples/digits.py --quick          # < 1 min
    python examples/digits.py --epochs 60
    python examples/digits.py --smoke          # seconds: 2 epochs on 512 samples, capacity 16
"""
import time

import geoopt
import torch
from torch import nn

from _common import (curve, format_table, integer_ticks, legend, log_scale, new_figure, parse_args, progress, report,
                     save_figure, styles)
from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam

SIZES = [64, 256, 256, 10]


def load(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(0), xtr.std(0) + 0.1
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


class LoRALinear(nn.Module):
    """W = P Q^T with plain (Euclidean) factors, the LoRA parametrisation."""

    def __init__(self, n, m, rank):
        super().__init__()
        self.p = nn.Parameter(torch.randn(m, rank) * (1.0 / rank) ** 0.5 * (1 / 3) ** 0.5)
        self.q = nn.Parameter(torch.randn(n, rank) / n**0.5)
        self.bias = nn.Parameter(torch.zeros(m))

    def forward(self, x):
        return (x @ self.q) @ self.p.T + self.bias


def mlp(kind, cap, tol=0.0):
    layers = []
    for i, (n, m) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        hidden = i < len(SIZES) - 2
        if hidden and kind == "lowrank":
            # capacity cap, starting at full capacity; the manifold's tol is the weight's one
            # truncation policy, for stock geoopt optimizers and ours alike
            layers.append(LowRankLinear(n, m, rank=cap, max_rank=cap, tol=tol))
        elif hidden and kind == "lora":
            layers.append(LoRALinear(n, m, cap))
        else:
            layers.append(nn.Linear(n, m))
        if hidden:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def hidden_layers(model):
    return [model[0], model[2]]


def hidden_params(model, kind):
    total = 0
    ranks = []
    for layer in hidden_layers(model):
        if kind == "dense":
            total += layer.weight.numel()
            ranks.append(min(layer.weight.shape))
        elif kind == "lora":
            total += layer.p.numel() + layer.q.numel()
            ranks.append(layer.p.shape[1])
        else:
            r = int(layer.weight.manifold.active_rank(layer.weight))
            total += r * (layer.in_features + layer.out_features) + r
            ranks.append(r)
    return total, ranks


def make_optimizer(method, model, args):
    if method in ("dense Adam", "LoRA + Adam"):
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    low = [layer.weight for layer in hidden_layers(model)]
    other = [p for p in model.parameters() if all(p is not q for q in low)]
    if method == "geoopt RiemannianAdam":
        # the low-rank weights get their own rate (benchmarks/bench_optimizers.py chose it on a
        # validation split for the default, row-wise, second moment), the rest Adam's
        return geoopt.optim.RiemannianAdam([{"params": low, "lr": args.riemannian_lr}, {"params": other}], lr=args.lr)
    if method == "GeometricAdam":
        return GeometricAdam(model.parameters(), lr=args.lr)
    integrator = "abc-psi" if "abc" in method else "augmented-bug"
    return DLRT(
        [{"params": low}, {"params": other, "lr": args.lr}],
        lr=args.dlrt_lr,
        integrator=integrator,
        euclidean="adam",
        model=model,
    )


METHODS = {
    "dense Adam": "dense",
    "LoRA + Adam": "lora",
    "geoopt RiemannianAdam": "lowrank",
    "GeometricAdam": "lowrank",
    "DLRT abc-PSI": "lowrank",
    "DLRT augmented BUG": "lowrank",
}


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(method, data, args):
    kind = METHODS[method]
    torch.manual_seed(args.seed)
    model = mlp(kind, args.cap, args.tol)
    opt = make_optimizer(method, model, args)
    xtr, ytr, xte, yte = data
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    history, times = [], []
    for _epoch in progress(range(args.epochs), desc=method):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), args.batch):
            idx = perm[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        history.append((accuracy(model, xte, yte), hidden_params(model, kind)[1]))
    params, ranks = hidden_params(model, kind)
    return dict(acc=history[-1][0], params=params, ranks=ranks, history=history, epoch_s=sum(times) / len(times))


def main():
    def add(p):
        p.add_argument("--epochs", type=int, default=40)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--cap", type=int, default=32, help="rank capacity R of the hidden layers")
        p.add_argument("--tol", type=float, default=0.2, help="relative truncation tolerance")
        p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
        p.add_argument("--dlrt-lr", type=float, default=1.0, help="DLRT step size h")
        p.add_argument("--riemannian-lr", type=float, default=1e-3,
                       help="geoopt RiemannianAdam's lr on the low-rank weights (the best of the grid of "
                            "benchmarks/bench_optimizers.py; the other parameters: --lr)")

    args = parse_args(__doc__.splitlines()[0], add)
    if args.quick:
        args.epochs = min(args.epochs, 12)
    data = load(args.seed)
    if args.smoke:  # a crash test: rank-adaptive steps of every method, no result
        args.epochs, args.cap = 2, 16
        data = (data[0][:512], data[1][:512]) + data[2:]
    dense_total = sum(n * m for n, m in zip(SIZES[:-2], SIZES[1:-1]))
    results = {m: train(m, data, args) for m in METHODS}
    rows = []
    for name, res in results.items():
        rows.append(
            [
                name,
                100 * res["acc"],
                res["params"],
                100 * (1 - res["params"] / dense_total),
                " / ".join(map(str, res["ranks"])),
                res["epoch_s"],
            ]
        )
    text = (
        f"Digits MLP {'-'.join(map(str, SIZES))}, {args.epochs} epochs, batch {args.batch}, "
        f"capacity {args.cap}, tol {args.tol}, Adam lr {args.lr}, DLRT h {args.dlrt_lr}, RiemannianAdam lr "
        f"{args.riemannian_lr}, seed {args.seed}\n\n"
        + format_table(
            ["method", "test acc. %", "hidden params", "compression %", "ranks", "s / epoch"], rows
        )
    )
    report("digits", text)
    if not args.no_plot:
        plot(results, args)


def plot(results, args):
    fig, (ax, ax2) = new_figure(2, width=7)
    if fig is None:
        return
    look = styles(list(results))
    epochs = max(len(res["history"]) for res in results.values())
    for name, res in results.items():
        x = range(1, len(res["history"]) + 1)
        curve(ax, x, [100 * h[0] for h in res["history"]], look[name])
        curve(ax2, x, [sum(h[1]) for h in res["history"]], look[name])
    ax.set(xlabel="epoch", ylabel="test accuracy % (after the epoch)",
           title=f"digits: test accuracy, {epochs} epochs")
    ax2.set(xlabel="epoch", ylabel="sum of the two hidden layers' ranks",
            title=f"hidden ranks (capacity {args.cap} per layer, tol {args.tol})")
    log_scale(ax2)
    integer_ticks(ax, ax2)
    legend(ax)
    legend(ax2)
    save_figure(fig, "digits")


if __name__ == "__main__":
    main()
