"""The examples' figures read: each example draws its figures at its smallest setting
(``--smoke``) and every figure is checked on its matplotlib objects.

Every example that saves a figure is run once, in this process (``runpy``, as
``python examples/NAME.py --smoke`` would, its temporary folders under pytest's), with
``Figure.savefig`` wrapped to keep each saved figure. On each panel (Axes):

* the x axis, the y axis and the panel have a label / title;
* every line, reference lines included, has a label, and a panel with more than one line
  has a legend that names each of them;
* no finite data point lies outside the view limits (a value <= 0 on a log axis counts as
  outside: it is not drawn);
* no two lines look the same, and no two differ in colour only (line style or marker must
  differ too, so that a curve lying on top of another stays visible);
* no legend covers a drawn point or segment of any panel's lines.

And the unit-circle figure's title counts the iterates it draws. Examples that need an
optional extra are skipped without it.
"""
import contextlib
import importlib.util
import itertools
import pathlib
import random
import re
import runpy
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib", reason="needs matplotlib: pip install '.[examples]'")
matplotlib.use("Agg")
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

# example -> (modules it needs, the extra that installs them, the figures its --smoke run saves)
CASES = {
    "digits.py": (("sklearn",), "examples", ("digits",)),
    "matrix_problem.py": ((), None, ("matrix_problem",)),
    "unit_circle.py": ((), None, ("unit_circle",)),
    "char_transformer.py": ((), None, ("char_transformer_a", "char_transformer_b")),
    "integrator_lab.py": ((), None, ("integrator_lab",)),
    "hf_finetune.py": (("transformers", "peft", "accelerate", "safetensors"), "hf", ("hf_finetune_ranks",)),
}
PACKAGE = {"sklearn": "scikit-learn"}


def test_every_example_with_a_figure_is_covered():
    drawing = {p.name for p in EXAMPLES.glob("*.py")
               if not p.name.startswith("_") and re.search(r"save_?fig", p.read_text())}
    assert drawing == set(CASES)


@contextlib.contextmanager
def _kept_rng():
    """The examples seed every generator; give the other tests theirs back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """``render(name)``: ``{figure name: Figure}`` of the example's ``--smoke`` run (run once)."""
    cache = {}

    def render(name):
        needs, extra, _ = CASES[name]
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{name} needs {', '.join(PACKAGE.get(m, m) for m in missing)}: pip install '.[{extra}]'")
        if name not in cache:
            figures = {}
            original = Figure.savefig

            def keep(fig, fname, *args, **kwargs):
                original(fig, fname, *args, **kwargs)
                figures[pathlib.Path(str(fname)).stem] = fig

            script = str(EXAMPLES / name)
            with pytest.MonkeyPatch.context() as mp, _kept_rng(), warnings.catch_warnings():
                mp.setattr(Figure, "savefig", keep)
                mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp(name[:-3])))
                mp.setattr(sys, "argv", [script, "--smoke"])
                mp.syspath_prepend(str(EXAMPLES))
                runpy.run_path(script, run_name="__main__")
            cache[name] = figures
        return cache[name]

    yield render
    import matplotlib.pyplot as plt

    plt.close("all")


def _values(ax, dim, values):
    """``values`` on ``ax``'s ``dim`` axis as the axis draws them: finite, and log10 on a log
    axis (non-positive values, which it cannot draw, become -inf)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if getattr(ax, f"get_{dim}scale")() == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), -np.inf)
    return v


def _limits(ax, dim):
    lo, hi = sorted(getattr(ax, f"get_{dim}lim")())
    if getattr(ax, f"get_{dim}scale")() == "log":
        lo, hi = np.log10(lo), np.log10(hi)
    return lo, hi


def _data_dims(ax, line):
    """Which of the line's coordinates are data coordinates (``axhline``: y only)."""
    transform = line.get_transform()
    if transform == ax.transData:
        return "xy"
    if transform == ax.get_yaxis_transform(which="grid"):
        return "y"
    if transform == ax.get_xaxis_transform(which="grid"):
        return "x"
    return ""


def _drawn_points(line, ax):
    """The line's points and sampled segments in display coordinates, within its panel."""
    xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) > 1 and line.get_linestyle() not in ("None", "", " "):
        t = np.linspace(0.0, 1.0, 9)[:, None, None]
        xy = (xy[:-1] + t * (xy[1:] - xy[:-1])).reshape(-1, 2)
    box = ax.get_window_extent()
    keep = (xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)
    return xy[keep]


def problems(name, fig):
    """What does not read in ``fig``, one line each."""
    out = []
    renderer = fig.canvas.get_renderer()
    figure_labels = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    for i, ax in enumerate(fig.axes):
        where = f"{name}, panel {i} ({ax.get_title()!r})"
        for what, text in (("x label", ax.get_xlabel()), ("y label", ax.get_ylabel()), ("title", ax.get_title())):
            if not text.strip():
                out.append(f"{where}: no {what}")
        lines = ax.get_lines()
        legend = ax.get_legend()
        labels = figure_labels | ({t.get_text() for t in legend.get_texts()} if legend else set())
        if len(lines) > 1 and legend is None and not fig.legends:
            out.append(f"{where}: {len(lines)} lines and no legend")
        for line in lines:
            label = line.get_label()
            if not label or label.startswith("_"):
                out.append(f"{where}: a line without a label ({label!r})")
            elif len(lines) > 1 and (legend or fig.legends) and label not in labels:
                out.append(f"{where}: line {label!r} is not in the legend")
            for dim, values in zip("xy", (line.get_xdata(orig=False), line.get_ydata(orig=False))):
                if dim not in _data_dims(ax, line):
                    continue
                v, (lo, hi) = _values(ax, dim, values), _limits(ax, dim)
                tol = 1e-9 * max(hi - lo, 1e-300)
                outside = v[(v < lo - tol) | (v > hi + tol)]
                if outside.size:
                    out.append(f"{where}: {outside.size} point(s) of {label!r} outside the {dim} limits "
                               f"{getattr(ax, f'get_{dim}lim')()} ({getattr(ax, f'get_{dim}scale')()} scale)")
        looks = [(line.get_label(), to_rgba(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines]
        for same in ("look the same", "differ in colour only"):
            pairs = [f"{la!r} and {lb!r} (line style {sa!r}, marker {ma!r})"
                     for (la, ca, sa, ma), (lb, cb, sb, mb) in itertools.combinations(looks, 2)
                     if (sa, ma) == (sb, mb) and (ca == cb) == (same == "look the same")]
            if pairs:
                out.append(f"{where}: {len(pairs)} pair(s) of lines {same}: " + "; ".join(pairs[:3])
                           + ("; ..." if len(pairs) > 3 else ""))
    for legend in [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends):
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for line in ax.get_lines():
                xy = _drawn_points(line, ax)
                inside = ((xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0) & (xy[:, 1] < box.y1))
                if inside.any():
                    out.append(f"{name}: a legend covers {line.get_label()!r} (panel {ax.get_title()!r})")
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_figures_read(name, rendered):
    figures = rendered(name)
    assert sorted(figures) == sorted(CASES[name][2]), "the figures saved"
    found = [p for fig_name, fig in sorted(figures.items()) for p in problems(fig_name, fig)]
    assert not found, f"{len(found)} problem(s):\n" + "\n".join(found)


def test_unit_circle_title_counts_the_iterates(rendered):
    ax = rendered("unit_circle.py")["unit_circle"].axes[0]
    # the trajectories are the lines with markers (the circle has none)
    drawn = max(len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() not in ("None", "", " ", None))
    numbers = {int(n) for n in re.findall(r"(?<![\d.])\d+(?![\d.])", ax.get_title())}
    assert drawn in numbers or drawn - 1 in numbers, (ax.get_title(), f"{drawn} iterates drawn (w0 included)")
