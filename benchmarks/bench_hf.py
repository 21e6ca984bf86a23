"""Fine-tuning a small Hugging Face Llama: peft LoRA / AdaLoRA against this library's adapters
and compression, on the same model and data, offline.

    python benchmarks/bench_hf.py [--quick] [--threads 1] [--seeds 3] [--steps N]

Task. A byte-level ``LlamaForCausalLM`` built from a config (vocabulary 256 bytes, hidden 64,
2 layers, 4 heads, MLP 176, context 64; no download) is pre-trained with AdamW on the
top-level modules of Python's standard library (``Lib/*.py``), then fine-tuned on another part,
the ``asyncio`` package (every 6th file, sorted by name, is held out for validation). The
metric is the validation loss (nats per byte) of the fine-tuned model on fixed windows of the
held-out files, at the end of the run.

Methods (all on the 14 projections ``q k v o gate up down`` of both layers; the rest frozen,
except for the compression and the dense reference, which train everything):

* ``peft LoRA + AdamW``: ``LoraConfig(r=8, lora_alpha=16)``;
* ``peft AdaLoRA``: ``AdaLoraConfig(init_r=12, target_r=8)``, its own rank allocation
  (``update_and_allocate`` every step, budget schedule over the run), AdamW;
* ``adapters + DLRT aug-BUG`` / ``adapters + DLRT abc-PSI``: ``add_adapters(rank=8,
  max_rank=16, tol=0.1)``, ``DLRT(model=..., tol=0.1)`` (rank-adaptive);
* ``adapters + GeometricAdam``: the same adapters, ``GeometricAdam(tol=0.1)``;
* ``adapters cap 8 + DLRT aug-BUG``: ``max_rank=8`` (at most LoRA's rank, about its parameter
  count); ``adapters tol 0.3 + DLRT aug-BUG``: capacity 16, ``tol=0.3`` (a coarser truncation);
* ``compress + DLRT aug-BUG``: ``convert_to_low_rank(rank=24, max_rank=24, tol=0.1)`` of the
  base weights themselves (the model then stores fewer numbers), trained with DLRT (the other
  parameters, embeddings, norms and head, with AdamW at lr 1e-3 inside the same DLRT);
* ``dense AdamW`` (reference): every weight fine-tuned.

Protocol. Each method's learning rate (DLRT: the step size ``h``) is chosen from a grid of three
values on seed 0 (lowest final validation loss); then seeds 0..S-1 run at that value (the seed
changes the adapters' initialisation and the batches; the pre-trained base is the same). Time
per step: every method's training step timed interleaved in one process after the runs
(``benchmarks/_timing.py``, paired ratios against LoRA + AdamW). One thread.

Results: ``benchmarks/results/hf.{json,md}``, plots ``docs/figures/hf_val_loss.png`` and
``docs/figures/hf_ranks.png``.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _timing  # noqa: E402
from _study import scratch_folder  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRIDS = {
    "peft LoRA + AdamW": [1e-3, 3e-3, 1e-2],
    "peft AdaLoRA": [3e-3, 1e-2, 3e-2],
    "adapters + DLRT aug-BUG": [0.1, 0.3, 1.0],
    "adapters + DLRT abc-PSI": [0.1, 0.3, 1.0],
    "adapters + GeometricAdam": [1e-3, 3e-3, 1e-2],
    "adapters cap 8 + DLRT aug-BUG": [0.1, 0.3, 1.0],
    "adapters tol 0.3 + DLRT aug-BUG": [0.1, 0.3, 1.0],
    "compress + DLRT aug-BUG": [0.1, 0.3, 1.0],
    "dense AdamW": [3e-4, 1e-3, 3e-3],
}
ADAPTER_RANK, ADAPTER_CAP, TOL = 8, 16, 0.1
# (initial rank, capacity, tolerance) of our adapters, by method
ADAPTERS = {"adapters cap 8 + DLRT aug-BUG": (8, 8, TOL), "adapters tol 0.3 + DLRT aug-BUG": (8, 16, 0.3)}
COMPRESS_RANK = 24


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, one lr per method (about a minute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300; --quick 40)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 1500; --quick 100")
    p.add_argument("--out", default=None, help="default benchmarks/results (--quick: a temporary folder, removed "
                                               "at exit)")
    p.add_argument("--figures", default=None, help="default docs/figures (--quick: the --out folder)")
    args = p.parse_args()
    if args.out is None:
        args.out = str(scratch_folder("bench_hf_")) if args.quick else str(HERE / "results")
    if args.figures is None:
        args.figures = args.out if args.quick else str(HERE.parent / "docs" / "figures")
    return args


# --------------------------------------------------------------------------- data
def corpus():
    lib = os.path.dirname(os.__file__)
    pre = sorted(glob.glob(os.path.join(lib, "*.py")))
    fine = sorted(glob.glob(os.path.join(lib, "asyncio", "*.py")))
    val = fine[::6]
    train = [f for f in fine if f not in val]

    def read(files):
        return b"\n".join(pathlib.Path(f).read_bytes() for f in files)

    return read(pre), read(train), read(val), dict(pretrain=len(pre), finetune=len(train), validation=len(val))


def as_tensor(data):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(data, n, t, gen):
    import torch

    idx = torch.randint(0, data.numel() - t - 1, (n,), generator=gen)
    return torch.stack([data[i:i + t] for i in idx.tolist()])


# --------------------------------------------------------------------------- model
def build_model(t):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=t,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def evaluate(model, val_batches):
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        out = sum(float(loss_of(model, x)) for x in val_batches) / len(val_batches)
    model.train(was)
    return out


def pretrain(cfg, pre, val_batches, cache):
    import torch

    key = f"pre_{cfg['pretrain_steps']}_{cfg['batch']}_{cfg['T']}.pt"
    path = pathlib.Path(cache) / key
    torch.manual_seed(1234)
    model = build_model(cfg["T"])
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model, json.loads((path.with_suffix(".json")).read_text())
    gen = torch.Generator().manual_seed(1234)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    start = time.perf_counter()
    model.train()
    for _ in range(cfg["pretrain_steps"]):
        opt.zero_grad()
        loss = loss_of(model, batch(pre, cfg["batch"], cfg["T"], gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    info = {"pretrain_loss": float(loss.detach()), "finetune_val_before": evaluate(model, val_batches),
            "pretrain_s": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(info))
    return model, info


# --------------------------------------------------------------------------- methods
def setup(method, base, lr, steps):
    """``(model, optimizer, after_step)`` for one method on a copy of the pre-trained base."""
    import torch
    from lowrank_manifolds.nn import add_adapters, convert_to_low_rank
    from lowrank_manifolds.optim import DLRT, GeometricAdam

    model = copy.deepcopy(base)
    include = [f"*.{t}" for t in TARGETS]
    after = None
    if method.startswith("peft"):
        import peft

        if method == "peft LoRA + AdamW":
            config = peft.LoraConfig(r=ADAPTER_RANK, lora_alpha=2 * ADAPTER_RANK, target_modules=TARGETS,
                                     lora_dropout=0.0)
        else:
            config = peft.AdaLoraConfig(init_r=12, target_r=ADAPTER_RANK, lora_alpha=2 * ADAPTER_RANK,
                                        target_modules=TARGETS, lora_dropout=0.0, total_step=steps,
                                        tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 40))
        model = peft.get_peft_model(model, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        if method == "peft AdaLoRA":
            counter = {"t": 0}

            def after():
                counter["t"] += 1
                model.base_model.update_and_allocate(counter["t"])
    elif method.startswith("adapters"):
        rank, cap, tol = ADAPTERS.get(method, (ADAPTER_RANK, ADAPTER_CAP, TOL))
        add_adapters(model, rank=rank, max_rank=cap, tol=tol, include=include)
        params = [p for p in model.parameters() if p.requires_grad]
        if "GeometricAdam" in method:
            opt = GeometricAdam(params, lr=lr, tol=tol)
        else:
            integ = "augmented-bug" if "aug-BUG" in method else "abc-psi"
            opt = DLRT(params, lr=lr, integrator=integ, tol=tol, model=model)
    elif method.startswith("compress"):
        convert_to_low_rank(model, rank=COMPRESS_RANK, max_rank=COMPRESS_RANK, tol=TOL, include=include)
        low = [p for p in model.parameters() if hasattr(p, "manifold")]
        ids = {id(p) for p in low}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opt = DLRT([{"params": low}, {"params": rest, "lr": 1e-3}], lr=lr, integrator="augmented-bug", tol=TOL,
                   model=model, euclidean="adamw")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    return model, opt, after


def ranks(method, model):
    """Per-module ranks (ours: active ranks; AdaLoRA: non-zero entries of E; LoRA: r)."""
    from lowrank_manifolds.hf import active_ranks

    if method == "peft LoRA + AdamW":
        return [ADAPTER_RANK] * (2 * len(TARGETS))
    if method == "peft AdaLoRA":
        return [int((m.lora_E["default"] != 0).sum()) for m in model.modules() if hasattr(m, "lora_E")]
    if method == "dense AdamW":
        return []
    return list(active_ranks(model).values())


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored(model):
    return sum(p.numel() for p in model.parameters())


def run(method, base, lr, seed, cfg, ft, val_batches):
    import torch

    torch.manual_seed(seed)
    model, opt, after = setup(method, base, lr, cfg["steps"])
    gen = torch.Generator().manual_seed(100 + seed)
    curve, rank_curve = [], []
    start = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        opt.zero_grad()
        loss = loss_of(model, batch(ft, cfg["batch"], cfg["T"], gen))
        if not torch.isfinite(loss):
            return {"val": float("nan"), "diverged": True, "curve": curve, "ranks": rank_curve}
        loss.backward()
        try:
            opt.step()
        except FloatingPointError:
            return {"val": float("nan"), "diverged": True, "curve": curve, "ranks": rank_curve}
        if after is not None:
            after()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curve.append((step, evaluate(model, val_batches)))
            rank_curve.append((step, ranks(method, model)))
    wall = time.perf_counter() - start
    return {"val": curve[-1][1], "diverged": False, "curve": curve, "ranks": rank_curve,
            "trainable": n_trainable(model), "stored": stored(model), "wall_s": wall}


def step_fn(method, base, lr, cfg, ft):
    import torch

    torch.manual_seed(0)
    model, opt, after = setup(method, base, lr, 10**6)
    gen = torch.Generator().manual_seed(7)
    x = batch(ft, cfg["batch"], cfg["T"], gen)

    def one():
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
        if after is not None:
            after()

    return one


# --------------------------------------------------------------------------- report
def spread(values):
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def write(results, out, figures, quick):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hf"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    lines = ["# Fine-tuning a byte-level Llama (hidden 64, 2 layers) on `asyncio` after pre-training on `Lib/*.py`",
             "",
             f"`python benchmarks/bench_hf.py{' --quick' if quick else ''}`: {cfg['steps']} steps, batch "
             f"{cfg['batch']} x {cfg['T']} bytes, lr from the grid on seed 0, then seeds "
             f"{list(range(cfg['seeds']))}; validation loss in nats/byte (before fine-tuning: "
             f"{results['pretrain']['finetune_val_before']:.4f}); one thread; load average "
             f"{results['timing'].get('loadavg_before')} -> {results['timing'].get('loadavg_after')}.",
             "",
             "| method | lr grid (seed-0 val loss) | best lr | val loss mean ± std | min / max | trainable | stored "
             "| final ranks mean [min, max] | ms / step | step / LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    timing = results["timing"]
    for method, r in results["methods"].items():
        grid = ", ".join(f"{lr:g}: {v:.4f}" if v == v else f"{lr:g}: diverged" for lr, v in r["grid"])
        vals = [s["val"] for s in r["seeds"]]
        rk = r["seeds"][0]["ranks"][-1][1] if r["seeds"][0]["ranks"] else []
        rk_s = f"{statistics.mean(rk):.1f} [{min(rk)}, {max(rk)}]" if rk else "dense"
        ms = 1e3 * timing["median_s"].get(method, float("nan"))
        ratio = timing["paired_ratio"].get(method, float("nan"))
        lines.append(f"| {method} | {grid} | {r['best_lr']:g} | {statistics.mean(vals):.4f} ± {spread(vals):.4f} | "
                     f"{min(vals):.4f} / {max(vals):.4f} | {r['seeds'][0]['trainable']} | {r['seeds'][0]['stored']} "
                     f"| {rk_s} | {ms:.1f} | {ratio:.2f} |")
    lines += ["", "std: population standard deviation over the seeds; trainable: entries that receive gradients "
              "(ours: the packed [U; S; V] of capacity R); stored: all parameters of the fine-tuned model "
              "(peft's adapters added to the base; the compressed model replaces its weights)."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, pathlib.Path(figures), name)


def plot(results, figures, name):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    figures.mkdir(parents=True, exist_ok=True)

    def finish(fig, ax, ylabel, suffix):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figures / f"{name}_{suffix}.png", dpi=110)
        print(f"plot saved to {figures / f'{name}_{suffix}.png'}")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in results["methods"].items():
        curves = [dict(s["curve"]) for s in r["seeds"]]
        steps = sorted(curves[0])
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        ax.plot(steps, mean, label=f"{method} (lr {r['best_lr']:g})")
    ax.axhline(results["pretrain"]["finetune_val_before"], color="grey", ls=":", label="before fine-tuning")
    finish(fig, ax, "validation loss (nats/byte), mean of seeds", "val_loss")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in results["methods"].items():
        rc = r["seeds"][0]["ranks"]
        if not rc or not rc[0][1] or method == "peft LoRA + AdamW":
            continue
        ax.plot([s for s, _ in rc], [statistics.mean(v) for _, v in rc], label=method)
    ax.axhline(ADAPTER_RANK, color="grey", ls=":", label="LoRA r / AdaLoRA target")
    finish(fig, ax, "mean rank over the 14 projections (seed 0)", "ranks")


def main():
    args = parse()
    _timing.set_threads_env(args.threads)
    import torch

    _timing.apply_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    steps = args.steps or (40 if args.quick else 300)
    cfg = dict(steps=steps, batch=16, T=64, seeds=args.seeds, eval_every=max(1, steps // 10),
               pretrain_steps=args.pretrain_steps or (100 if args.quick else 1500), val_windows=48)
    pre, ft, val, files = corpus()
    pre, ft, val = as_tensor(pre), as_tensor(ft), as_tensor(val)
    vgen = torch.Generator().manual_seed(4321)
    val_batches = [batch(val, 16, cfg["T"], vgen) for _ in range(cfg["val_windows"] // 16)]
    base, info = pretrain(cfg, pre, val_batches, os.path.join(tempfile.gettempdir(), "lowrank_bench_hf"))
    print(f"pre-trained: {info}", flush=True)
    results = {"config": cfg, "files": files, "pretrain": info, "methods": {},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    import peft

    results["versions"]["peft"] = peft.__version__
    for method, grid in GRIDS.items():
        grid = grid[1:2] if args.quick else grid
        scored = []
        runs = {}
        for lr in grid:
            r = run(method, base, lr, 0, cfg, ft, val_batches)
            runs[lr] = r
            scored.append((lr, r["val"]))
            print(f"{method:26s} lr {lr:<7g} seed 0: val {r['val']:.4f} ({r.get('wall_s', 0):.1f}s)", flush=True)
        ok = [(v, lr) for lr, v in scored if v == v]
        best = min(ok)[1] if ok else grid[0]
        seeds = [runs[best]]
        for seed in range(1, args.seeds):
            r = run(method, base, best, seed, cfg, ft, val_batches)
            print(f"{method:26s} lr {best:<7g} seed {seed}: val {r['val']:.4f}", flush=True)
            seeds.append(r)
        results["methods"][method] = {"grid": scored, "best_lr": best, "seeds": seeds}
    fns = {m: step_fn(m, base, results["methods"][m]["best_lr"], cfg, ft) for m in GRIDS}
    results["timing"] = _timing.compare(fns, budget_s=6.0 if args.quick else 30.0, min_repeats=5)
    write(results, args.out, args.figures, args.quick)


if __name__ == "__main__":
    main()
