"""Where LoRA-Pre's gap to Adam comes from: which factored moment costs the loss (slow study).

    python benchmarks/study_lorapre_moments.py [--steps 300] [--lrs 0.003,0.006,0.009]
                                               [--rank 16] [--ranks 16,32,64] [--seed 0]

The character transformer of ``examples/char_transformer.py`` (part b: dense model, only
the transformer blocks' linear weights get low-rank state, everything else dense Adam), with
Adam's two moments replaced one at a time:

* ``Adam``: both moments dense (the reference);
* ``factored m, dense v``: the first moment as LoRA-Pre's rank-``r`` factors, Adam's own
  dense second moment;
* ``dense m, factored EMA(abs g)``: Adam's dense first moment, LoRA-Pre's rank-``r``
  factored EMA of ``|g|`` as the denominator;
* ``LoRA-Pre``: both factored (what ``LoRAPreAdam`` does), and ``LoRAPreAdam``: the
  optimizer itself as the example builds it (rank width/8; ``--rank`` must be 16 for the two
  rows to be comparable), a check that the ablation reproduces it.

The factored moments use the optimizer's own update (``_newton_pair_``, sequential Newton
steps with the gauge reset), so only *which* moment is factored changes. Each variant runs at
every learning rate of ``--lrs``; the best is reported. The first moment is then swept over
``--ranks`` (with the dense second moment), and for the trained Adam model the share of the
first moment's energy (squared Frobenius norm) in its top ``r`` singular values is printed:
what a rank-``r`` momentum can hold at best.

Results: ``benchmarks/results/lorapre_moments.{json,md}``. Needs nothing beyond the package
(the text is the Python standard library's own sources). About 45 s per run at one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import torch  # noqa: E402

import char_transformer as ct  # noqa: E402
from lowrank_manifolds.optim.lora_pre import _newton_pair_, _top_right_singular_vectors  # noqa: E402


class _AblationAdam(torch.optim.Optimizer):
    """Adam without weight decay whose first moment (``"m"``) and/or second-moment
    denominator (``"v"``) are kept as LoRA-Pre factors for the parameters of group 0."""

    def __init__(self, factored_params, dense_params, lr, betas, rank, factored):
        super().__init__([{"params": factored_params, "factored": factored}, {"params": dense_params, "factored": ()}],
                         dict(lr=lr, betas=betas, eps=1e-8))
        self.rank = rank

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, fac = group["lr"], group["eps"], group["factored"]
            for p in group["params"]:
                g, st = p.grad, self.state[p]
                if not st:
                    self._init(st, g, fac)
                st["t"] += 1
                t = st["t"]
                if "m" in fac:  # 1 - c = sqrt(beta1) per half-step: the EMA at full rank
                    _newton_pair_(st["m_B"], st["m_A"], g, 1.0 - math.sqrt(b1), None)
                    m = st["m_B"] @ st["m_A"]
                else:
                    m = st["m"].lerp_(g, 1.0 - b1)
                if "v" in fac:  # EMA of |g| with decay sqrt(beta2), as LoRAPreAdam(second_moment="abs")
                    _newton_pair_(st["v_B"], st["v_A"], g.abs(), 1.0 - b2 ** 0.25, None)
                    d = (st["v_B"] @ st["v_A"]).abs_() / (1.0 - math.sqrt(b2) ** t)
                else:
                    d = (st["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2) / (1.0 - b2 ** t)).sqrt_()
                p.addcdiv_(m, d.add_(eps), value=-lr / (1.0 - b1 ** t))

    def _init(self, st, g, fac):
        st["t"] = 0
        if "m" in fac:
            st["m_B"] = torch.zeros(g.shape[0], self.rank, dtype=g.dtype)
            st["m_A"] = _top_right_singular_vectors(g, self.rank)
        else:
            st["m"] = torch.zeros_like(g)
        if "v" in fac:
            st["v_B"] = torch.zeros(g.shape[0], self.rank, dtype=g.dtype)
            st["v_A"] = _top_right_singular_vectors(g.abs(), self.rank)
        else:
            st["v"] = torch.zeros_like(g)


VARIANTS = {"Adam": (), "factored m, dense v": ("m",), "dense m, factored EMA(abs g)": ("v",),
            "LoRA-Pre": ("m", "v"), "LoRAPreAdam": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lrs", default="0.003,0.006,0.009")
    p.add_argument("--rank", type=int, default=16, help="rank of the factored moments (width/8)")
    p.add_argument("--ranks", default="16,32,64", help="first-moment rank sweep (dense v)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # the example's data, model, schedule and training loop, with its defaults (part b)
    ex = ct.parse(["--part", "b", "--steps", str(args.steps), "--seed", str(args.seed)])
    data, val, info = ct.load(ex)
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [ct.batch(val, ex.context, ex.batch, vgen) for _ in range(ex.eval_batches)]
    built = {}

    example_optimizer = ct.make_optimizer

    def make(method, model, lr, _args):
        name, rank = method
        if VARIANTS[name] is None:  # the optimizer itself, as the example builds it (rank width/8)
            built["last"] = (example_optimizer("LoRA-Pre r=d/8", model, lr, _args), model)
            return built["last"][0]
        blocks = ct.block_matrices(model)
        other = [p for p in model.parameters() if all(p is not q for q in blocks)]
        opt = _AblationAdam(blocks, other, lr, ct.BETAS, rank, VARIANTS[name])
        built["last"] = (opt, model)
        return opt

    ct.make_optimizer = make
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = []

    def run(name, rank):
        best = None
        for lr in lrs:
            res = ct.train((name, rank), lr, data, val_batches, ex)
            rec = dict(variant=name, rank=rank, lr=lr, val=res["val"])
            print(json.dumps(rec), flush=True)
            runs.append(rec)
            if best is None or res["val"] < best[0]["val"]:
                best = (rec, built["last"])
        return best

    best = {name: run(name, args.rank) for name in VARIANTS}
    sweep = {r: (best["factored m, dense v"] if r == args.rank else run("factored m, dense v", r))
             for r in [int(x) for x in args.ranks.split(",")]}
    # energy of Adam's first moment in its top-r singular values, per block matrix
    opt, model = best["Adam"][1]
    energy = {}
    for r in sweep:
        shares = []
        for p in ct.block_matrices(model):
            s2 = torch.linalg.svdvals(opt.state[p]["m"].double()) ** 2
            shares.append(float(s2[:r].sum() / s2.sum()))
        energy[r] = dict(mean=sum(shares) / len(shares), min=min(shares))
    adam = best["Adam"][0]["val"]
    lines = [
        "# LoRA-Pre on the char transformer: which factored moment costs the loss",
        "",
        f"Generated by `python benchmarks/study_lorapre_moments.py` (seed {args.seed}, {args.steps} steps, "
        f"lrs {args.lrs}; text: standard library sources {info}). Block matrices only; best learning rate of the grid per row.",
        "",
        "| variant | rank | best lr | val loss | val / Adam |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (rec, _) in best.items():
        lines.append(f"| {name} | {'—' if name == 'Adam' else rec['rank']} | {rec['lr']:g} | {rec['val']:.3f} | "
                     f"{rec['val'] / adam:.3f} |")
    lines += ["", "First-moment rank sweep (dense second moment), and the share of Adam's first-moment "
              "energy in its top-r singular values (mean and smallest over the block matrices):", "",
              "| rank of m | best lr | val loss | val / Adam | energy in top r (mean) | (min) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r, (rec, _) in sweep.items():
        lines.append(f"| {r} | {rec['lr']:g} | {rec['val']:.3f} | {rec['val'] / adam:.3f} | "
                     f"{energy[r]['mean']:.3f} | {energy[r]['min']:.3f} |")
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lorapre_moments.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "lorapre_moments.json"), "w") as fh:
        json.dump(dict(runs=runs, energy=energy, config={k: v for k, v in vars(args).items() if k != "out"}),
                  fh, indent=1)
    print(md)


if __name__ == "__main__":
    main()
