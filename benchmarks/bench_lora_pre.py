"""LoRA-Pre against Adam, GaLore and Adafactor at equal optimizer-state memory (slow study).

    python benchmarks/bench_lora_pre.py --quick     # seconds: a tiny model, a crash test, no result
    python benchmarks/bench_lora_pre.py             # the study (about an hour at one thread)
    python benchmarks/bench_lora_pre.py --plan "128:300:0,1,2;256:300:0,1,2" --select-widths 128,256

The character transformer of ``examples/char_transformer.py`` (its data, model, batches,
warm-up + cosine schedule to 10 %, betas (0.9, 0.99) unless ``--betas`` says otherwise: every
method gets the same betas; no weight decay), trained by this
script's own loop so that two optimizers can share one run. Only the transformer blocks'
linear weights (attention qkv/proj, MLP fc1/fc2: "block matrices") get memory-saving state;
embeddings, head, biases and LayerNorms keep dense Adam state in every method.

Methods (``METHODS``):

* ``Adam``: ``torch.optim.Adam`` on everything (the reference);
* ``LoRA-Pre (current g)``: ``LoRAPreAdam(rank=d/8)`` as it comes, stepping with the published
  ``beta1 (B A)_{t-1} + (1 - beta1) g_t`` (``current_gradient=True``, the default), its second
  moment's history at Adam's bias (``history_bias_correction=True``) and within Adam's own
  per-entry bound (``update_bound="adam"``), both defaults;
* ``LoRA-Pre (reconstruction)``: the same state, stepping with the factors' reconstruction
  (``current_gradient=False``), bounded alike;
* ``GaLore (gap 200 / scale 0.25)``: ``galore_torch.GaLoreAdamW`` 1.0 (``pip install
  galore-torch==1.0``), projection refreshed by an SVD every 200 steps, scale 0.25, as in its
  Llama-60M configuration; ``GaLore (gap 50 / scale 1)``: the same at our settings (the update
  at the learning rate of the dense parameters, as in Adam and LoRA-Pre, and a refresh every
  50 steps, because our runs are 300-1000 steps long, not 10k);
* ``Adafactor``: ``torch.optim.Adafactor`` (factored second moment, no first moment; its own
  relative step size) on the block matrices, the other parameters with Adam at Adam's best
  learning rate for that width.

Equal memory: LoRA-Pre holds ``2 (p + q) r`` numbers per ``p x q`` block matrix, GaLore
``r_g (min(p, q) + 2 max(p, q))`` (projector plus its two moments), so GaLore's rank is
``round(sum 2 (p + q) r / sum (min + 2 max))`` over the block matrices. Adafactor holds
``p + q`` per matrix: far less; its bytes are reported, not matched.

Protocol: the learning rate of every method is chosen on seed 0 at ``--select-steps`` from
its grid (``GRIDS``) at the first of the ``--select-widths``, and from the first width's best
rate times (1/2, 1, 2) (``AROUND``) at the further ones (widths not selected reuse the first
one's rates); while the best rate is at an edge of the grid, one more point beyond that edge is run (up to
``--max-extend`` = 3 points; every method alike). Then every method runs the ``--plan`` (width, run length, seeds) at its rate.
The default plan (what fitted about an hour on a shared two-core machine): width 128, 300
steps, seeds 0-2; width 256, 300 steps, seed 0, at the width-128 rates. The 1000-step runs
of the issue: ``--plan "128:1000:0,1,2"`` (about 3.5 min per run).
The schedule is cosine over the run's own length, so the 300-step and 1000-step results are
separate runs. Step times: the mean over each training run, and a separate interleaved
measurement (the methods take turns, a few steps each, in one process; the median of the
per-round ratios to Adam). Results: ``benchmarks/results/lora_pre.{json,md}``, plots
``docs/figures/lora_pre_*.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import char_transformer as ct  # noqa: E402
from _study import RunCache, loss_of, save_figure, select_lr, spread, write_results  # noqa: E402
from lowrank_manifolds.optim import LoRAPreAdam  # noqa: E402

METHODS = ["Adam", "LoRA-Pre (reconstruction)", "LoRA-Pre (current g)",
           "GaLore (gap 200 / scale 0.25)", "GaLore (gap 50 / scale 1)", "Adafactor"]
ADAM_GRID = (4.5e-3, 9e-3, 1.8e-2)
GRIDS = {m: ADAM_GRID for m in METHODS}
GRIDS["Adafactor"] = (1e-2, 3e-2, 1e-1)  # its lr caps the relative step min(lr, 1/sqrt(t))
DEFAULT_PLAN = "128:300:0,1,2;256:300:0"
GALORE = {"GaLore (gap 200 / scale 0.25)": (200, 0.25), "GaLore (gap 50 / scale 1)": (50, 1.0)}


AROUND = (0.5, 1.0, 2.0)  # the grid at a further selection width: the first width's best rate times these


BETAS = ct.BETAS  # every method's; --betas sets it


def run_key(method, lr, width, steps, seed, dense_lr):
    """A finished run's identity; only Adafactor's run depends on the dense parameters' rate.
    Runs at the example's betas keep the key they always had (the cache stays valid)."""
    key = (method, lr, width, steps, seed, dense_lr if method == "Adafactor" else None)
    return key if BETAS == ct.BETAS else key + ("betas", *BETAS)


def galore_available():
    try:
        import galore_torch  # noqa: F401
    except Exception:  # noqa: BLE001 - optional dependency (and its transformers import)
        return False
    return True


def split_params(model):
    blocks = ct.block_matrices(model)
    other = [p for p in model.parameters() if all(p is not q for q in blocks)]
    return blocks, other


def ranks(ex):
    """LoRA-Pre's rank (width/8) and the GaLore rank whose state matches it."""
    r = ex.width // 8
    shapes = [tuple(p.shape) for p in ct.block_matrices(ct.CharTransformer("dense", ex))]
    lorapre = sum(2 * (p + q) * r for p, q in shapes)
    galore = sum(min(p, q) + 2 * max(p, q) for p, q in shapes)
    return r, max(1, round(lorapre / galore))


def build(method, model, lr, ex, dense_lr):
    """The optimizers of one run (a list: Adafactor shares the run with Adam)."""
    blocks, other = split_params(model)
    r, r_g = ranks(ex)
    if method == "Adam":
        return [torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS)]
    if method.startswith("LoRA-Pre"):
        big = max(max(p.shape) for p in model.parameters())  # dense Adam state for `other`
        opt = LoRAPreAdam([{"params": blocks}, {"params": other, "rank": big}], lr=lr, betas=BETAS,
                          rank=r, current_gradient="current" in method)
        assert all(opt.is_factored(p) for p in blocks) and not any(opt.is_factored(p) for p in other)
        return [opt]
    if method in GALORE:
        from galore_torch import GaLoreAdamW

        gap, scale = GALORE[method]
        return [GaLoreAdamW([{"params": other},
                             {"params": blocks, "rank": r_g, "update_proj_gap": gap, "scale": scale,
                              "proj_type": "std"}],
                            lr=lr, betas=BETAS, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True)]
    if method == "Adafactor":
        return [torch.optim.Adafactor(blocks, lr=lr), torch.optim.Adam(other, lr=dense_lr, betas=BETAS)]
    raise ValueError(method)


def state_bytes(opts, only=None):
    """Bytes of all state tensors (step counters excluded; GaLore's projector included)."""
    ids = None if only is None else {id(p) for p in only}
    total = 0
    for opt in opts:
        for p, st in opt.state.items():
            if ids is not None and id(p) not in ids:
                continue
            for key, val in st.items():
                if key == "projector":
                    val = val.ortho_matrix
                vals = val if isinstance(val, (list, tuple)) else [val]
                for v in vals:
                    if key != "step" and isinstance(v, torch.Tensor):
                        total += v.numel() * v.element_size()
    return total


def setup(width, steps, seed, quick):
    argv = ["--width", str(width), "--steps", str(steps), "--seed", str(seed), "--part", "b"]
    if quick:  # the example's --smoke sizes
        argv += ["--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--batch", "4", "--context", "16",
                 "--heads", "2", "--layers", "1", "--train-kb", "32", "--val-kb", "8"]
    else:
        argv += ["--eval-every", "50"]
    return ct.parse(argv)


_DATA = {}


def data_for(ex):
    key = (ex.train_kb, ex.val_kb, ex.context, ex.batch, ex.eval_batches)
    if key not in _DATA:
        data, val, info = ct.load(ex)
        vgen = torch.Generator().manual_seed(1234)
        _DATA[key] = (data, [ct.batch(val, ex.context, ex.batch, vgen) for _ in range(ex.eval_batches)], info)
    return _DATA[key]


def train_run(method, lr, ex, dense_lr):
    data, val_batches, _ = data_for(ex)
    torch.manual_seed(ex.seed)
    model = ct.CharTransformer("dense", ex)
    opts = build(method, model, lr, ex, dense_lr)
    curve, per_step = ct.fit(model, opts, data, val_batches, ex)
    blocks, _ = split_params(model)
    return dict(method=method, lr=lr, width=ex.width, steps=ex.steps, seed=ex.seed, val=curve[-1][1], curve=curve,
                state=state_bytes(opts), block_state=state_bytes(opts, blocks), step_s=per_step)


def interleaved_times(ex, methods, dense_lr, rounds, per_round):
    """Median over rounds of (method's time for ``per_round`` steps) / (Adam's), the methods
    taking turns in one process; two warm-up steps each first (state initialised)."""
    data, _, _ = data_for(ex)
    runs = {}
    for m in methods:
        torch.manual_seed(0)
        model = ct.CharTransformer("dense", ex)
        runs[m] = (model, build(m, model, 1e-4, ex, dense_lr), torch.Generator().manual_seed(0))

    def steps(m, n):
        model, opts, gen = runs[m]
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = ct.batch(data, ex.context, ex.batch, gen)
            for o in opts:
                o.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            for o in opts:
                o.step()
        return time.perf_counter() - t0

    for m in methods:
        steps(m, 2)
    ratios = {m: [] for m in methods}
    for k in range(rounds):
        order = methods if k % 2 == 0 else methods[::-1]
        t = {m: steps(m, per_round) for m in order}
        for m in methods:
            ratios[m].append(t[m] / t["Adam"])
    return {m: dict(ratio=statistics.median(v), min=min(v), max=max(v)) for m, v in ratios.items()}


def summarise(runs, best, widths, step_counts, seeds, timing):
    """Per width and step count: val / Adam per seed (same seed), mean, min, max."""
    rows = []
    for w in widths:
        for s in step_counts:
            adam = {r["seed"]: r["val"] for r in runs if r["method"] == "Adam" and r["width"] == w
                    and r["steps"] == s and r["lr"] == best[w]["Adam"]}
            if not adam:
                continue
            for m in best[w]:
                mine = [r for r in runs if r["method"] == m and r["width"] == w and r["steps"] == s
                        and r["lr"] == best[w][m] and r["seed"] in adam]
                if not mine:
                    continue
                rel = [r["val"] / adam[r["seed"]] for r in mine]
                mean, lo, hi = spread(rel)
                a0 = next(r for r in runs if r["method"] == "Adam" and r["width"] == w and r["steps"] == s)
                rows.append(dict(width=w, steps=s, method=m, lr=best[w][m], seeds=sorted(r["seed"] for r in mine),
                                 val=spread([r["val"] for r in mine])[0], rel_mean=mean, rel_min=lo, rel_max=hi,
                                 state=mine[0]["state"], block_state=mine[0]["block_state"],
                                 state_rel=mine[0]["state"] / a0["state"],
                                 block_state_rel=mine[0]["block_state"] / a0["block_state"],
                                 run_time_rel=statistics.fmean(r["step_s"] for r in mine)
                                 / statistics.fmean(r["step_s"] for r in runs if r["method"] == "Adam"
                                                    and r["width"] == w and r["steps"] == s and r["seed"] in adam),
                                 time_rel=timing.get(w, {}).get(m, {}).get("ratio", float("nan"))))
    return rows


def markdown(rows, best, runs, widths, config, info):
    lines = ["# LoRA-Pre, GaLore, Adafactor and Adam at equal optimizer memory (char transformer)", "",
             f"Generated by `{' '.join(['python benchmarks/bench_lora_pre.py'] + ([config['argv']] if config['argv'] else []))}`. Text: standard library sources "
             f"{info}. {config['layers']} layers, widths {', '.join(map(str, widths))}, batch {config['batch']} x "
             f"{config['context']} bytes, warm-up {config['warmup']} then cosine to 10 % over each run, betas "
             f"{tuple(config['betas'])} (every method), no weight decay, one thread. LoRA-Pre rank d/8; GaLore rank matched to LoRA-Pre's "
             f"block-matrix state bytes ({config['ranks']}). Learning rate per method and width chosen on seed 0 at "
             f"{config['select_steps']} steps, then used for every seed and step count.", "",
             "val / Adam: the method's validation loss over Adam's on the same seed; mean [min, max] over the "
             "seeds listed. State: optimizer-state bytes (step counters excluded), whole model and block "
             "matrices only, and over Adam's. Time: step time over Adam's, the interleaved median "
             "(steady state, no GaLore refresh) and the ratio of mean step times over the training runs.", "",
             "| width | steps | method | lr | seeds | val loss (mean) | val / Adam mean [min, max] | state B (all) | "
             "state / Adam (all) | state B (blocks) | state / Adam (blocks) | time / Adam (interleaved) | "
             "time / Adam (runs) |",
             "|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['steps']} | {r['method']} | {r['lr']:g} | "
                     f"{','.join(map(str, r['seeds']))} | {r['val']:.3f} | {r['rel_mean']:.3f} "
                     f"[{r['rel_min']:.3f}, {r['rel_max']:.3f}] | {r['state']:,} | {r['state_rel']:.3f} | "
                     f"{r['block_state']:,} | {r['block_state_rel']:.3f} | {r['time_rel']:.2f} | "
                     f"{r['run_time_rel']:.2f} |")
    lines += ["", "Learning-rate grids (seed 0, validation loss at the selection length):", ""]
    for w in config["select_widths"]:
        for m in best[w]:
            grid = [r for r in runs if r["method"] == m and r["width"] == w and r["seed"] == 0
                    and r["steps"] == config["select_steps"]]
            cells = ", ".join(f"{r['lr']:g}: {r['val']:.3f}" for r in sorted(grid, key=lambda r: r["lr"]))
            lines.append(f"- width {w}, {m}: {cells} (best {best[w][m]:g})")
    return "\n".join(lines) + "\n"


def plot(rows, runs, best, widths, step_counts, figdir, prefix):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return []
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4), squeeze=False)
    for ax, w in zip(axes[0], widths):
        for k, s in enumerate(step_counts):
            sel = {r["method"]: r for r in rows if r["width"] == w and r["steps"] == s}
            xs = [i + (k - (len(step_counts) - 1) / 2) * 0.35 for i in range(len(methods)) if methods[i] in sel]
            ms = [m for m in methods if m in sel]
            mean = [sel[m]["rel_mean"] for m in ms]
            err = [[sel[m]["rel_mean"] - sel[m]["rel_min"] for m in ms], [sel[m]["rel_max"] - sel[m]["rel_mean"] for m in ms]]
            ax.bar(xs, [v - 1 for v in mean], bottom=1, width=0.35, yerr=err, capsize=3, label=f"{s} steps")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace(" (", "\n(").replace(" / ", "\n") for m in methods], fontsize=7)
        ax.set(title=f"width {w}, betas {BETAS}", ylabel="validation loss / Adam's (same seed)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    out.append(save_figure(fig, os.path.join(figdir, f"{prefix}_relative.png")))
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4), squeeze=False)
    for ax, w in zip(axes[0], widths):
        longest = max(r["steps"] for r in rows if r["width"] == w)
        for m in methods:
            sel = [r for r in runs if r["method"] == m and r["width"] == w and r["steps"] == longest
                   and r["seed"] == 0 and r["lr"] == best[w][m]]
            if sel:
                steps_, vals = zip(*sel[0]["curve"])
                ax.plot(steps_, vals, label=f"{m} (lr {best[w][m]:g})")
        ax.set(title=f"width {w}, {longest} steps, seed 0, betas {BETAS}", xlabel="step", ylabel="validation loss (nats / byte)")
        finals = [r["val"] for r in rows if r["width"] == w and r["steps"] == longest]
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out.append(save_figure(fig, os.path.join(figdir, f"{prefix}_curves.png")))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps, one lr: a crash test")
    p.add_argument("--plan", default=DEFAULT_PLAN,
                   help="'width:steps:seeds;...', the runs at the chosen rates (each its own schedule)")
    p.add_argument("--select-widths", default="128",
                   help="widths whose rates are chosen on their own grid (seed 0, --select-steps); the "
                        "other widths use the first one's")
    p.add_argument("--select-steps", type=int, default=300, help="run length of the lr selection (seed 0)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-extend", type=int, default=3, help="grid points added beyond an edge, at most")
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--timing-steps", type=int, default=2)
    p.add_argument("--cache", default=None, help="jsonl file of finished runs: read back, appended to (resume)")
    p.add_argument("--replot", action="store_true", help="redraw the plots from --out's lora_pre.json")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"))
    p.add_argument("--betas", default=",".join(map(str, ct.BETAS)),
                   help="'beta1,beta2' of every method; other than the example's, results and figures are "
                        "named lora_pre_b<beta2>")
    return p.parse_args(argv)


def main(argv=None):
    global BETAS
    args = parse_args(argv)
    BETAS = tuple(float(b) for b in args.betas.split(","))
    name = "lora_pre" if BETAS == ct.BETAS else f"lora_pre_b{BETAS[1]:g}"
    torch.set_num_threads(1)
    plan = [(int(w), int(s), [int(x) for x in seeds_.split(",")])
            for w, s, seeds_ in (item.split(":") for item in args.plan.split(";"))]
    if args.replot:
        with open(os.path.join(args.out, f"{name}.json")) as fh:
            res = json.load(fh)
        best = {int(w): b for w, b in res["best"].items()}
        ws = sorted(best)
        print(plot(res["rows"], res["runs"], best, ws, sorted({r["steps"] for r in res["rows"]}), args.figures,
                   name))
        return res["rows"]
    if args.quick:
        plan, args.select_steps, args.timing_rounds, args.timing_steps = [(32, 8, [0, 1]), (48, 8, [0])], 8, 2, 1
        args.select_widths = "32,48"  # the second one exercises the grid around the first one's best
    widths = sorted({w for w, _, _ in plan})
    step_counts = sorted({s for _, s, _ in plan})
    seeds = sorted({x for _, _, sd in plan for x in sd})
    select_widths = [int(x) for x in args.select_widths.split(",")]
    methods = [m for m in args.methods.split(",") if m in METHODS]
    if not galore_available():
        print("galore-torch is not installed (pip install galore-torch==1.0): GaLore rows skipped")
        methods = [m for m in methods if m not in GALORE]
    if "Adam" not in methods:
        methods.insert(0, "Adam")
    grids = {m: (GRIDS[m][1:2] if args.quick else GRIDS[m]) for m in methods}
    runs, best, timing, t_start = [], {}, {}, time.time()
    cache = RunCache(args.cache)

    def train(m, lr, ex, dense_lr):  # a finished run is read back from --cache
        key = run_key(m, lr, ex.width, ex.steps, ex.seed, dense_lr)
        return cache.run(key, lambda: dict(train_run(m, lr, ex, dense_lr), dense_lr=dense_lr))

    def record(res):
        runs.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "curve"}), f"t={time.time() - t_start:.0f}s",
              flush=True)

    for i, w in enumerate(select_widths):
        ex = setup(w, args.select_steps, 0, args.quick)
        best[w] = {}
        for m in methods:  # Adam first: Adafactor's dense parameters use Adam's best rate
            dense_lr = best[w].get("Adam", ADAM_GRID[1])
            first = best[select_widths[0]].get(m) if i else None
            lrs = grids[m] if first is None else [float(f"{first * f:.4g}") for f in AROUND]
            best[w][m], grid = select_lr(lambda lr: train(m, lr, ex, dense_lr), lrs,
                                         lambda r: loss_of(r, "val"), args.max_extend)
            for res in grid:
                record(res)
    for w in widths:
        best.setdefault(w, dict(best[select_widths[0]]))  # rates chosen at the first selection width
        ex = setup(w, args.select_steps, 0, args.quick)
        timing[w] = interleaved_times(ex, methods, best[w]["Adam"], args.timing_rounds, args.timing_steps)
        print(json.dumps({"width": w, "timing": timing[w]}), flush=True)
    for w, s, seeds_ in plan:
        for seed in seeds_:
            if s == args.select_steps and seed == 0 and w in select_widths:
                continue  # the selection runs
            for m in methods:
                record(train(m, best[w][m], setup(w, s, seed, args.quick), best[w]["Adam"]))
    rows = summarise(runs, best, widths, step_counts, seeds, timing)
    ex = setup(widths[0], args.select_steps, 0, args.quick)
    info = data_for(ex)[2]
    shown = sys.argv[1:] if argv is None else list(argv)
    if "--cache" in shown:  # where the cache lives is no part of the result
        i = shown.index("--cache")
        del shown[i:i + 2]
    config = dict(argv=" ".join(shown), betas=list(BETAS), layers=ex.layers, batch=ex.batch,
                  context=ex.context, warmup=ex.warmup, select_steps=args.select_steps, seeds=seeds,
                  plan=args.plan if not args.quick else "quick", select_widths=select_widths, grids={m: list(grids[m]) for m in methods}, around=list(AROUND),
                  ranks={w: dict(zip(("lorapre", "galore"), ranks(setup(w, 1, 0, args.quick)))) for w in widths},
                  machine=dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                               threads=torch.get_num_threads()),
                  wall_s=time.time() - t_start)
    md = markdown(rows, best, runs, widths, config, info)
    print(md)
    _, figures = write_results(os.path.join(args.out, name), args.figures, md,
                               dict(config=config, best=best, timing=timing, rows=rows, runs=runs), args.quick)
    print(plot(rows, runs, best, widths, step_counts, figures, name))
    return rows


if __name__ == "__main__":
    main()
