"""Stock geoopt RiemannianAdam on FixedRankManifold: the scalar second moment against the
row-wise one (``FixedRankManifold(..., second_moment="scalar" | "rows")``) over an lr grid.

    python benchmarks/bench_second_moment.py --quick    # seconds: tiny sizes, a crash test
    python benchmarks/bench_second_moment.py            # the study (about 20 min on an idle core)
    python benchmarks/bench_second_moment.py --problems readme,digits --seeds 0,1

Problems (float64 unless said; every run of a problem and seed starts from the same point):

* ``readme``: the README's pattern, 1000 x 800 rank 16, 200 steps, from ``manifold.random()``
  towards ``A = B C^T`` with standard normal ``B`` (1000 x 16), ``C`` (800 x 16); the loss
  ``||X - A||^2 / 2`` evaluated in factored form (no 1000 x 800 matrix in the steps; the
  final error is measured on the dense matrices);
* ``regression-s0.1``: fully observed 60 x 50 rank 4, ``A = B C^T`` as above, from a random
  point with ``S`` scaled by 0.1, 500 steps;
* ``regression-random``: the same from ``manifold.random()`` (``S`` of order 1-3);
* ``regression-unit``: the same as ``regression-s0.1`` towards ``A = manifold.random()``
  (singular values 1 + |N(0, 1)|, ||A|| about 3 instead of about 110);
* ``completion-50``: ``regression-s0.1`` with half the entries observed (the loss on them,
  the error on the whole matrix);
* ``digits``: ``examples/digits.py``'s MLP (two ``LowRankLinear`` of capacity 32, tol 0.2),
  12 epochs, batch 64, float32; the lr of the grid (up to 3) on the two low-rank weights, the biases
  and the dense output layer with Adam's lr 2e-3 (the example's); test accuracy.

Every run is ``geoopt.optim.RiemannianAdam`` with default betas and eps. A 60 x 50 run stops
early when its relative error ``||X - A||_F / ||A||_F`` falls below 1e-10 (reported as
reached there); any run stops when it diverges (non-finite, above 1e6, or a failing
retraction).
Results: ``benchmarks/results/second_moment.{json,md}`` (``--quick`` prints only).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import geoopt
import torch

from lowrank_manifolds import FixedRankManifold

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _study import stepped  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0]
METHODS = ("scalar", "rows")
F64 = torch.float64
STOP, DIVERGED = 1e-10, 1e6

MATRIX = {
    # name: (m, n, rank, steps, target, start scale of S, observed fraction)
    "readme": (1000, 800, 16, 200, "gaussian", 1.0, 1.0),
    "regression-s0.1": (60, 50, 4, 500, "gaussian", 0.1, 1.0),
    "completion-50": (60, 50, 4, 500, "gaussian", 0.1, 0.5),
    "regression-random": (60, 50, 4, 500, "gaussian", 1.0, 1.0),
    "regression-unit": (60, 50, 4, 500, "unit", 0.1, 1.0),
}
ORDER = ["readme", "regression-s0.1", "completion-50", "digits", "regression-random", "regression-unit"]
DIGITS_LRS = [lr for lr in LRS if lr <= 3.0]
QUICK = {
    "readme": (100, 80, 4, 30, "gaussian", 1.0, 1.0),
    "regression-s0.1": (20, 15, 2, 60, "gaussian", 0.1, 1.0),
    "completion-50": (20, 15, 2, 60, "gaussian", 0.1, 0.5),
}


def matrix_problem(spec, seed):
    m, n, r, _steps, target, scale, frac = spec
    torch.manual_seed(seed)
    probe = FixedRankManifold(m, n, r)
    if target == "gaussian":
        b, c = torch.randn(m, r, dtype=F64), torch.randn(n, r, dtype=F64)
    else:
        ua, sa, va = probe.unpack(probe.random(dtype=F64))
        b, c = ua @ sa, va
    x0 = probe.random(dtype=F64)
    probe.unpack(x0)[1].mul_(scale)
    mask = (torch.rand(m, n, dtype=F64) < frac).to(F64) if frac < 1 else None
    return b, c, x0, mask


def sq_dist(u, s, v, b, c):
    """||U S V^T - B C^T||_F^2 from r x r products only (differentiable in U, S, V)."""
    uu, vv, ub, vc = u.T @ u, v.T @ v, u.T @ b, v.T @ c
    xx = ((uu @ s) * (s @ vv)).sum()
    xa = (s * (ub @ (vc.T))).sum()
    aa = ((b.T @ b) * (c.T @ c)).sum()
    return xx - 2 * xa + aa


def run_matrix(spec, method, lr, seed):
    m, n, r, steps, *_ = spec
    b, c, x0, mask = matrix_problem(spec, seed)
    man = FixedRankManifold(m, n, r, second_moment=method)
    x = geoopt.ManifoldParameter(x0.clone(), manifold=man)
    opt = geoopt.optim.RiemannianAdam([x], lr=lr)
    small = m * n <= 10**5  # the 60 x 50 problems: dense loss and error every step
    a = b @ c.T if small else None

    def error():
        # dense: the factored ||X - A||^2 = ||X||^2 - 2 <X, A> + ||A||^2 cancels below 1e-8
        with torch.no_grad():
            u, s, v = man.unpack(x)
            a_full = a if small else b @ c.T  # one 1000 x 800 matrix, at the end only
            return float(torch.linalg.matrix_norm(u @ s @ v.T - a_full) / torch.linalg.matrix_norm(a_full))

    to_1e6, status, step = None, "ran", 0
    for step in range(1, steps + 1):
        opt.zero_grad()
        u, s, v = man.unpack(x)
        if not small:
            loss = 0.5 * sq_dist(u, s, v, b, c)
        elif mask is None:
            loss = 0.5 * (u @ s @ v.T - a).pow(2).sum()
        else:
            loss = 0.5 * (mask * (u @ s @ v.T - a)).pow(2).sum()
        if not stepped(opt, loss):
            status = "diverged"
            break
        if small:
            err = error()
            if not math.isfinite(err) or err > DIVERGED:
                status = "diverged"
                break
            if to_1e6 is None and err <= 1e-6:
                to_1e6 = step
            if err < STOP:
                status = "reached"
                break
    err = math.inf if status == "diverged" else error()
    if not math.isfinite(err) or err > DIVERGED:
        status, err = "diverged", math.inf
    return dict(error=err, steps_to_1e6=to_1e6, status=status, steps=step)


def run_digits(method, lr, seed, epochs, quick):
    sys.path.insert(0, str(ROOT / "examples"))
    import digits  # the example's data and model

    xtr, ytr, xte, yte = digits.load(seed)
    if quick:
        xtr, ytr = xtr[:256], ytr[:256]
    torch.manual_seed(seed)
    model = digits.mlp("lowrank", 8 if quick else 32, 0.2)
    low = [layer.weight for layer in digits.hidden_layers(model)]
    for w in low:
        w.manifold.second_moment = method
    other = [p for p in model.parameters() if all(p is not q for q in low)]
    opt = geoopt.optim.RiemannianAdam([{"params": low, "lr": lr}, {"params": other, "lr": 2e-3}])
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    status = "ran"
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            if not stepped(opt, loss):
                status = "diverged"
                break
        if status == "diverged":
            break
    acc = digits.accuracy(model, xte, yte) if status == "ran" else 0.0
    params, ranks = digits.hidden_params(model, "lowrank")
    return dict(accuracy=100 * acc, params=params, ranks=ranks, status=status)


def gmean(values):
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return math.exp(statistics.fmean(math.log(max(v, 1e-300)) for v in values))


def summarize(runs, digits_problem):
    """Per lr: mean and spread over the seeds (geometric for errors, arithmetic for
    accuracies); the best lr (smallest geometric-mean error / largest mean accuracy)."""
    table = {}
    for lr, rs in runs.items():
        if digits_problem:
            acc = [r["accuracy"] for r in rs]
            table[lr] = dict(mean=statistics.fmean(acc), lo=min(acc), hi=max(acc),
                             diverged=sum(r["status"] == "diverged" for r in rs))
        else:
            err = [r["error"] for r in rs]
            hit = [r["steps_to_1e6"] for r in rs]
            table[lr] = dict(mean=gmean(err), lo=min(err), hi=max(err),
                             diverged=sum(r["status"] == "diverged" for r in rs),
                             steps_to_1e6=None if None in hit else statistics.fmean(hit))
    hits = [lr for lr in table if not digits_problem and table[lr]["steps_to_1e6"] is not None]
    if hits:  # every seed reached 1e-6 at some lr: the best is the fastest, the window all of them
        best = min(hits, key=lambda lr: table[lr]["steps_to_1e6"])
        window = hits
    elif digits_problem:
        best = max(table, key=lambda lr: table[lr]["mean"])
        window = [lr for lr in table if table[lr]["mean"] >= table[best]["mean"] - 1.0]
    else:
        best = min(table, key=lambda lr: table[lr]["mean"])
        window = [lr for lr in table if table[lr]["mean"] <= 10 * table[best]["mean"]]
    return dict(per_lr=table, best_lr=best, best=table[best], window=window)


def fmt_err(e):
    return "div" if not math.isfinite(e) else f"{e:.1e}"


def cell(t, digits_problem):
    if digits_problem:
        out = f"{t['mean']:.2f} ({t['lo']:.2f}-{t['hi']:.2f})"
    else:
        out = f"{fmt_err(t['mean'])} ({fmt_err(t['lo'])}-{fmt_err(t['hi'])})"
        if t.get("steps_to_1e6") is not None:
            out += f", 1e-6 at {t['steps_to_1e6']:.0f}"
    if t["diverged"]:
        out += f", {t['diverged']} div"
    return out


def markdown(results, args):
    lines = [
        "# RiemannianAdam: scalar vs row-wise second moment",
        "",
        f"`python benchmarks/bench_second_moment.py{' --quick' if args.quick else ''}` "
        f"(seeds {args.seeds}; torch {torch.__version__}, geoopt {geoopt.__version__}, one thread).",
        "Matrix problems: final relative error `||X - A|| / ||A||`, geometric mean over the seeds "
        f"(min-max), 60 x 50 runs stop at {STOP:g}; `1e-6 at k`: mean step reaching 1e-6 (all seeds); "
        "`div`: diverged seeds. digits: test accuracy %, mean (min-max).",
        "Best lr: the fewest steps to 1e-6 where every seed reaches it, else the smallest error "
        "(digits: the best accuracy). Window: the lrs where every seed reaches 1e-6, else those "
        "within 10x of the best error (digits: within 1 point of the best accuracy).",
        "",
        "## Best lr per problem",
        "",
        "| problem | scalar: best lr | scalar: result | scalar: window | rows: best lr | rows: result | rows: window |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results["problems"].items():
        d = name == "digits"
        row = [name]
        for meth in METHODS:
            s = res[meth]
            win = sorted(float(lr) for lr in s["window"])
            row += [f"{float(s['best_lr']):g}", cell(s["best"], d), f"{win[0]:g}-{win[-1]:g}"]
        lines.append("| " + " | ".join(row) + " |")
    for name, res in results["problems"].items():
        d = name == "digits"
        lines += ["", f"## {name}", "", "| lr | scalar | rows |", "|---|---|---|"]
        for lr in res["scalar"]["per_lr"]:
            lines.append(f"| {float(lr):g} | " + " | ".join(cell(res[m]["per_lr"][lr], d) for m in METHODS) + " |")
    lines += ["", f"Total time {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 lrs, 1 seed (seconds)")
    p.add_argument("--problems", default=None, help="comma-separated subset of the problems")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--lrs", default=None, help="comma-separated lr grid")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/second_moment)")
    p.add_argument("--resume", action="store_true", help="keep the problems already in the results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    specs = QUICK if args.quick else MATRIX
    names = [n for n in ORDER if n in specs or n == "digits"]
    if args.problems:
        names = [n for n in args.problems.split(",") if n]
        unknown = [n for n in names if n not in specs and n != "digits"]
        if unknown:
            p.error(f"unknown problems {unknown}; choose from {list(specs) + ['digits']}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    args.seeds = ",".join(map(str, seeds))
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else ([1e-2, 1e-1, 1.0] if args.quick else LRS)
    out = pathlib.Path(args.out) if args.out else (None if args.quick else RESULTS / "second_moment")
    t0 = time.perf_counter()
    results = dict(lrs=lrs, seeds=seeds, quick=args.quick, problems={}, raw={}, seconds=0.0)
    if args.resume and out is not None and out.with_suffix(".json").exists():
        results = json.loads(out.with_suffix(".json").read_text())
        t0 -= results["seconds"]
    for name in names:
        if name in results["raw"]:  # --resume: recompute its summary only
            results["problems"][name] = {m: summarize(results["raw"][name][m], name == "digits") for m in METHODS}
            continue
        raw = {m: {} for m in METHODS}
        for meth in METHODS:
            for lr in (DIGITS_LRS if name == "digits" and not args.lrs and not args.quick else lrs):
                rs = []
                for seed in seeds:
                    if name == "digits":
                        rs.append(run_digits(meth, lr, seed, 1 if args.quick else 12, args.quick))
                    else:
                        rs.append(run_matrix(specs[name], meth, lr, seed))
                raw[meth][str(lr)] = rs
                print(f"{name:18s} {meth:6s} lr {lr:<6g} {rs}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        results["raw"][name] = raw
        results["problems"][name] = {m: summarize(raw[m], name == "digits") for m in METHODS}
        results["seconds"] = time.perf_counter() - t0
        if out is not None:  # after each problem; --quick writes nothing unless --out says where
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
            out.with_suffix(".md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
