"""One optimizer step over many equal low-rank layers: per weight (``foreach=False``) against one
batch per shape group (the default), with torch's foreach Adam on LoRA factors and the step's
linear-algebra kernels alone as references.

    python benchmarks/bench_grouped_step.py           # 48 x LowRankLinear(256, 256, 16), 1 thread (~2 min)
    python benchmarks/bench_grouped_step.py --quick   # seconds: 4 small layers, a crash test, no result
    python benchmarks/bench_grouped_step.py --device cuda   # on a GPU, with kernel launches per step

``opt.step()`` only (the gradients stay), timed interleaved in one process (``_timing.compare``:
alternating order, medians, the median of the per-round ratios to the first entry). References:

* ``foreach Adam (LoRA factors)``: ``torch.optim.Adam(foreach=True)`` on ``L`` pairs of LoRA
  factors of the same rank (``m x r`` and ``r x n``): what a practitioner compares against;
* ``kernels, batched`` / ``kernels, per layer``: the retraction's linear algebra alone, two QRs
  of ``m x 2r`` and one ``2r x 2r`` SVD per layer, in one batched call each or in a loop: the
  floor an optimizer of this family cannot go below.

Also counted, with ``lowrank_manifolds.testing.OpCounter``: the kernels (aten operators that
compute, views excluded) of one steady-state step at ``L = 1`` and at ``L``, and its
data-dependent host reads at ``L`` (of which the ``torch.equal`` tests are CPU-only shortcuts, in
brackets: a CUDA step does not make them). Results: ``benchmarks/results/grouped_step.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _timing  # noqa: E402

_timing.set_threads_env(1)

import torch  # noqa: E402

import geoopt  # noqa: E402
from lowrank_manifolds.nn import LowRankLinear  # noqa: E402
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, RiemannianAdam, RiemannianSGD  # noqa: E402
from lowrank_manifolds.testing import OpCounter  # noqa: E402

def _optimizers(lr=1e-3):
    """name -> (make(params, foreach), capacity or None)."""
    return {
        "GeometricSGD": (lambda ps, fe: GeometricSGD(ps, lr=lr, foreach=fe), None),
        "GeometricAdam": (lambda ps, fe: GeometricAdam(ps, lr=lr, foreach=fe), None),
        "GeometricAdam, capacity 2r": (lambda ps, fe: GeometricAdam(ps, lr=lr, foreach=fe), 2),
        "DLRT abc-PSI (p.grad)": (lambda ps, fe: DLRT(ps, lr=lr, integrator="abc-psi", foreach=fe), None),
        "DLRT augmented BUG + Adam, capacity 2r": (
            lambda ps, fe: DLRT(ps, lr=lr, integrator="augmented-bug", core="adam", foreach=fe), 2),
        # foreach=False: geoopt's own per-parameter step
        "RiemannianAdam (ours; False = geoopt's)": (lambda ps, fe: RiemannianAdam(ps, lr=lr, foreach=fe), None),
        "RiemannianSGD, momentum 0.9 (ours; False = geoopt's)": (
            lambda ps, fe: RiemannianSGD(ps, lr=lr, momentum=0.9, foreach=fe), None),
    }


def _model(L, m, n, r, cap_factor):
    kw = {} if cap_factor is None else {"max_rank": cap_factor * r, "tol": 1e-3}
    torch.manual_seed(0)
    return torch.nn.Sequential(*[LowRankLinear(n, m, r, bias=False, **kw) for _ in range(L)])


def _ready(model, opt, x):
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()


def _lora(L, m, n, r):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*shape) * 0.1) for _ in range(L) for shape in ((m, r), (r, n))]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(ps, lr=1e-3, foreach=True)
    opt.step()
    return opt


def _kernels(L, m, n, r, batched):
    a = torch.randn(L, m, 2 * r)
    b = torch.randn(L, n, 2 * r)
    c = torch.randn(L, 2 * r, 2 * r)
    if batched:
        return lambda: (torch.linalg.qr(a), torch.linalg.qr(b), torch.linalg.svd(c))
    return lambda: [(torch.linalg.qr(a[i]), torch.linalg.qr(b[i]), torch.linalg.svd(c[i])) for i in range(L)]


def _anatomy(make, cap, L, m, n, r, foreach):
    model = _model(L, m, n, r, cap)
    opt = make(model.parameters(), foreach)
    _ready(model, opt, torch.randn(32, n))
    with OpCounter() as count:
        opt.step()
    return count


def _launches(opt) -> int:
    """Device activities (kernels, copies, sets) of one ``opt.step()`` on CUDA, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timing per optimizer")
    p.add_argument("--device", default="cpu", help="e.g. cuda: every tensor is made there (torch's default device)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    _timing.apply_threads(1)
    sync = _timing.use_device(args.device)
    L, (m, n, r) = (4, (24, 24, 4)) if args.quick else (args.layers, (256, 256, 16))  # square: a stack
    budget = 0.2 if args.quick else args.budget
    x = torch.randn(32, n)
    lora = _lora(L, m, n, r)
    refs = {"foreach Adam (LoRA factors)": lora.step, "kernels, batched": _kernels(L, m, n, r, True),
            "kernels, per layer": _kernels(L, m, n, r, False)}
    base = _timing.compare(refs, budget_s=budget, sync=sync)
    rows = [dict(name=k, foreach="-", ms=base["median_s"][k] * 1e3) for k in refs]
    floor_ms = base["median_s"]["kernels, batched"] * 1e3
    adam_ms = base["median_s"]["foreach Adam (LoRA factors)"] * 1e3
    launches = {}
    for name, (make, cap) in _optimizers().items():
        fns = {"foreach Adam (LoRA factors)": lora.step}  # first: the reference of the paired ratios
        for fe in (False, None):
            model = _model(L, m, n, r, cap)
            opt = make(model.parameters(), fe)
            _ready(model, opt, x)
            fns[f"foreach={fe}"] = opt.step
        res = _timing.compare(fns, budget_s=budget, sync=sync)
        for fe in (False, None):
            one, many = _anatomy(make, cap, 1, m, n, r, fe), _anatomy(make, cap, L, m, n, r, fe)
            if args.device.startswith("cuda"):
                model = _model(L, m, n, r, cap)
                opt = make(model.parameters(), fe)
                _ready(model, opt, x)
                launches[(name, str(fe))] = _launches(opt)
            rows.append(dict(name=name, foreach=str(fe), ms=res["median_s"][f"foreach={fe}"] * 1e3,
                             vs_adam=res["paired_ratio"][f"foreach={fe}"], kernels_1=one.kernels,
                             kernels_L=many.kernels, reads_L=many.reads, cpu_reads_L=many.by_name["equal"],
                             vs_loop=res["median_s"][f"foreach={fe}"] / res["median_s"]["foreach=False"]))
        print(json.dumps(rows[-2:]), flush=True)
    geo = _model(L, m, n, r, None)
    gopt = geoopt.optim.RiemannianAdam(geo.parameters(), lr=1e-3)
    _ready(geo, gopt, x)
    gres = _timing.compare({"adam": lora.step, "geoopt": gopt.step}, budget_s=budget, sync=sync)
    with OpCounter() as count:
        gopt.step()
    rows.append(dict(name="geoopt RiemannianAdam (stock)", foreach="-", ms=gres["median_s"]["geoopt"] * 1e3,
                     vs_adam=gres["paired_ratio"]["geoopt"], kernels_L=count.kernels, reads_L=count.reads,
                     cpu_reads_L=count.by_name["equal"]))
    lines = [f"# One step over {L} x LowRankLinear({n}, {m}, rank {r}), `opt.step()` only, one thread, "
             f"device {args.device}", "",
             "Generated by `python benchmarks/bench_grouped_step.py`. Times are medians of interleaved rounds; "
             "`/ Adam`: the median of the per-round ratios to torch's foreach Adam on LoRA factors of the same "
             f"rank ({adam_ms:.2f} ms); `/ floor`: over the batched kernels alone ({floor_ms:.2f} ms: two QRs "
             f"{m} x {2 * r} and one {2 * r} x {2 * r} SVD per layer in one call each); `/ loop`: over the same "
             f"optimizer with `foreach=False`. Kernels: aten operators that compute (views excluded) in one "
             f"steady-state step at 1 and {L} layers; reads: data-dependent host reads at {L} layers, in brackets "
             "those of them that are CPU-only shortcuts (`torch.equal` tests a CUDA step does not make). "
             f"Load average {base['loadavg_before']}.", "",
             "| step | foreach | ms | / Adam | / floor | / loop | kernels (1) | kernels (L) | reads (L) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(row, key, fmt="{}"):
        return fmt.format(row[key]) if key in row else "-"

    def reads_note(row):
        return f" ({row['cpu_reads_L']})" if row.get("cpu_reads_L") else ""

    for row in rows:
        vs_adam = row.get("vs_adam", row["ms"] / adam_ms)
        lines.append(f"| {row['name']} | {row['foreach']} | {row['ms']:.2f} | {vs_adam:.2f} | "
                     f"{row['ms'] / floor_ms:.2f} | {cell(row, 'vs_loop', '{:.2f}')} | {cell(row, 'kernels_1')} | "
                     f"{cell(row, 'kernels_L')} | {cell(row, 'reads_L')}{reads_note(row)} |")
    if launches:
        lines += ["", f"CUDA activities (kernels, copies) of one `opt.step()` at {L} layers, torch.profiler:", "",
                  "| step | foreach | launches |", "|---|---|---:|"]
        lines += [f"| {name} | {fe} | {count} |" for (name, fe), count in launches.items()]
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        name = "grouped_step" if args.device == "cpu" else f"grouped_step_{args.device.split(':')[0]}"
        _timing.write_json(os.path.join(args.out, f"{name}.json"),
                           dict(rows=rows, machine=_timing.machine_info(1), layers=L, shape=[m, n, r]))
        with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
            fh.write(md)
    return rows


if __name__ == "__main__":
    main()
