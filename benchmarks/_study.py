"""What the training studies share: finished runs kept in a jsonl file (resume), the choice of
a learning rate on a grid that is extended past an edge, and the mean and range over seeds."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from _common import scratch_folder  # noqa: E402


class RunCache:
    """Finished runs keyed by a tuple; with a ``path`` they are read back from and appended to
    a jsonl file (one run per line, its key under ``"key"``), so an interrupted study resumes."""

    def __init__(self, path: Optional[str] = None):
        self.path, self.runs = path, {}
        if path and os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    res = json.loads(line)
                    self.runs[tuple(res["key"])] = res

    def run(self, key: tuple, train: Callable[[], dict]) -> dict:
        """The run of ``key``: read back, or ``train()`` and kept."""
        key = tuple(key)
        if key not in self.runs:
            self.runs[key] = dict(train(), key=list(key))
            if self.path:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(self.runs[key]) + "\n")
        return self.runs[key]


def loss_of(res: dict, field: str) -> float:
    """``res[field]`` as a loss to minimise; a non-finite value (a diverged run) is +inf."""
    x = res[field]
    return x if x is not None and math.isfinite(x) else math.inf


def select_lr(train: Callable[[float], dict], grid: Sequence[float], loss: Callable[[dict], float],
              max_extend: int) -> Tuple[float, List[dict]]:
    """``(best lr, the runs)``: ``train(lr)`` on every rate of ``grid`` (geometric, sorted);
    while the best rate is at an edge, one more point beyond that edge at the grid's ratio,
    ``max_extend`` times at most. Ties keep the smaller rate."""
    runs = {lr: train(lr) for lr in grid}
    for _ in range(max_extend):
        lrs = sorted(runs)
        best = min(lrs, key=lambda lr: loss(runs[lr]))
        if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
            break
        beyond = lrs[0] ** 2 / lrs[1] if best == lrs[0] else lrs[-1] ** 2 / lrs[-2]
        beyond = float(f"{beyond:.4g}")
        runs[beyond] = train(beyond)
    lrs = sorted(runs)
    return min(lrs, key=lambda lr: loss(runs[lr])), [runs[lr] for lr in lrs]


#: What a failing step of a diverging run raises (a failed SVD or retraction, a refused
#: non-finite gradient): a study records it as divergence.
STEP_FAILURES = (RuntimeError, ValueError, FloatingPointError, torch.linalg.LinAlgError)


def stepped(opt, loss) -> bool:
    """Backward and one step; False (a diverged run) if the loss is not finite or the step
    fails (a failing SVD or retraction, a refused non-finite gradient)."""
    if not torch.isfinite(loss):
        return False
    loss.backward()
    try:
        opt.step()
    except STEP_FAILURES:
        return False
    return True


def spread(xs: Sequence[float]) -> Tuple[float, float, float]:
    """Mean, min and max of the finite values (NaNs if there are none)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    return statistics.fmean(xs), min(xs), max(xs)


def fmt_spread(xs: Sequence[float], digits: int = 3) -> str:
    """``mean [min, max]`` of ``xs``, with the count of non-finite values if any."""
    mean, lo, hi = spread(xs)
    bad = sum(1 for x in xs if x is None or not math.isfinite(x))
    text = f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text + (f" ({bad} diverged)" if bad else "")


def save_figure(fig, path: str) -> str:
    """Lay out, write (110 dpi) and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(stem: str, figures: str, markdown: str, data: Dict, quick: bool) -> Tuple[str, str]:
    """``stem.md`` and ``stem.json`` (the folders created); a ``quick`` crash test writes into a
    temporary folder instead (removed at exit), for the figures too. Returns ``(stem, figures)`` as used."""
    if quick:
        figures = scratch_folder(f"{os.path.basename(stem)}_quick_")
        stem = os.path.join(figures, os.path.basename(stem))
        print(f"--quick: a crash test, not a result; files in {figures} (removed at exit)")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    os.makedirs(figures, exist_ok=True)
    with open(stem + ".md", "w") as fh:
        fh.write(markdown)
    with open(stem + ".json", "w") as fh:
        json.dump(data, fh, indent=1)
    return stem, figures
