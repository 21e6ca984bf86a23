"""Character-level transformer on Python's own standard library: low-rank MLP training.

The text is the source of the Python standard library that ships with the running
interpreter (``sysconfig.get_paths()["stdlib"]``): its top-level ``*.py`` files in
sorted order, every tenth file (indices 5, 15, 25, ...) held out for validation, the
rest for training, each side capped in size (``--train-kb``, ``--val-kb``). Tokens
are bytes (vocabulary 256). No download.

Model: a GPT-style decoder (pre-LayerNorm, causal multi-head attention, GELU MLP
``d -> 4d -> d``, learned positional embeddings, untied output head).

Part ``a`` (the slides' experiment, at toy scale): the two MLP matrices of every block
are low-rank (capacity ``--rank``), attention and embeddings stay dense:

* ``dense + Adam``: the reference, full MLP matrices;
* ``LoRA + Adam``: ``W = A B^T`` with plain (Euclidean) factors, rank ``--rank``;
* ``GeometricAdam``: ``W = U S V^T`` on the fixed-rank manifold, the geometry-aware Adam
  of Schotthofer, Klein and Kusch (2025), rank adaptive (``--tol``);
* ``DLRT abc-PSI``: one abc-PSI step of the gradient flow per batch (step ``h``), rank
  adaptive (``--tol``), ``model=`` given so the field is the exact ``G = dY^T x``;
  the dense parameters get Adam.

Part ``b``: Adam vs LoRA-Pre (:class:`~lowrank_manifolds.optim.LoRAPreAdam`, Adam with
rank-``r`` factored moments) at ranks ``d/4`` and ``d/8`` on the dense model (with
``--muon``, also the LoRA-Pre Muon variant). ``--lorapre-scope`` says which parameters
get factored moments:

* ``blocks`` (default; as in the LoRA-Pre paper, which factors the transformer blocks'
  linear layers): only the blocks' linear weights (attention ``qkv`` and ``proj``, MLP
  ``fc1`` and ``fc2``) are factored; the token and position embeddings, the output head,
  biases and LayerNorms keep ordinary dense Adam state (a second parameter group whose
  rank is so large that ``LoRAPreAdam`` falls back to dense Adam for every matrix in it);
* ``all``: every weight matrix with ``(p + q) r < p q`` is factored, embeddings and head
  included (the earlier setting).

Part b reports the optimizer-state bytes of the whole model and of the block matrices only.

All runs: the same batches (same seed), the same number of steps, linear warm-up then
cosine decay to 10 %, betas (0.9, 0.99), no weight decay, no clipping. Learning rates
are per method (``--lr-*``; defaults from the grid documented in
``docs/language_model.md``; ``--grid`` reruns every method at 1/3, 1 and 3 times its
learning rate and reports the best). Reports validation loss (nats per byte), parameter
counts, optimizer-state bytes and time per step; writes
``examples/output/char_transformer_<part>.{md,png}``.

    python examples/char_transformer.py --quick            # < 1 min
    python examples/char_transformer.py --smoke            # seconds: a tiny model, 8 steps
    python examples/char_transformer.py --part a           # a few minutes per method
    python examples/char_transformer.py --part b
"""
from __future__ import annotations

import math
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import (curve, format_table, legend, log_scale, new_figure, parse_args, progress, report, save_figure,
                     styles)
from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, LoRAPreAdam

BETAS = (0.9, 0.99)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def stdlib_files():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    val = [f for i, f in enumerate(files) if i % 10 == 5]
    train = [f for i, f in enumerate(files) if i % 10 != 5]
    return root, train, val


def read_bytes(files, cap_bytes):
    chunks, total, used = [], 0, 0
    for f in files:
        data = f.read_bytes() + b"\n"
        take = data[: cap_bytes - total]
        chunks.append(take)
        total += len(take)
        used += 1
        if total >= cap_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long(), used


def load(args):
    _, train_files, val_files = stdlib_files()
    train, n_train = read_bytes(train_files, args.train_kb * 1024)
    val, n_val = read_bytes(val_files, args.val_kb * 1024)
    info = f"of Python {sysconfig.get_python_version()} ({n_train} train files, {len(train)} bytes; {n_val} val files, {len(val)} bytes)"
    return train, val, info


def batch(data, ctx, size, gen):
    idx = torch.randint(len(data) - ctx - 1, (size,), generator=gen)
    x = torch.stack([data[i : i + ctx] for i in idx.tolist()])
    y = torch.stack([data[i + 1 : i + ctx + 1] for i in idx.tolist()])
    return x, y


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``y = x B A^T + b`` with plain (Euclidean) factors ``A`` (m x r), ``B`` (n x r).

    Initialised at the scale of ``nn.Linear`` (expected ``||W||_F^2 = m/3`` and the same
    output variance), like :class:`~lowrank_manifolds.nn.LowRankLinear`."""

    def __init__(self, n, m, rank):
        super().__init__()
        self.in_features, self.out_features, self.rank = n, m, rank
        self.a = nn.Parameter(torch.randn(m, rank) * (1.0 / (3.0 * rank)) ** 0.5)
        self.b = nn.Parameter(torch.randn(n, rank) / n**0.5)
        bound = 1.0 / n**0.5
        self.bias = nn.Parameter(torch.empty(m).uniform_(-bound, bound))

    def forward(self, x):
        return (x @ self.b) @ self.a.T + self.bias


def lowrank_linear(n, m, cap, tol):
    """A :class:`LowRankLinear` starting at rank = capacity ``cap``."""
    return LowRankLinear(n, m, rank=cap, max_rank=cap, tol=tol)


def mlp_linear(kind, n, m, args):
    if kind == "lora":
        return LoRALinear(n, m, args.rank)
    if kind == "lowrank":
        return lowrank_linear(n, m, args.rank, args.tol)
    return nn.Linear(n, m)


class Block(nn.Module):
    def __init__(self, kind, args):
        super().__init__()
        d = args.width
        self.heads = args.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = mlp_linear(kind, d, 4 * d, args)
        self.fc2 = mlp_linear(kind, 4 * d, d, args)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, kind, args):
        super().__init__()
        d = args.width
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(args.context, d)
        self.blocks = nn.ModuleList(Block(kind, args) for _ in range(args.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    def mlp_layers(self):
        return [layer for blk in self.blocks for layer in (blk.fc1, blk.fc2)]


# ---------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------
def mlp_weight_params(model):
    """Numbers that define the MLP weight matrices (biases excluded) and their ranks.

    Dense: ``m n``; LoRA: ``r (m + n)``; manifold layers: ``r (m + n) + r`` at the
    *active* rank ``r`` (``U``, ``V`` and the diagonal ``S`` left by the truncation)."""
    total, ranks = 0, []
    for layer in model.mlp_layers():
        m, n = layer.out_features, layer.in_features
        if isinstance(layer, nn.Linear):
            total += m * n
            ranks.append(min(m, n))
        elif isinstance(layer, LoRALinear):
            total += layer.rank * (m + n)
            ranks.append(layer.rank)
        else:
            r = int(layer.weight.manifold.active_rank(layer.weight))
            total += r * (m + n) + r
            ranks.append(r)
    return total, ranks


def mlp_weights(model):
    out = []
    for layer in model.mlp_layers():
        out += [layer.weight] if hasattr(layer, "weight") else [layer.a, layer.b]
    return out


def block_matrices(model):
    """The transformer blocks' linear weights (attention qkv/proj, MLP fc1/fc2): what
    LoRA-Pre factors with ``--lorapre-scope blocks``."""
    out = []
    for blk in model.blocks:
        for layer in (blk.qkv, blk.proj, blk.fc1, blk.fc2):
            out += [layer.weight] if hasattr(layer, "weight") else [layer.a, layer.b]
    return out


def state_bytes(opt, only=None):
    """Bytes of the optimizer's state tensors (step counters excluded), optionally only
    those of the parameters in ``only``."""
    ids = None if only is None else {id(p) for p in only}
    total = 0
    for p, st in opt.state.items():
        if ids is not None and id(p) not in ids:
            continue
        for key, val in st.items():
            if key != "step" and isinstance(val, torch.Tensor):
                total += val.numel() * val.element_size()
    return total


# ---------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------
PART_A = ["dense + Adam", "LoRA + Adam", "GeometricAdam", "DLRT abc-PSI"]
PART_B = ["Adam (dense)", "LoRA-Pre r=d/4", "LoRA-Pre r=d/8"]
KIND = {"dense + Adam": "dense", "LoRA + Adam": "lora", "GeometricAdam": "lowrank", "DLRT abc-PSI": "lowrank"}


def method_lr(method, args):
    if method in ("dense + Adam", "Adam (dense)"):
        return args.lr_adam
    if method == "LoRA + Adam":
        return args.lr_lora
    if method == "GeometricAdam":
        return args.lr_geo
    if method == "DLRT abc-PSI":
        return args.lr_dlrt
    return args.lr_lorapre


def make_optimizer(method, model, lr, args):
    if method in ("dense + Adam", "LoRA + Adam", "Adam (dense)"):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS)
    if method == "GeometricAdam":
        fixes = dict(perp_second_moment="scalar", m2_transport="squared") if args.geo_fixes else {}
        return GeometricAdam(model.parameters(), lr=lr, betas=BETAS, augment_every=args.augment_every, **fixes)
    if method == "DLRT abc-PSI":
        low = mlp_weights(model)
        other = [p for p in model.parameters() if all(p is not q for q in low)]
        return DLRT(
            [{"params": low}, {"params": other, "lr": args.lr_adam}],
            lr=lr, integrator="abc-psi", euclidean="adam", betas=BETAS, model=model,
        )
    rank = args.width // (4 if "d/4" in method else 8)
    kwargs = {}
    if "Muon" in method:
        kwargs["muon"] = True
    if "dense-m" in method:
        kwargs["factor_first_moment"] = False
    if args.lorapre_scope == "all":
        return LoRAPreAdam(model.parameters(), lr=lr, betas=BETAS, rank=rank, **kwargs)
    # blocks only: a rank >= min(p, q) makes LoRAPreAdam keep dense Adam state for every
    # matrix of the second group (``(p + q) r >= p q``), identical to torch.optim.Adam
    blocks = block_matrices(model)
    other = [p for p in model.parameters() if all(p is not q for q in blocks)]
    big = max(max(p.shape) for p in model.parameters())
    opt = LoRAPreAdam(
        [{"params": blocks}, {"params": other, "rank": big, "muon": False}],
        lr=lr, betas=BETAS, rank=rank, **kwargs,
    )
    assert all(opt.is_factored(p) for p in blocks) and not any(opt.is_factored(p) for p in other)
    return opt


def schedule(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(model, val_batches):
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val_batches]
    return sum(losses) / len(losses)


def fit(model, opts, data, val_batches, args, desc=None, failures=()):
    """Train ``model`` for ``args.steps`` steps on the batches of seed ``args.seed``, stepping every
    optimizer of ``opts`` (each on the warm-up + cosine :func:`schedule`), and evaluate every
    ``args.eval_every`` steps. A non-finite loss, or a step that raises one of ``failures`` (for
    a study: a failed SVD counts as divergence), ends the run with a NaN. Returns the curve
    ``[(step, val loss)]`` and the seconds per training step."""
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: schedule(s, args.steps, args.warmup)) for o in opts]
    gen = torch.Generator().manual_seed(args.seed)
    curve, spent = [(0, evaluate(model, val_batches))], 0.0
    steps = range(1, args.steps + 1)
    for step in progress(steps, desc=desc) if desc else steps:
        x, y = batch(data, args.context, args.batch, gen)
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        ok = math.isfinite(loss.item())
        if ok:
            loss.backward()
            try:
                for o in opts:
                    o.step()
            except failures:
                ok = False
        for sc in scheds:
            sc.step()
        spent += time.perf_counter() - t0
        if not ok:
            curve.append((step, float("nan")))
            break
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val_batches)))
    return curve, spent / step


def train(method, lr, data, val_batches, args):
    torch.manual_seed(args.seed)
    model = CharTransformer(KIND.get(method, "dense"), args)
    opt = make_optimizer(method, model, lr, args)
    curve, per_step = fit(model, [opt], data, val_batches, args, desc=f"{method} lr={lr:g}")
    params, ranks = mlp_weight_params(model)
    return dict(
        method=method, lr=lr, val=curve[-1][1], curve=curve, params=params, ranks=ranks,
        total_params=sum(p.numel() for p in model.parameters()),
        state=state_bytes(opt), mlp_state=state_bytes(opt, mlp_weights(model)),
        block_state=state_bytes(opt, block_matrices(model)),
        lorapre_state=opt.state_bytes(include_step=False) if isinstance(opt, LoRAPreAdam) else None,
        step_ms=1e3 * per_step,
    )


def run_method(method, data, val_batches, args):
    lr = method_lr(method, args)
    lrs = [lr / 3, lr, 3 * lr] if args.grid else [lr]
    runs = [train(method, x, data, val_batches, args) for x in lrs]
    best = min(runs, key=lambda r: r["val"] if math.isfinite(r["val"]) else float("inf"))
    best["grid"] = {r["lr"]: r["val"] for r in runs}
    return best


def selected(methods, args):
    if not args.only:
        return methods
    keep = [m for m in methods if m in args.only.split(",")]
    return keep


def fmt_grid(res):
    return ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res["grid"].items())


def part_a(data, val_batches, args, header):
    results = [run_method(m, data, val_batches, args) for m in selected(PART_A, args)]
    dense_params = args.layers * 2 * 4 * args.width**2
    rows = [
        [r["method"], r["lr"], r["val"], r["params"], f"{100 * (1 - r['params'] / dense_params):.1f}",
         "/".join(map(str, r["ranks"])), r["total_params"], r["mlp_state"], r["state"], r["step_ms"]]
        for r in results
    ]
    text = header + "\n\n" + format_table(
        ["method", "lr / h", "val loss", "MLP weight params", "MLP compression %", "MLP ranks",
         "all params", "MLP opt. state B", "all opt. state B", "ms / step"], rows)
    return publish(results, text, "a", "low-rank MLP blocks", args)


def part_b(data, val_batches, args, header):
    methods = list(PART_B)
    if args.muon:
        methods += ["LoRA-Pre Muon r=d/8"]
    if args.dense_first_moment:
        methods += ["LoRA-Pre r=d/8 dense-m"]
    results = [run_method(m, data, val_batches, args) for m in selected(methods, args)]
    adam = next((r for r in results if r["method"] == "Adam (dense)"), None)
    if adam is None:  # a sweep without the reference: ratios against a dense-Adam state of 2 numel floats
        model = CharTransformer("dense", args)
        adam = dict(val=float("nan"), state=2 * 4 * results[0]["total_params"], total_params=results[0]["total_params"],
                    block_state=2 * 4 * sum(p.numel() for p in block_matrices(model)))
    rows = []
    for r in results:
        rows.append([r["method"], r["lr"], r["val"], f"{r['val'] / adam['val']:.4f}", r["state"],
                     f"{r['state'] / adam['state']:.3f}", r["block_state"],
                     f"{r['block_state'] / adam['block_state']:.3f}",
                     r["lorapre_state"] if r["lorapre_state"] is not None else "-", r["step_ms"]])
    text = header + f"; LoRA-Pre scope: {args.lorapre_scope}\n\n" + format_table(
        ["optimizer", "lr", "val loss", "val / Adam", "opt. state B (all)", "state / Adam (all)",
         "opt. state B (block matrices)", "state / Adam (blocks)",
         "LoRAPreAdam.state_bytes(include_step=False)", "ms / step"], rows)
    text += f"\n\nAdam's 2 * numel * 4 bytes = {2 * adam['total_params'] * 4}"
    return publish(results, text, "b", "LoRA-Pre vs Adam (dense model)", args)


def publish(results, text, part, title, args):
    """Append the lr grid (with --grid), print and save the table, save the plot."""
    if args.grid:
        text += "\n\nlearning-rate grid (final val loss):\n\n" + "\n".join(
            f"- {r['method']}: {fmt_grid(r)}" for r in results)
    name = f"char_transformer_{part}" + ("_" + args.tag if args.tag else "")
    report(name, text)
    plot(results, name, title, args)
    return results


def plot(results, name, title, args):
    if args.no_plot:
        return
    fig, axes = new_figure(1, width=7)
    if fig is None:
        return
    ax = axes[0]
    labels = [f"{r['method']} (lr {r['lr']:g})" for r in results]
    look = styles(labels)
    for label, r in zip(labels, results):
        steps, vals = zip(*r["curve"])
        curve(ax, steps, vals, look[label])
    # a log scale shows the start (step 0) and the differences at the end together
    ax.set(xlabel="step", ylabel="validation loss (nats / byte)", title=title)
    log_scale(ax)
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    save_figure(fig, name)


def add_arguments(p):
    p.add_argument("--part", choices=["a", "b", "all"], default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=32, help="rank (capacity) of the low-rank MLP matrices")
    p.add_argument("--tol", type=float, default=0.05, help="relative truncation tolerance (rank adaptive)")
    p.add_argument("--lr-adam", type=float, default=9e-3, help="Adam (dense model; best of the grid)")
    p.add_argument("--lr-lora", type=float, default=9e-3, help="Adam on LoRA factors (best of the grid)")
    p.add_argument("--lr-geo", type=float, default=9e-3, help="GeometricAdam (best of the grid)")
    p.add_argument("--lr-dlrt", type=float, default=9.0,
                   help="DLRT step size h (best of the grid; dense params: --lr-adam)")
    p.add_argument("--lr-lorapre", type=float, default=3e-3, help="LoRAPreAdam")
    p.add_argument("--muon", action="store_true", help="part b: add the LoRA-Pre Muon variant")
    p.add_argument("--geo-fixes", action="store_true",
                   help="part a: GeometricAdam with perp_second_moment='scalar', m2_transport='squared'")
    p.add_argument("--dense-first-moment", action="store_true",
                   help="part b: add LoRAPreAdam(factor_first_moment=False) at rank d/8")
    p.add_argument("--lorapre-scope", choices=["blocks", "all"], default="blocks",
                   help="part b: factor only the blocks' linear weights (default; embeddings, head, "
                        "vectors keep dense Adam state) or every weight matrix")
    p.add_argument("--augment-every", type=int, default=1,
                   help="GeometricAdam's schedule: augment every k steps, core steps in between")
    p.add_argument("--grid", action="store_true", help="each method at lr x {1/3, 1, 3}, keep the best")
    p.add_argument("--only", default="", help="comma-separated subset of the methods (for lr sweeps)")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--train-kb", type=int, default=2048)
    p.add_argument("--val-kb", type=int, default=256)


def parse(argv=None):
    """The script's arguments (``argv=None``: the command line); seeds and sets the threads."""
    return parse_args(__doc__.splitlines()[0], add_arguments, argv)


def main():
    args = parse()
    if args.quick:
        args.steps, args.warmup, args.eval_every, args.eval_batches = 60, 6, 20, 4
        args.batch, args.layers, args.grid = 16, 1, False
    if args.smoke:  # a crash test of every method and of the accounting, no result
        args.steps, args.warmup, args.eval_every, args.eval_batches = 8, 2, 4, 2
        args.batch, args.context, args.width, args.heads, args.layers, args.rank = 4, 16, 32, 2, 1, 4
        args.train_kb, args.val_kb, args.grid = 32, 8, False
    data, val, info = load(args)
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [batch(val, args.context, args.batch, vgen) for _ in range(args.eval_batches)]
    header = (
        f"Char transformer on the standard library sources {info}; {args.layers} layers, width {args.width}, "
        f"{args.heads} heads, context {args.context}, batch {args.batch}, {args.steps} steps "
        f"(warm-up {args.warmup}, cosine to 10%), betas {BETAS}, MLP rank {args.rank}, tol {args.tol}, "
        f"seed {args.seed}, {torch.get_num_threads()} thread(s); val loss on {args.eval_batches} fixed "
        f"batches (nats/byte)"
    )
    print(header)
    if args.part in ("a", "all"):
        part_a(data, val_batches, args, header)
    if args.part in ("b", "all"):
        part_b(data, val_batches, args, header)


if __name__ == "__main__":
    main()
