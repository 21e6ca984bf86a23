"""A fine-tuning step of a transformer stack: 12 blocks x 6 adapted matrices, LoRA + foreach AdamW
against this library's adapters with each optimizer, batched (``foreach=None``) and per weight.

    python benchmarks/bench_stack.py           # width 256, 12 blocks, rank 8, 1 thread (~2 min)
    python benchmarks/bench_stack.py --quick   # seconds: 2 blocks of width 32, a crash test, no result

The model (pure torch, frozen base): ``blocks`` pre-norm blocks of width ``d``, each with the
attention projections ``q, k, v, o`` (``d x d``) and an MLP ``up`` (``d -> 4d``, GELU) and
``down`` (``4d -> d``); ``torch.nn.functional.scaled_dot_product_attention`` with 4 heads
(causal); a frozen embedding and head over 256 tokens; cross-entropy on random tokens
(batch 8, context 64). The six projections of every block are adapted, 72 matrices in three
shape groups (``d x d`` x 48, ``4d x d`` x 12, ``d x 4d`` x 12):

* ``LoRA + AdamW (foreach)``: ``W0 x + B A x`` with ``A`` Kaiming-uniform and ``B = 0``
  (peft's LoRA at ``lora_alpha = r``), ``torch.optim.AdamW(foreach=True)``: the reference;
* ``add_adapters(rank=r)`` (``lowrank_manifolds.nn``: ``W0 x + U S V^T x`` on the
  fixed-rank manifold) with ``RiemannianAdam``, ``GeometricAdam``, ``DLRT`` abc-PSI (from
  ``p.grad``) and, rank-adaptive at capacity ``2r``, ``DLRT`` augmented BUG + Adam, each with
  its weights stepped as one batch per shape group and one by one (``foreach=False``; for
  ``RiemannianAdam`` that is geoopt's own loop).

A step is ``zero_grad`` + forward + backward + ``opt.step()``, timed interleaved in one
process (``_timing.compare``; ratio: the median of per-round ratios to LoRA + AdamW). Also:
``opt.step()`` alone, timed the same way (not for recorded steps, which need their forward and
backward), and its kernels and host reads (``lowrank_manifolds.testing.OpCounter``). Results: ``benchmarks/results/stack.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _timing  # noqa: E402

_timing.set_threads_env(1)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_manifolds.nn import add_adapters  # noqa: E402
from lowrank_manifolds.optim import DLRT, GeometricAdam, RiemannianAdam  # noqa: E402
from lowrank_manifolds.testing import OpCounter  # noqa: E402

VOCAB, HEADS, BATCH, CONTEXT = 256, 4, 8, 64


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, HEADS, d // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, d: int, blocks: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, VOCAB)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class LoRALinear(nn.Module):
    """``W0 x + B A x`` over a frozen ``nn.Linear`` (peft's LoRA at ``lora_alpha = r``)."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


TARGETS = ("q", "k", "v", "o", "up", "down")


def _base(d, blocks):
    torch.manual_seed(0)
    model = Stack(d, blocks)
    model.requires_grad_(False)
    return model


def _lora_model(d, blocks, r):
    model = _base(d, blocks)
    for block in model.blocks:
        for name in TARGETS:
            setattr(block, name, LoRALinear(getattr(block, name), r))
    return model


def _adapted(d, blocks, r, capacity=None):
    model = _base(d, blocks)
    kw = {} if capacity is None else {"max_rank": capacity, "tol": 1e-3}
    add_adapters(model, r, include=[f"blocks.*.{t}" for t in TARGETS], **kw)
    return model


def methods(d, blocks, r):
    """name -> (model, optimizer)."""
    out = {}
    model = _lora_model(d, blocks, r)
    out["LoRA + AdamW (foreach)"] = (model, torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True))
    makers = {
        "RiemannianAdam": (lambda ps, fe, _: RiemannianAdam(ps, lr=1e-3, foreach=fe), None),
        "GeometricAdam": (lambda ps, fe, _: GeometricAdam(ps, lr=1e-3, foreach=fe), None),
        "DLRT abc-PSI (p.grad)": (lambda ps, fe, _: DLRT(ps, lr=1e-2, integrator="abc-psi", foreach=fe), None),
        "DLRT augmented BUG + Adam, capacity 2r": (
            lambda ps, fe, _: DLRT(ps, lr=1e-3, integrator="augmented-bug", core="adam", tol=1e-3, foreach=fe), 2 * r),
        "DLRT abc-PSI, recorded (model=)": (
            lambda ps, fe, model: DLRT(ps, lr=1e-2, integrator="abc-psi", model=model, foreach=fe), None),
    }
    for name, (make, capacity) in makers.items():
        for fe in (None, False):
            model = _adapted(d, blocks, r, capacity)
            label = f"{name}, foreach={fe}" + (" (geoopt's loop)" if fe is False and name == "RiemannianAdam" else "")
            out[label] = (model, make([p for p in model.parameters() if p.requires_grad], fe, model))
    return out


def _step_fn(model, opt, tokens, targets):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timing per table")
    p.add_argument("--device", default="cpu", help="e.g. cuda: every tensor is made there (torch's default device)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    _timing.apply_threads(1)
    sync = _timing.use_device(args.device)
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="DLRT: no recorded")
    d, blocks, r = (32, 2, 4) if args.quick else (args.width, args.blocks, args.rank)
    budget = 0.5 if args.quick else args.budget
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g, device="cpu").to(args.device)
    targets = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g, device="cpu").to(args.device)
    built = methods(d, blocks, r)
    steps, opt_steps, counts = {}, {}, {}
    for name, (model, opt) in built.items():
        step = _step_fn(model, opt, tokens, targets)
        for _ in range(3):  # states exist
            step()
        steps[name] = step
        opt.zero_grad(set_to_none=True)  # a fresh backward (a recorded step consumes its records)
        F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        with OpCounter() as count:
            opt.step()
        counts[name] = count
        if getattr(opt, "recorder", None) is None:  # a recorded step needs its forward and backward
            opt_steps[name] = opt.step  # the gradients of the last step stay
    whole = _timing.compare(steps, budget_s=budget, sync=sync)
    alone = _timing.compare(opt_steps, budget_s=budget, sync=sync)
    rows = [dict(name=k, step_ms=whole["median_s"][k] * 1e3, step_ratio=whole["paired_ratio"][k],
                 opt_ms=alone["median_s"][k] * 1e3 if k in alone["median_s"] else None,
                 opt_ratio=alone["paired_ratio"].get(k),
                 kernels=counts[k].kernels, reads=counts[k].reads, cpu_reads=counts[k].by_name["equal"])
             for k in built]
    lines = [f"# Fine-tuning step of a {blocks}-block transformer stack (width {d}, rank {r}, "
             f"{len(TARGETS) * blocks} adapted matrices), one thread, device {args.device}", "",
             "Generated by `python benchmarks/bench_stack.py`. Step: zero_grad + forward + backward + "
             "opt.step; ratios: medians of the per-round ratios to LoRA + AdamW, interleaved in one process. "
             "Kernels and reads: of one steady-state `opt.step()` (in brackets the reads that are CPU-only "
             f"`torch.equal` tests). Load average {whole['loadavg_before']} -> {alone['loadavg_after']}.", "",
             "| method | step ms | step / LoRA | opt.step ms | opt.step / LoRA's | kernels | reads |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        note = f" ({row['cpu_reads']})" if row["cpu_reads"] else ""
        opt = "- | -" if row["opt_ms"] is None else f"{row['opt_ms']:.2f} | {row['opt_ratio']:.2f}"
        lines.append(f"| {row['name']} | {row['step_ms']:.1f} | {row['step_ratio']:.2f} | {opt} | "
                     f"{row['kernels']} | {row['reads']}{note} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        name = "stack" if args.device == "cpu" else f"stack_{args.device.split(':')[0]}"
        _timing.write_json(os.path.join(args.out, f"{name}.json"),
                           dict(rows=rows, machine=_timing.machine_info(1), width=d, blocks=blocks, rank=r))
        with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
            fh.write(md)
    return json.loads(json.dumps(rows))


if __name__ == "__main__":
    main()
