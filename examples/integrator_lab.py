"""Integrator lab: order, exactness, robustness, rank adaptivity and cost of the DLRA integrators.

Runs on CPU in well under a minute (float64, seeded), prints markdown tables and saves
``examples/output/integrator_lab.png`` (if matplotlib is installed) and
``examples/output/integrator_lab.md``.

    python examples/integrator_lab.py [--quick] [--threads N]
    python examples/integrator_lab.py --smoke [--seed S]   # seconds: tiny problems, output to a temp folder
"""
import argparse
import pathlib

import torch

from _common import curve, legend, new_figure, save_figure, scratch_folder, set_output, styles
from lowrank_manifolds.lab import (
    LeastSquares,
    MatrixODE,
    RankPath,
    cost_study,
    default_integrators,
    exactness_study,
    format_tables,
    order_study,
    rank_study,
    robustness_study,
    run_lab,
)


def smoke_lab(seed):
    """Every study of :func:`run_lab` on tiny problems (seeded by ``seed``): a crash test,
    the figures mean little."""
    integrators = default_integrators(3)
    size, hs = (20, 15, 3), (0.1, 0.05)
    return {
        "order_ode": order_study(integrators, MatrixODE(*size, seed=seed), T=0.2, hs=hs),
        "order_path": order_study(integrators, RankPath(*size, sigma_min=1e-6, seed=seed), T=0.2, hs=hs),
        "robustness": robustness_study(integrators, size=size, sigmas=(1e-2, 1e-8), steps=3),
        "exactness": exactness_study(integrators, size=size, steps=3),
        "rank": rank_study(integrators, tols=(1e-1, 1e-3), steps=4, problem=LeastSquares(20, 15, 4, 60, seed=seed)),
        "cost": cost_study(integrators, 100, 80, 4, 8, repeats=1),
    }


def plot(results):
    """Four panels: order, robustness, rank adaptivity, cost; one style per integrator in all."""
    fig, axes = new_figure(2, width=6.5, height=4.2, nrows=2)
    if fig is None:
        return
    look = styles(list(results["cost"]))
    ax = axes[0]
    for name, res in results["order_ode"].items():
        curve(ax, res["hs"], res["errors"], dict(look[name], label=f"{name} ({res['order']:.2f})"))
    ax.set(xlabel="step size h", ylabel="error at the final time", xscale="log", yscale="log",
           title="Y' = L1 Y + Y L2: error vs h (observed order)")
    legend(ax)
    ax = axes[1]
    for name, res in results["robustness"].items():
        curve(ax, res["sigmas"], res["errors"], look[name])
    ax.set(xlabel="smallest singular value", ylabel="error", xscale="log", yscale="log",
           title="A(t) with normal part: robustness")
    ax.invert_xaxis()
    legend(ax)
    ax = axes[2]
    for name, rows in results["rank"].items():
        curve(ax, [r["tol"] for r in rows], [r["rank"] for r in rows], look[name])
    ax.set(xlabel="relative tolerance", ylabel="final rank", xscale="log",
           title="least squares: rank vs tolerance")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.invert_xaxis()
    legend(ax)
    ax = axes[3]
    names = list(results["cost"])
    ax.barh(names, [1e3 * results["cost"][n] for n in names], color=[look[n]["color"] for n in names])
    ax.set(xlabel="ms per step (median)", ylabel="integrator", title="cost per step (factored rank-k field)")
    save_figure(fig, "integrator_lab")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (< 1 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny problems (seconds), output to a temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed; with --smoke also the problems'")
    parser.add_argument("--no-plot", action="store_true", help="do not save the plot")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small matrices)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    results = smoke_lab(args.seed) if args.smoke else run_lab(quick=args.quick)
    table = format_tables(results)
    print(table)

    if args.smoke:
        out = scratch_folder("lowrank_examples_smoke_")
    else:
        out = pathlib.Path(__file__).parent / "output"
        out.mkdir(exist_ok=True)
    (out / "integrator_lab.md").write_text(table + "\n")
    if args.no_plot:
        return
    set_output(str(out))
    plot(results)


if __name__ == "__main__":
    main()
