"""Helpers shared by the examples: arguments, seeding, progress, tables, plots.

Not part of the library; imported by the example scripts (run them from the repository
root or from ``examples/``).

The plots follow one convention (:func:`styles`, :func:`curve`, :func:`legend`): every curve
has its own colour, line style and hollow marker, the same in every panel of a figure, so
that curves lying on top of each other stay apart; every line, reference lines included,
has a label; legends sit outside the axes, where they cover no data; the axis limits come
from the data.
"""
from __future__ import annotations

import argparse
import atexit
import pathlib
import random
import shutil
import sys
import tempfile
import time
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

OUTPUT = pathlib.Path(__file__).resolve().parent / "output"


def parse_args(description: str, add_arguments=None, argv=None) -> argparse.Namespace:
    """Common flags (``--quick``, ``--smoke``, ``--seed``, ``--threads``, ``--no-plot``,
    ``--output``) plus the script's own (``add_arguments(parser)``); seeds everything,
    sets the threads and the output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short configuration (< 1 min)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and a few steps (seconds; a crash test, not a result); tables and "
        "plots go to a temporary folder, removed at exit, unless --output is given",
    )
    parser.add_argument("--output", default=None, help="folder for tables and plots (default examples/output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-plot", action="store_true", help="do not save the plot")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    set_output(args.output, args.smoke)
    return args


def set_output(folder: Optional[str] = None, smoke: bool = False) -> pathlib.Path:
    """Where :func:`report` and :func:`save_figure` write: ``folder``, else a fresh
    temporary folder in a smoke run, else ``examples/output``."""
    global OUTPUT
    if folder is not None:
        OUTPUT = pathlib.Path(folder)
    elif smoke:
        OUTPUT = scratch_folder("lowrank_examples_smoke_")
    return OUTPUT


def scratch_folder(prefix: str) -> pathlib.Path:
    """A fresh temporary folder, removed with its files when the process exits: what a smoke
    or quick run writes is a crash test's output, not a result to keep."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable: Iterable, desc: str = "", total: Optional[int] = None, every: int = 0):
    """A ``tqdm`` bar on a terminal (where tqdm is installed); else, in a log or a pipe, the
    iterable with a plain line every ``every`` items (default: about 10 lines)."""
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, desc=desc, total=total, leave=False)
        except ImportError:  # pragma: no cover - depends on the environment
            pass
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)

    def gen():
        step = every or max(1, (total or 10) // 10)
        start = time.perf_counter()
        for i, item in enumerate(iterable):
            if i % step == 0:
                print(f"  {desc} {i}/{total or '?'} ({time.perf_counter() - start:.1f}s)", flush=True)
            yield item

    return gen()


def format_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    """A markdown table; floats printed compactly."""

    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "nan"
            if v == 0 or 1e-3 <= abs(v) < 1e4:
                return f"{v:.4g}"
            return f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, text: str) -> pathlib.Path:
    """Print ``text`` and save it as ``examples/output/<name>.md``."""
    print(text)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.md"
    path.write_text(text + "\n")
    return path


def new_figure(ncols: int = 1, width: float = 5.5, height: float = 4.2, nrows: int = 1):
    """``(fig, axes)``, ``nrows`` x ``ncols`` panels of ``width`` x ``height`` inches (``axes`` row
    by row), with the non-interactive Agg backend; ``(None, None)`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no plot")
        return None, None
    # constrained layout makes room for the legends outside the axes
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             constrained_layout=True)
    return fig, list(axes.ravel())


def save_figure(fig, name: str) -> Optional[pathlib.Path]:
    """Write ``fig`` as ``<OUTPUT>/<name>.png`` (legends outside the axes included)."""
    if fig is None:
        return None
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    if not fig.get_constrained_layout():
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot saved to {path}")
    return path


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")
# reference lines (targets, bounds): draw them with this and a label
REFERENCE = dict(color="0.3", linewidth=0.8, linestyle=":")


def styles(names: Sequence[str]) -> dict:
    """``{name: style}``, a colour, a line style and a marker per name (distinct for up to 20
    names; the markers shrink from name to name, so that coinciding points show as nested
    shapes), to pass to :func:`curve` in every panel of a figure."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        name: dict(label=name, color=colors[i % len(colors)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                   marker=MARKERS[i % len(MARKERS)], markersize=7 - 0.5 * (i % 7), stagger=(i % 7) / 7)
        for i, name in enumerate(names)
    }


def curve(ax, x, y, style: dict, every_point: bool = False):
    """Plot ``y`` against ``x`` in ``style`` (from :func:`styles`) with hollow markers: on every
    point of a short curve (or with ``every_point``), else on about 10 points, staggered by the
    style (so that curves lying on top of each other each show their markers)."""
    kw = dict(style, markerfacecolor="none", linewidth=1.2)
    stagger = kw.pop("stagger", 0.0)
    if every_point:
        kw["markersize"] = 0.5 * kw.get("markersize", 6)
    elif len(y) > 30:
        every = len(y) // 10
        kw["markevery"] = (int(stagger * every), every)
    return ax.plot(x, y, **kw)[0]


def log_scale(ax, axis: str = "y") -> None:
    """A log scale on ``axis`` labelled with plain numbers (2, 3, 4, 6, 20, ...), readable over
    a decade or two."""
    from matplotlib.ticker import LogFormatter

    getattr(ax, f"set_{axis}scale")("log")
    which = getattr(ax, f"{axis}axis")
    which.set_major_formatter(LogFormatter(labelOnlyBase=False))
    which.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def integer_ticks(*axes) -> None:
    """Whole-number ticks on the x axes (epochs, iterations) of a short run."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend(ax, **kw):
    """The panel's legend, outside the axes on the right: it covers no data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                     fontsize=7, **kw)


def first_below(values: Sequence[float], target: float):
    """Index (1-based iteration count) of the first value below ``target``, or
    ``"not reached"``."""
    for i, v in enumerate(values):
        if v < target:
            return i + 1
    return "not reached"
