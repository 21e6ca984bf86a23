"""Each optimizer as a new user first calls it: ``Optimizer(model.parameters())`` at its default
learning rate, or at the starting rate the docs give where the constructor requires one.

    python benchmarks/bench_defaults.py            # about 2 minutes on one CPU thread
    python benchmarks/bench_defaults.py --quick    # seconds: a crash test

Problems, the README's two:

* ``completion``: ``examples/quickstart.py``'s problem, a 300 x 200 rank-5 matrix (Gaussian
  factors) observed on 30 % of its entries, loss ``0.5 sum_observed (X_ij - A_ij)^2``, from the
  spectral estimate, 500 steps, float64; the relative error ``||X - A|| / ||A||`` at the end;
* ``digits``: ``examples/digits.py``'s MLP 64-256-256-10 with low-rank hidden layers
  (capacity 32 from full rank, tol 0.2; LoRA of rank 32; or dense), 20 epochs of batch 64,
  float32; the test accuracy.

Each optimizer gets one param group, ``model.parameters()``: biases and the dense output
layer take the optimizer's own rule for ordinary parameters. Seeds 0-2; mean [min, max].
Results: ``benchmarks/results/defaults.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)

import geoopt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _study import STEP_FAILURES, fmt_spread, write_results  # noqa: E402
from lowrank_manifolds import FixedRankManifold  # noqa: E402
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD  # noqa: E402

RATE = 0.3  # completion: the sampling rate; gradient steps of 1 / RATE are the quickstart's
#: method -> (the call as a user writes it, the parametrisation, the optimizer of the params)
METHODS = {
    "torch.optim.Adam()": ("default 1e-3", lambda ps: torch.optim.Adam(ps)),
    "geoopt RiemannianAdam()": ("default 1e-3", lambda ps: geoopt.optim.RiemannianAdam(ps)),
    "GeometricAdam()": ("default 1e-3", lambda ps: GeometricAdam(ps)),
    "geoopt RiemannianSGD(lr=1/rate)": ("required", lambda ps: geoopt.optim.RiemannianSGD(ps, lr=1 / RATE)),
    "GeometricSGD(lr=1/rate)": ("required", lambda ps: GeometricSGD(ps, lr=1 / RATE)),
    "DLRT(lr=1)": ("required", lambda ps: DLRT(ps, lr=1.0)),
    "DLRT(lr=1), dense by SGD at h": ("required", lambda ps: DLRT(ps, lr=1.0, euclidean="sgd", euclidean_lr=1.0)),
}
#: which methods run on which problem (a rate of 1 / rate is the completion's)
PROBLEM_METHODS = {
    "completion": ["torch.optim.Adam()", "geoopt RiemannianAdam()", "GeometricAdam()",
                   "geoopt RiemannianSGD(lr=1/rate)", "GeometricSGD(lr=1/rate)"],
    "digits": ["torch.optim.Adam()", "geoopt RiemannianAdam()", "GeometricAdam()", "DLRT(lr=1)",
               "DLRT(lr=1), dense by SGD at h"],
}


def run_completion(method, seed, quick):
    """Relative error after the run (inf if a step failed); Adam runs on LoRA factors ``A B^T``
    started from the same spectral estimate, the others on the manifold."""
    m, n, r, steps = (60, 40, 3, 20) if quick else (300, 200, 5, 500)
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen,
                                                                                 dtype=torch.float64)
    observed = torch.rand(m, n, generator=gen) < RATE
    rows, cols = observed.nonzero(as_tuple=True)
    values = truth[rows, cols]
    manifold = FixedRankManifold(m, n, r)
    start = manifold.from_dense(torch.where(observed, truth, 0.0) / RATE)
    u, s, v = manifold.unpack(start)
    if method.startswith("torch"):
        a = (u * s.diagonal().sqrt()).clone().requires_grad_(True)
        b = (v * s.diagonal().sqrt()).clone().requires_grad_(True)
        params, entries, dense = [a, b], lambda: (a[rows] * b[cols]).sum(-1), lambda: a @ b.T
    else:
        x = geoopt.ManifoldParameter(start, manifold=manifold)

        def entries():
            u, s, v = manifold.unpack(x)
            return ((u[rows] @ s) * v[cols]).sum(-1)

        params, dense = [x], lambda: manifold.to_dense(x)
    opt = METHODS[method][1](params)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((entries() - values) ** 2).sum()).backward()
        try:
            opt.step()
        except STEP_FAILURES:
            return float("inf")
    with torch.no_grad():
        err = float((dense() - truth).norm() / truth.norm())
    return err if err == err else float("inf")


def run_digits(method, seed, quick):
    import digits

    xtr, ytr, xte, yte = digits.load(seed)
    epochs = 1 if quick else 20
    if quick:
        xtr, ytr = xtr[:256], ytr[:256]
    torch.manual_seed(seed)
    kind = "dense" if method.startswith("torch") else "lowrank"
    model = digits.mlp(kind, 8 if quick else 32, 0.2)
    opt = METHODS[method][1](model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 64):
            idx = perm[i: i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            try:
                opt.step()
            except STEP_FAILURES:
                return 0.0
    return 100 * digits.accuracy(model, xte, yte)


RUN = {"completion": run_completion, "digits": run_digits}
SCORE = {"completion": "relative error after 500 steps", "digits": "test accuracy % after 20 epochs"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a crash test")
    p.add_argument("--out", default=os.path.join(HERE, "results", "defaults"))
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="DLRT: no recorded")
    seeds = (0,) if cfg.quick else (0, 1, 2)
    t0, results, lines = time.time(), {}, []
    for problem, methods in PROBLEM_METHODS.items():
        results[problem] = {}
        lines += [f"\n## {problem}: {SCORE[problem]}\n", "| call | lr | mean [min, max] |", "|---|---|---|"]
        for method in methods:
            scores = [RUN[problem](method, seed, cfg.quick) for seed in seeds]
            results[problem][method] = scores
            digits_shown = 3 if problem == "digits" else 2
            shown = fmt_spread(scores, digits_shown) if problem == "digits" else (
                " ".join(f"{s:.2g}" for s in scores) if min(scores) == float("inf") else
                "{:.2e} [{:.2e}, {:.2e}]".format(sum(scores) / len(scores), min(scores), max(scores)))
            lines.append(f"| `{method}` | {METHODS[method][0]} | {shown} |")
            print(problem, method, scores, f"t={time.time() - t0:.0f}s", flush=True)
    md = ("# Each optimizer at its default learning rate\n\n`python benchmarks/bench_defaults.py`; "
          f"seeds {list(seeds)}, torch {torch.__version__}, geoopt {geoopt.__version__}, one thread. One param "
          "group, `model.parameters()`; `lr` required: the docs' starting rate.\n" + "\n".join(lines) + "\n")
    print(md)
    info = dict(platform=platform.platform(), torch=torch.__version__, wall_s=time.time() - t0)
    write_results(cfg.out, os.path.dirname(cfg.out), md, dict(config=info, results=results), cfg.quick)


if __name__ == "__main__":
    main()
