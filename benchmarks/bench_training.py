"""Time and peak memory of one training step: low-rank optimizers vs LoRA + Adam.

    python benchmarks/bench_training.py [--quick] [--threads 1] [--device cpu|cuda]
                                        [--budget S] [--no-memory] [--no-big] [--no-profile]

Part 1 (MLP). An MLP 784-1024-1024-10 (ReLU), rank 32 in the two hidden layers (the
1024 -> 10 head stays a dense ``nn.Linear``: rank 32 > 10), batch 256, float32, random
data (fixed inputs and labels, cross entropy). One *training step* is
``zero_grad(); loss = CE(model(x), y); loss.backward(); opt.step()``. Methods:

* ``LoRA + Adam`` (the reference of every ratio): hidden weights ``P Q^T`` with plain
  ``nn.Parameter`` factors (m x r, n x r), ``torch.optim.Adam``;
* ``dense + Adam``: ``nn.Linear`` everywhere, ``torch.optim.Adam``;
* ``geoopt RiemannianAdam``: ``LowRankLinear`` hidden layers, stock
  ``geoopt.optim.RiemannianAdam`` on all parameters; the same with
  ``LowRankLinear(..., retraction="orthographic")`` (QRs of m x r instead of m x 2r);
* ``GeometricAdam``: ``lowrank_manifolds.optim.GeometricAdam`` (fixed rank);
* ``DLRT abc-PSI`` / ``DLRT augmented BUG``: ``DLRT(low-rank weights, integrator=...,
  model=model)`` with a ``GradientRecorder``, Adam on the other parameters (fixed rank);
* ``floor: LoRA + Adam + retraction kernels``: not a method but a bound. LoRA + Adam's
  step plus, per low-rank layer, the kernels a metric retraction cannot avoid (QRs of
  random m x 2r and n x 2r matrices, SVD of a 2r x 2r one). No retraction-based step
  whose forward and backward cost what LoRA's do can beat this ratio.

All six are timed interleaved in one process (``_timing.compare``); the table gives
the median of per-round paired ratios method / LoRA + Adam. A second, instrumented
pass splits each step into forward + backward and ``opt.step`` (perf_counter around
each phase, medians).

Part 2 (big layer). One ``LowRankLinear(16384, 16384, rank=32)`` (batch 64, MSE to a
random target), stock ``RiemannianAdam`` and ``DLRT abc-PSI``, with LoRA + Adam at the
same shapes as the timing reference. A dense float32 16384^2 weight is 1 GiB; the
target is a step whose peak working memory stays below 5% of that, i.e. no m x n
allocation.

Peak memory (both parts): each method runs in a fresh subprocess (``--_child``):
build, two warm-up steps (optimizer states exist), then the peak-RSS counter is reset
and one step runs; the growth of the peak RSS over the RSS before the step is the
step's working memory (activations, gradients, optimizer temporaries; the parameters
and states that exist before the step are *not* included; they are listed separately
as "static"). The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large
blocks are returned to the OS and re-counted. A second step then runs under a
``TorchDispatchMode`` that records the largest tensor any aten op returns (forward,
backward and optimizer). On CUDA the growth of ``torch.cuda.max_memory_allocated``
is used instead of RSS.

``--profile`` (default on; ``--no-profile``) writes torch.profiler tables (self CPU
time per aten op, top rows) of the LoRA, RiemannianAdam and abc-PSI steps to
``results/training_profile.txt``.

Results: ``benchmarks/results/training.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

MLP_SIZES = (784, 1024, 1024, 10)
TARGETS = {"geoopt RiemannianAdam": 1.5, "DLRT abc-PSI": 1.6}
# Not a training method: LoRA + Adam's step followed by the kernels one metric retraction
# of each low-rank layer cannot avoid (QRs of m x 2r and n x 2r, SVD of 2r x 2r). Its ratio
# is the floor of any retraction-based step (fwd + bwd as cheap as LoRA's, nothing else).
FLOOR = "floor: LoRA + Adam + retraction kernels"
ORTHO = "geoopt RiemannianAdam, orthographic retraction"
MLP_METHODS = ("LoRA + Adam", "dense + Adam", "geoopt RiemannianAdam", ORTHO, "GeometricAdam",
               "DLRT abc-PSI", "DLRT augmented BUG", FLOOR)
BIG_METHODS = ("LoRA + Adam", "geoopt RiemannianAdam", "DLRT abc-PSI")
ADAM_LR = 1e-3
DLRT_LR = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short budgets (~1 min)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--budget", type=float, default=None, help="seconds of interleaved timing per part")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--big-m", type=int, default=16384, help="m = n of the big layer")
    p.add_argument("--big-batch", type=int, default=64)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-big", action="store_true", help="skip part 2 (the big layer)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_child", nargs=2, metavar=("PART", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- models
def _lora_linear_cls():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """W = P Q^T with plain (Euclidean) factors: the LoRA parametrisation."""

        def __init__(self, n, m, rank, dtype=None, device=None):
            super().__init__()
            f = dict(dtype=dtype, device=device)
            self.p = nn.Parameter(torch.randn(m, rank, **f) * (1.0 / (3.0 * rank)) ** 0.5)
            self.q = nn.Parameter(torch.randn(n, rank, **f) / n**0.5)
            self.bias = nn.Parameter(torch.zeros(m, **f))

        def forward(self, x):
            return (x @ self.q) @ self.p.T + self.bias

    return LoRALinear


def build(part, method, args, dev):
    """(step, model, optimizer) for one method; ``step()`` is one full training step."""
    import geoopt
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lowrank_manifolds.nn import LowRankLinear
    from lowrank_manifolds.optim import DLRT, GeometricAdam

    LoRALinear = _lora_linear_cls()
    f = dict(dtype=torch.float32, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    r = args.rank
    if part == "mlp":
        kind = {"LoRA + Adam": "lora", FLOOR: "lora", "dense + Adam": "dense"}.get(method, "lowrank")
        layers = []
        for i, (n, m) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:])):
            hidden = i < len(MLP_SIZES) - 2
            if hidden and kind == "lowrank":
                retraction = "orthographic" if method == ORTHO else "metric"
                layers.append(LowRankLinear(n, m, rank=r, retraction=retraction, **f))
            elif hidden and kind == "lora":
                layers.append(LoRALinear(n, m, r, **f))
            else:
                layers.append(nn.Linear(n, m, **f))
            if hidden:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        x = torch.randn(args.batch, MLP_SIZES[0], generator=gen).to(**f)
        y = torch.randint(0, MLP_SIZES[-1], (args.batch,), generator=gen).to(dev)

        def loss_fn():
            return F.cross_entropy(model(x), y)
    else:
        m = n = args.big_m
        if method == "LoRA + Adam":
            model = LoRALinear(n, m, r, **f)
        else:
            model = LowRankLinear(n, m, rank=r, **f)
        x = torch.randn(args.big_batch, n, generator=gen).to(**f)
        t = torch.randn(args.big_batch, m, generator=gen).to(**f)

        def loss_fn():
            return (model(x) - t).square().mean()

    low = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    other = [p for p in model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    if method in ("LoRA + Adam", "dense + Adam", FLOOR):
        opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    elif method in ("geoopt RiemannianAdam", ORTHO):
        opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=ADAM_LR)
    elif method == "GeometricAdam":
        opt = GeometricAdam(model.parameters(), lr=ADAM_LR)
    elif method.startswith("DLRT"):
        integrator = "abc-psi" if "abc" in method else "augmented-bug"
        groups = [{"params": low}] + ([{"params": other, "lr": ADAM_LR}] if other else [])
        opt = DLRT(groups, lr=DLRT_LR, integrator=integrator, euclidean="adam", model=model)
    else:
        raise ValueError(method)

    phases = {"fwd_bwd": [], "opt": []}
    sync = _timing.make_sync(str(dev))
    kernels = []
    if method == FLOOR:
        for layer in model:
            if hasattr(layer, "q"):  # a low-rank hidden layer (LoRA factors p: m x r, q: n x r)
                m_, n_ = layer.p.shape[0], layer.q.shape[0]
                kernels.append((torch.randn(m_, 2 * r, generator=gen).to(**f),
                                torch.randn(n_, 2 * r, generator=gen).to(**f),
                                torch.randn(2 * r, 2 * r, generator=gen).to(**f)))
        base_step = opt.step

        def opt_step():
            base_step()
            for qa, qb, core in kernels:
                torch.linalg.qr(qa)
                torch.linalg.qr(qb)
                torch.linalg.svd(core)
        opt.step = opt_step

    def step():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    def step_timed():
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        phases["fwd_bwd"].append(t1 - t0)
        phases["opt"].append(t2 - t1)
        return loss

    return step, step_timed, phases, model, opt


def static_bytes(model, opt):
    """Bytes of parameters plus optimizer state tensors (exist before a step)."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                state += v.numel() * v.element_size()
    return params, state


# ---------------------------------------------------------------- child: memory
def child(args):
    import torch

    _timing.apply_threads(args.threads)
    torch.manual_seed(args.seed)
    part, method = args._child
    dev = torch.device(args.device)
    step, _, _, model, opt = build(part, method, args, dev)
    for _ in range(2):
        step()
    pbytes, sbytes = static_bytes(model, opt)
    out = _timing.peak_growth(step, args.device)
    probe = _timing.largest_tensor_probe()
    with probe:
        step()
    loss = float(step().detach())
    out.update({"param_bytes": pbytes, "state_bytes": sbytes, "largest_bytes": probe.largest_bytes,
                "largest_shape": list(probe.largest_shape), "largest_op": probe.largest_op,
                "aten_ops_per_step": probe.ops, "loss_finite": bool(loss == loss and abs(loss) < float("inf"))})
    print(json.dumps(out))


def memory_of(part, method, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--device", args.device,
           "--rank", str(args.rank), "--batch", str(args.batch), "--big-m", str(args.big_m),
           "--big-batch", str(args.big_batch), "--seed", str(args.seed), "--_child", part, method]
    return _timing.run_json_child(cmd)


# ---------------------------------------------------------------- profiling
def profile_tables(part, methods, args, dev, rows=14, steps=5):
    import torch
    from torch.profiler import ProfilerActivity, profile

    out = []
    for method in methods:
        step, _, _, _, _ = build(part, method, args, dev)
        for _ in range(3):
            step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(dev).startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
        tbl = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out.append(f"==== {part}: {method} ({steps} steps, sorted by self CPU time)\n{tbl}\n")
    return "\n".join(out)


# ---------------------------------------------------------------- main
def run_part(part, methods, args, dev, budget):
    sync = _timing.make_sync(args.device)
    built = {m: build(part, m, args, dev) for m in methods}
    for m, (step, *_rest) in built.items():  # finite after a few steps?
        for _ in range(2):
            step()
    res = _timing.compare({m: built[m][0] for m in methods}, budget_s=budget, sync=sync, max_repeats=41)
    # instrumented pass: phases, interleaved
    k = 9 if args.quick else 21
    for i in range(k):
        order = methods if i % 2 == 0 else methods[::-1]
        for m in order:
            built[m][1]()
    res["phase_median_s"] = {m: {ph: statistics.median(v) for ph, v in built[m][2].items()} for m in methods}
    res["loss_after"] = {m: float(built[m][0]().detach()) for m in methods}
    return res


def _measure_part(results, part, methods, args, dev, budget):
    """Time ``methods`` on ``part`` ("mlp" or "big"), then (unless --no-memory) measure
    each one's peak memory in a fresh process; store under ``results[part]`` and
    ``results[part + "_memory"]``."""
    res = results[part] = run_part(part, methods, args, dev, budget)
    for m in methods:
        print(f"  {m:24s} {_timing.fmt_ms(res['median_s'][m]):>8s} ms  ratio {res['paired_ratio'][m]:.2f}"
              f"  fwd+bwd {_timing.fmt_ms(res['phase_median_s'][m]['fwd_bwd'])} opt "
              f"{_timing.fmt_ms(res['phase_median_s'][m]['opt'])}", flush=True)
    print(f"  load {res['loadavg_before']} -> {res['loadavg_after']}", flush=True)
    if args.no_memory:
        return
    results[part + "_memory"] = {}
    for m in methods:
        if m == FLOOR:
            continue
        results[part + "_memory"][m] = mem = memory_of(part, m, args)
        print(f"  mem {m:24s} {mem.get('peak_growth_bytes', 0) / 2**20:8.1f} MiB  largest "
              f"{mem.get('largest_bytes', 0) / 2**20:.2f} MiB {mem.get('largest_shape')} {mem.get('error', '')[-300:]}",
              flush=True)


def main(argv=None):
    args = parse_args(argv)
    _timing.set_threads_env(args.threads)
    if args._child:
        return child(args)

    import geoopt
    import numpy as np  # noqa: F401  (versions in machine_info)
    import torch

    import lowrank_manifolds  # noqa: F401

    _timing.apply_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    budget = args.budget if args.budget is not None else (6.0 if args.quick else 25.0)
    results = {"config": {"mlp": list(MLP_SIZES), "rank": args.rank, "batch": args.batch, "dtype": "float32",
                          "adam_lr": ADAM_LR, "dlrt_lr": DLRT_LR, "big_m": args.big_m, "big_batch": args.big_batch,
                          "budget_s": budget}}

    print(f"== MLP {MLP_SIZES}, rank {args.rank}, batch {args.batch}", flush=True)
    _measure_part(results, "mlp", MLP_METHODS, args, dev, budget)
    if not args.no_big:
        print(f"== big layer {args.big_m} x {args.big_m}, rank {args.rank}, batch {args.big_batch}", flush=True)
        _measure_part(results, "big", BIG_METHODS, args, dev, budget / 2)

    if not args.no_profile:
        txt = profile_tables("mlp", ("LoRA + Adam", "geoopt RiemannianAdam", "DLRT abc-PSI"), args, dev)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "training_profile.txt"), "w") as fh:
            fh.write(txt)
        results["profile_file"] = "training_profile.txt"

    info = _timing.machine_info(args.threads, {"device": str(dev), "quick": args.quick})
    info["versions"]["geoopt"] = geoopt.__version__
    results["machine"] = info
    _timing.write_json(os.path.join(args.out, "training.json"), results)
    md = render_md(results, args)
    with open(os.path.join(args.out, "training.md"), "w") as fh:
        fh.write(md)
    print(md)


def _mib(b):
    return "—" if b is None else f"{b / 2**20:.1f}"


def render_md(res, args):
    info = res["machine"]
    v = info["versions"]
    cfg = res["config"]
    mem_kind = "CUDA max_memory_allocated growth" if str(info["device"]).startswith("cuda") else \
        "peak-RSS growth during one step, fresh subprocess"
    lines = [
        "# Training step: low-rank optimizers vs LoRA + Adam (float32)",
        "",
        f"Generated by `python benchmarks/bench_training.py{' --quick' if info.get('quick') else ''}` on "
        f"{info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPUs, {info['threads']} thread(s), "
        f"device {info['device']}; torch {v.get('torch')}, geoopt {v.get('geoopt')}; {info['time']}.",
        "",
        "Step = zero_grad + forward + backward + optimizer step. Ratio = median of per-round paired "
        "ratios method / LoRA + Adam, all methods interleaved in one process (< 1.0: faster than LoRA). "
        "fwd+bwd and opt: medians of a separate instrumented pass.",
        "",
    ]

    def table(key, methods, title, mem_key):
        r = res.get(key)
        if r is None:
            return
        lines.extend([title, "",
                      f"Load average {r['loadavg_before']} -> {r['loadavg_after']}, {r['repeats']} rounds.", "",
                      "| method | step ms | ratio vs LoRA + Adam | target | fwd+bwd ms | opt.step ms | "
                      f"peak step MiB ({mem_kind}) | largest tensor in step | params + states MiB |",
                      "|---|---:|---:|---|---:|---:|---:|---|---:|"])
        mems = res.get(mem_key, {})
        for m in methods:
            ratio = r["paired_ratio"][m]
            tgt = TARGETS.get(m) if key == "mlp" else None  # the targets are stated for the MLP
            tgt_s = "—" if tgt is None else f"<= {tgt} ({'met' if ratio <= tgt else 'missed'})"
            mem = mems.get(m, {})
            if "largest_bytes" in mem:
                largest = f"{mem['largest_bytes'] / 2**20:.2f} MiB {tuple(mem['largest_shape'])}"
                static = _mib(mem["param_bytes"] + mem["state_bytes"])
            else:
                largest, static = "—", "—"
            lines.append(
                f"| {m} | {_timing.fmt_ms(r['median_s'][m])} | {ratio:.2f} | {tgt_s} | "
                f"{_timing.fmt_ms(r['phase_median_s'][m]['fwd_bwd'])} | {_timing.fmt_ms(r['phase_median_s'][m]['opt'])} | "
                f"{_mib(mem.get('peak_growth_bytes'))} | {largest} | {static} |")
        lines.append("")

    table("mlp", MLP_METHODS,
          f"## MLP {'-'.join(map(str, cfg['mlp']))}, rank {cfg['rank']}, batch {cfg['batch']}", "mlp_memory")
    if "big" in res:
        dense = cfg["big_m"] ** 2 * 4
        table("big", BIG_METHODS,
              f"## One LowRankLinear({cfg['big_m']}, {cfg['big_m']}, rank={cfg['rank']}), batch {cfg['big_batch']}",
              "big_memory")
        mems = res.get("big_memory", {})
        for m in BIG_METHODS[1:]:
            mem = mems.get(m, {})
            if "peak_growth_bytes" in mem:
                frac = mem["peak_growth_bytes"] / dense
                lf = mem["largest_bytes"] / dense
                dense_s = f"{dense / 2**30:.0f} GiB" if dense >= 2**30 else f"{dense / 2**20:.0f} MiB"
                lines.append(f"- {m}: step peak {100 * frac:.2f}% of the {dense_s} dense float32 "
                             f"weight (target < 5%: {'met' if frac < 0.05 else 'missed'}); largest tensor "
                             f"{100 * lf:.2f}% ({mem['largest_op']}, {tuple(mem['largest_shape'])}); "
                             f"{mem['aten_ops_per_step']} aten ops per step.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
