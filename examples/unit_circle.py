"""The unit-circle thought experiment of Schotthöfer, Klein and Kusch (NeurIPS 2025 slides).

    min over ||w|| = 1 of L(w) = 1/2 ||[1, 0] - w||^2,   w0 = [0, 1],  w* = [1, 0],
    grad L(w0) = w0 - w* = [-1, 1].

The slides contrast three flows, w' = -grad L (leaves the circle), w' = -P_w grad L
(Riemannian, orthogonal projection) and w' = -P~_w grad L with a *non-orthogonal*
projection P~ (what a factorisation's chain rule gives), and their momentum versions
(DLRT momentum flow: W' = P_W V, V' + gamma V = -P_W grad L). Discretised with step
``lr`` and the retraction w -> w / ||w||:

* ``Riemannian``: d = P_w g (orthogonal), heavy ball with the buffer transported by
  projection; also ``geoopt.Sphere`` + ``RiemannianSGD``;
* ``Euclidean momentum``: the buffer accumulates the raw gradient, normal part included;
* ``oblique P~ (alpha)``: g projected onto the tangent line *along* d = R(alpha) w (not
  the normal unless alpha = 0): P~ g = P g + g_n cot-type leak. With alpha = 45 deg the
  direction d(w0) is parallel to grad L(w0) = [-1, 1]: P~ g(w0) = 0 although the
  Riemannian gradient is not zero -- a spurious stationary point at the start (stall);
  the oblique flow phi' = -(sin phi + k (1 - cos phi)) has the extra zero
  tan(phi/2) = -1/k;
* ``factorised w = Mp/||Mp||``: a parametrisation (like LoRA's W = A B^T) trained with
  Euclidean heavy ball *in parameter space* p; its induced map J J^T is symmetric, and on
  a 1-d manifold it is a positive multiple of P_w: a reparametrised Riemannian flow that
  cannot stall, only change speed (condition number kappa of M).

Prints the iterations to reach ||w - w*|| < 1e-6 and saves the trajectories to
``examples/output/unit_circle.png``.

    python examples/unit_circle.py [--steps 500] [--lr 0.1]
    python examples/unit_circle.py --smoke       # seconds: 20 steps
"""
import math

import geoopt
import torch

from _common import (curve, first_below, format_table, integer_ticks, legend, new_figure, parse_args, report,
                     save_figure, styles)

F64 = torch.float64
TARGET = torch.tensor([1.0, 0.0], dtype=F64)
W0 = torch.tensor([0.0, 1.0], dtype=F64)


def grad(w):
    return w - TARGET


def retract(w):
    return w / w.norm()


def tangent(w):
    return torch.stack([-w[1], w[0]])


def cross(x, y):
    return x[0] * y[1] - x[1] * y[0]


def oblique(w, g, angle):
    """Project g onto the tangent line of w along d = w rotated by ``angle`` (the normal
    for angle 0): g = a t + b d, keep a t."""
    c, s = math.cos(angle), math.sin(angle)
    d = torch.stack([c * w[0] - s * w[1], s * w[0] + c * w[1]])
    t = tangent(w)
    return (cross(g, d) / cross(t, d)) * t


def run_by_hand(kind, lr, beta, steps, angle=0.0):
    w, buf, path = W0.clone(), torch.zeros(2, dtype=F64), [W0.clone()]
    for _ in range(steps):
        g = grad(w)
        if kind == "euclidean":
            d = g
        elif kind == "oblique":
            d = oblique(w, g, angle)
            buf = oblique(w, buf, angle)  # the momentum transported by the same P~
        else:  # riemannian: orthogonal projection, transport by projection
            d = g - (w @ g) * w
            buf = buf - (w @ buf) * w
        buf = beta * buf + d
        w = retract(w - lr * buf)
        path.append(w.clone())
    return torch.stack(path)


def run_factorised(lr, beta, steps, kappa):
    """w = M p / ||M p||, M = diag(1, 1/kappa) rotated by 30 deg; heavy ball on p (the
    momentum lives in parameter space, as LoRA's on A, B)."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
    mat = rot @ torch.diag(torch.tensor([1.0, 1.0 / kappa], dtype=F64)) @ rot.T
    p = torch.linalg.solve(mat, W0).clone().requires_grad_(True)  # starts at w0
    opt = torch.optim.SGD([p], lr=lr, momentum=beta)
    path = [W0.clone()]
    for _ in range(steps):
        opt.zero_grad()
        w = retract(mat @ p)
        (0.5 * ((TARGET - w) ** 2).sum()).backward()
        opt.step()
        path.append(retract(mat @ p.detach()))
    return torch.stack(path)


def run_geoopt(lr, beta, steps):
    sphere = geoopt.Sphere()
    w = geoopt.ManifoldParameter(W0.clone(), manifold=sphere)
    opt = geoopt.optim.RiemannianSGD([w], lr=lr, momentum=beta)
    if beta:
        opt.state[w]["momentum_buffer"] = torch.zeros_like(w)  # first step = Riemannian gradient step
    path = [W0.clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((TARGET - w) ** 2).sum()
        loss.backward()
        opt.step()
        path.append(w.detach().clone())
    return torch.stack(path)


def methods(lr, beta, steps):
    deg = math.radians
    return {
        "Riemannian (by hand)": run_by_hand("riemannian", lr, beta, steps),
        "geoopt Sphere + RiemannianSGD": run_geoopt(lr, beta, steps),
        "Euclidean momentum + retraction": run_by_hand("euclidean", lr, beta, steps),
        "oblique P~, alpha = 30 deg": run_by_hand("oblique", lr, beta, steps, deg(30)),
        "oblique P~, alpha = -30 deg": run_by_hand("oblique", lr, beta, steps, deg(-30)),
        "oblique P~, alpha = 45 deg (d(w0) || grad)": run_by_hand("oblique", lr, beta, steps, deg(45)),
        "factorised Mp/|Mp|, kappa = 1": run_factorised(lr, beta, steps, 1.0),
        "factorised Mp/|Mp|, kappa = 10": run_factorised(lr, beta, steps, 10.0),
    }


def main():
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--steps", type=int, default=500), p.add_argument("--lr", type=float, default=0.1)),
    )
    steps = 20 if args.smoke else 150 if args.quick else args.steps  # the tables need >= 11
    lr = args.lr
    sections, runs_hb = [], None
    for beta, title in ((0.0, "gradient descent"), (0.9, "heavy ball, momentum 0.9")):
        runs = methods(lr, beta, steps)
        if beta:
            runs_hb = runs
        rows = []
        for name, path in runs.items():
            err = (path - TARGET).norm(dim=1).tolist()
            rows.append([name, first_below(err[1:], 1e-6), err[10], err[-1]])
        sections.append(
            f"Unit circle, {title} (lr = {lr}, {steps} steps)\n\n"
            + format_table(["method", "iterations to 1e-6", "error after 10", f"error after {steps}"], rows)
        )
    # step-size sweep of the heavy ball: where the oblique projection hurts
    sweep_lrs = [0.03, 0.1, 0.3, 0.6]
    sweep = {
        "Riemannian": lambda s: run_by_hand("riemannian", s, 0.9, steps),
        "oblique 30 deg": lambda s: run_by_hand("oblique", s, 0.9, steps, math.radians(30)),
        "oblique -30 deg": lambda s: run_by_hand("oblique", s, 0.9, steps, math.radians(-30)),
        "oblique 60 deg": lambda s: run_by_hand("oblique", s, 0.9, steps, math.radians(60)),
        "factorised kappa = 10": lambda s: run_factorised(s, 0.9, steps, 10.0),
    }
    rows = []
    for name, fn in sweep.items():
        row = [name]
        for s in sweep_lrs:
            err = (fn(s) - TARGET).norm(dim=1).tolist()
            hit = first_below(err[1:], 1e-6)
            row.append(hit if isinstance(hit, int) else f"not reached ({err[-1]:.2g})")
        rows.append(row)
    sections.append(
        f"Heavy ball (momentum 0.9), iterations to 1e-6 by step size ({steps} steps)\n\n"
        + format_table(["method"] + [f"lr = {s}" for s in sweep_lrs], rows)
    )
    report("unit_circle", "\n\n".join(sections))
    if not args.no_plot:
        plot(runs_hb, lr)


def plot(runs, lr, shown=60):
    """The first ``shown`` iterates of each run on the circle, and the error of every iterate."""
    fig, (ax, ax2) = new_figure(2, width=6.5)
    if fig is None:
        return
    look = styles(list(runs))
    th = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(th.cos(), th.sin(), color="0.8", lw=1, label="unit circle")
    for name, path in runs.items():
        curve(ax, path[:shown, 0], path[:shown, 1], look[name], every_point=True)
        curve(ax2, range(len(path)), (path - TARGET).norm(dim=1).clamp_min(1e-17), look[name])
    ax.plot([0], [1], "ko", label="start w0")
    ax.plot([1], [0], "k*", ms=12, label="minimiser w*")
    drawn = min(shown, max(len(path) for path in runs.values()))
    ax.set(aspect="equal", adjustable="datalim", xlabel="w[0]", ylabel="w[1]",
           title=f"heavy ball (lr {lr}, momentum 0.9): iterates 0 to {drawn - 1}")
    ax2.set(xlabel="iteration", ylabel="||w - w*||", yscale="log", title="convergence (heavy ball)")
    integer_ticks(ax2)
    legend(ax)
    legend(ax2)
    save_figure(fig, "unit_circle")


if __name__ == "__main__":
    main()
