"""What DLRT's one gradient channel and the float64 core decompositions cost per training step.

    python benchmarks/bench_channel.py [--threads 1] [--budget S] [--batch 256]

The MLP of ``bench_training.py`` (784-1024-1024-10, rank 32 in the two hidden layers,
float32, random data, cross entropy). One training step is
``zero_grad(); loss.backward(); opt.step()`` on a fixed batch. Timed interleaved in one
process (``_timing.compare``); ratios are medians of per-round paired ratios.

Part 1, the gradient channel of ``DLRT(..., model=model)`` (abc-PSI, Adam on the head):

* ``raw recorded pair``: the integrator gets the recorded ``(-dY^T, x^T)`` as its field and
  ignores ``p.grad`` (what DLRT did before the channel; emulated by replacing the
  optimizer's field builder): the reference;
* ``p.grad channel``: today's DLRT (tangent part from ``p.grad``, the pair's products on the
  new directions, the consistency check);
* ``p.grad only (model=None)``: the tangent field ``-P_X G``, no recorder.

Part 2, the small-core SVDs and solves in float64 (``_linalg.svd_core`` and friends) against
the same code with the cores left in float32 (the float32 CPU SVD can return NaN or fail on
finite cores, which is why float64 is the default), for GeometricAdam and for DLRT.

Results: ``benchmarks/results/channel.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of interleaved timing per part")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args()


def main():
    args = parse()
    _timing.set_threads_env(args.threads)
    import torch
    from torch import nn

    _timing.apply_threads(args.threads)
    import lowrank_manifolds._linalg as linalg
    from lowrank_manifolds.integrators import MatrixField
    from lowrank_manifolds.nn import LowRankLinear
    from lowrank_manifolds.optim import DLRT, GeometricAdam

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 784, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            LowRankLinear(784, 1024, rank=args.rank), nn.ReLU(),
            LowRankLinear(1024, 1024, rank=args.rank), nn.ReLU(), nn.Linear(1024, 10),
        )

    def dlrt(net, recorded=True):
        return DLRT(net.parameters(), lr=1e-3, integrator="abc-psi", euclidean="adam",
                    model=net if recorded else None)

    def raw_pairs(opt):
        """The field before the channel: the recorded pair alone, p.grad ignored."""
        def fields():
            out = {}
            for group in opt.param_groups:
                for p in group["params"]:
                    pair = opt.recorder.pair(p) if p.grad is not None else None
                    if pair is not None:
                        out[id(p)] = MatrixField((-pair[0], pair[1]))
            return out
        opt._recorded_fields = fields
        return opt

    @contextlib.contextmanager
    def float32_cores():
        keep = linalg.core_dtype
        linalg.core_dtype = lambda a: a.dtype
        try:
            yield
        finally:
            linalg.core_dtype = keep

    def step_fn(net, opt, cores32=False):
        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            with float32_cores() if cores32 else contextlib.nullcontext():
                opt.step()
        return step

    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # DLRT without model= says it once
    nets = {k: model() for k in ("raw", "chan", "tan", "ga64", "ga32", "dl64", "dl32")}
    parts = {
        "gradient channel (DLRT abc-PSI)": {
            "raw recorded pair (p.grad ignored)": step_fn(nets["raw"], raw_pairs(dlrt(nets["raw"]))),
            "p.grad channel": step_fn(nets["chan"], dlrt(nets["chan"])),
            "p.grad only (model=None)": step_fn(nets["tan"], dlrt(nets["tan"], recorded=False)),
        },
        "cores, GeometricAdam": {
            "float32 cores": step_fn(nets["ga32"], GeometricAdam(nets["ga32"].parameters(), lr=1e-3), True),
            "float64 cores": step_fn(nets["ga64"], GeometricAdam(nets["ga64"].parameters(), lr=1e-3)),
        },
        "cores, DLRT abc-PSI (recorded)": {
            "float32 cores": step_fn(nets["dl32"], dlrt(nets["dl32"]), True),
            "float64 cores": step_fn(nets["dl64"], dlrt(nets["dl64"])),
        },
    }
    info = _timing.machine_info(args.threads)
    results = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "out"}, "parts": {}}
    lines = [
        "# DLRT's gradient channel and the float64 cores: cost per training step",
        "",
        f"Generated by `python benchmarks/bench_channel.py --threads {args.threads} --batch {args.batch}` "
        f"on {info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPUs, torch {torch.__version__}, {info['time']}. MLP 784-1024-1024-10, rank {args.rank}, "
        f"batch {args.batch}, float32. Step = zero_grad + forward + backward + opt.step; ratio = median "
        "of per-round paired ratios against the first row of each part, interleaved in one process.",
        "",
    ]
    for part, fns in parts.items():
        res = _timing.compare(fns, budget_s=args.budget)
        results["parts"][part] = res
        lines += [f"## {part}", "", f"Load average {res['loadavg_before']} -> {res['loadavg_after']}, "
                  f"{res['repeats']} rounds.", "", "| variant | step ms | ratio |", "|---|---:|---:|"]
        for name in fns:
            lines.append(f"| {name} | {1e3 * res['median_s'][name]:.2f} | {res['paired_ratio'][name]:.3f} |")
        lines.append("")
    os.makedirs(args.out, exist_ok=True)
    _timing.write_json(os.path.join(args.out, "channel.json"), results)
    with open(os.path.join(args.out, "channel.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
