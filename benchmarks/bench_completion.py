"""Matrix completion through ``lowrank_manifolds.completion``: the sampled loss against its
floor and against the gather a user writes first.

    python benchmarks/bench_completion.py           # 10^5 x 10^4, rank 10, 10^6 observed, 2 threads (~1 min)
    python benchmarks/bench_completion.py --quick   # 10^4 x 10^3, 10^5 observed: seconds, no result file

Timed interleaved in one process (``_timing.compare``: alternating order, medians, the median
of the per-round ratios to the first entry):

* ``floor``: the sparse kernels a loss and its gradient cannot avoid, one
  ``torch.sparse.sampled_addmm`` (the residual at the pattern) and the two CSR products
  ``G V``, ``G^T U``;
* ``loss + backward (ours)``: ``Observations.loss`` and its backward to the packed point;
* ``loss + backward (gather)``: ``0.5 * (((U S)[rows] * V[cols]).sum(-1) - a)^2 / N`` by autograd;
* ``iteration, RiemannianAdam (ours)`` / ``(gather)``: zero_grad, loss, backward and a stock
  geoopt ``RiemannianAdam`` step, through each loss.

Results: ``benchmarks/results/completion.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _timing  # noqa: E402

THREADS = 2
_timing.set_threads_env(THREADS)

import torch  # noqa: E402

import geoopt  # noqa: E402
from lowrank_manifolds import FixedRankManifold  # noqa: E402
from lowrank_manifolds.completion import Observations  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    _timing.apply_threads(THREADS)
    m, n, r, k = (10_000, 1_000, 10, 100_000) if args.quick else (100_000, 10_000, 10, 1_000_000)
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randint(0, m, (k,), generator=g), torch.randint(0, n, (k,), generator=g)
    vals = torch.randn(k, generator=g)
    mf = FixedRankManifold(m, n, r)
    obs = Observations(rows, cols, vals, (m, n))
    torch.manual_seed(0)
    x = geoopt.ManifoldParameter(mf.random(), manifold=mf)
    u, s, v = (t.detach() for t in mf.unpack(x))
    parts = obs._parts(u)

    def floor():
        res = torch.sparse.sampled_addmm(
            torch.sparse_csr_tensor(parts["crow"], parts["col"], parts["targets"], (m, n), check_invariants=False),
            u @ s, v.T, beta=-1.0)
        gt = torch.sparse_csr_tensor(parts["t_crow"], parts["t_col"], res.values()[parts["order"]], (n, m),
                                     check_invariants=False)
        return res @ v, gt @ u

    def gather_loss(p):
        uu, ss, vv = mf.unpack(p)
        return 0.5 * (((uu @ ss)[rows] * vv[cols]).sum(-1) - vals).square().sum() / k

    def backward(loss_fn):
        def run():
            x.grad = None
            loss_fn(x).backward()
        return run

    def iteration(loss_fn):
        point = geoopt.ManifoldParameter(x.detach().clone(), manifold=mf)
        opt = geoopt.optim.RiemannianAdam([point], lr=1e-3)

        def run():
            opt.zero_grad()
            loss_fn(point).backward()
            opt.step()
        return run

    ours = lambda p: obs.loss(p, mf)  # noqa: E731
    fns = {
        "floor": floor,
        "loss + backward (ours)": backward(ours),
        "loss + backward (gather)": backward(gather_loss),
        "iteration, RiemannianAdam (ours)": iteration(ours),
        "iteration, RiemannianAdam (gather)": iteration(gather_loss),
    }
    res = _timing.compare(fns, budget_s=2.0 if args.quick else 20.0)
    lines = [f"{m} x {n}, rank {r}, {k} observed, {THREADS} threads, float32",
             "", "| what | median ms | / floor (paired) |", "|---|---|---|"]
    for name in fns:
        lines.append(f"| {name} | {res['median_s'][name] * 1e3:.1f} | {res['paired_ratio'][name]:.2f} |")
    lines += ["", f"load average {res['loadavg_before']} -> {res['loadavg_after']}"]
    print("\n".join(lines))
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        _timing.write_json(os.path.join(args.out, "completion.json"),
                           dict(timing=res, machine=_timing.machine_info(THREADS), size=[m, n, r, k]))
        with open(os.path.join(args.out, "completion.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
