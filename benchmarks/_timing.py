"""Timing, thread and memory helpers shared by the benchmark scripts (private).

Why this exists: the benchmarks run on small shared machines where other jobs come
and go. The helpers therefore

* pin BLAS/OpenMP to a fixed thread count *before* numpy or torch is imported
  (:func:`set_threads_env` must run first; :func:`apply_threads` finishes the job
  for torch once it is imported);
* time competing implementations **interleaved** (A, B, A, B, ... with the order
  alternating each round), after a warm-up, with the garbage collector off, and
  report medians plus the median of the *paired* per-round ratios, which cancels
  most of the slow drift of the machine's load;
* record ``os.getloadavg()`` next to every result so noisy ones can be spotted.

Only the standard library is imported at module level.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def set_threads_env(threads: int) -> None:
    """Set the BLAS/OpenMP thread variables; call before importing numpy or torch."""
    for name in ("numpy", "torch", "scipy"):
        if name in sys.modules:
            raise RuntimeError(f"set_threads_env must run before {name} is imported")
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)


def apply_threads(threads: int) -> None:
    """Tell torch (already imported) to use ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process
        pass


def loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def make_sync(device: str) -> Callable[[], None]:
    """A function that waits for queued device work (a no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def use_device(device: str) -> Callable[[], None]:
    """Make ``device`` torch's default device (every tensor a script creates lands there; left
    alone for the CPU, since the default device is a mode that every torch call passes
    through) and return its :func:`make_sync`."""
    if device != "cpu":
        import torch

        torch.set_default_device(device)
    return make_sync(device)


def _time_once(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) / number


def compare(
    fns: Dict[str, Callable[[], object]],
    *,
    budget_s: float = 2.0,
    min_repeats: int = 5,
    max_repeats: int = 51,
    target_sample_s: float = 2e-3,
    warmup: int = 2,
    sync: Optional[Callable[[], None]] = None,
    syncs: Optional[Dict[str, Callable[[], None]]] = None,
) -> Dict[str, object]:
    """Time the callables in ``fns`` interleaved; return medians and paired ratios.

    Each sample runs a callable ``number`` times (calibrated during warm-up so that
    one sample lasts at least ``target_sample_s``); rounds go through all callables,
    alternating their order, until ``budget_s`` is spent (within
    ``[min_repeats, max_repeats]`` rounds).

    Returns ``{"median_s": {name: s}, "min_s": {...}, "iqr_s": {...}, "number": {...},
    "repeats": k, "paired_ratio": {name: median over rounds of t[name] / t[first]},
    "loadavg_before": [...], "loadavg_after": [...]}``. The first name is the
    reference of ``paired_ratio``.
    """
    names = list(fns)
    syncs = dict(syncs or {})
    for nm in names:
        syncs.setdefault(nm, sync or (lambda: None))
    load_before = loadavg()
    # warm-up and calibration
    number: Dict[str, int] = {}
    per_call: Dict[str, float] = {}
    for nm in names:
        t = 0.0
        for _ in range(max(1, warmup)):
            t = _time_once(fns[nm], 1, syncs[nm])
        number[nm] = max(1, min(1000, int(target_sample_s / max(t, 1e-9))))
        per_call[nm] = t
    round_s = sum(per_call[nm] * number[nm] for nm in names)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(round_s, 1e-9))))
    samples: Dict[str, List[float]] = {nm: [] for nm in names}
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for k in range(repeats):
            order = names if k % 2 == 0 else names[::-1]
            for nm in order:
                samples[nm].append(_time_once(fns[nm], number[nm], syncs[nm]))
    finally:
        if gc_was:
            gc.enable()
    ref = names[0]
    out = {
        "median_s": {nm: statistics.median(samples[nm]) for nm in names},
        "min_s": {nm: min(samples[nm]) for nm in names},
        "iqr_s": {nm: _iqr(samples[nm]) for nm in names},
        "number": number,
        "repeats": repeats,
        "paired_ratio": {
            nm: statistics.median(a / b for a, b in zip(samples[nm], samples[ref])) for nm in names
        },
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    return out


def _iqr(xs: List[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def machine_info(threads: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """Platform, CPU count, library versions, thread settings and load."""
    info: Dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "thread_env": {v: os.environ.get(v) for v in _THREAD_VARS},
        "loadavg": loadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "numpy", "scipy", "geoopt", "pymanopt"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    info["versions"] = versions
    if "torch" in sys.modules:
        import torch

        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    if extra:
        info.update(extra)
    return info


# ------------------------------------------------------------------ memory (Linux)
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS.

    Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) does this; returns
    False where it is not available, and callers then fall back to the growth
    of ``resource.getrusage().ru_maxrss`` (a lower bound when the earlier peak
    was higher).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> Optional[int]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_ms(s: Optional[float]) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def write_json(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
    os.replace(tmp, path)


def peak_growth(fn: Callable[[], object], device: str = "cpu") -> Dict[str, object]:
    """Peak working memory of one call of ``fn`` (run it once before, as a warm-up).

    CPU: growth of the process's peak RSS (VmHWM reset through ``clear_refs``; else
    the ``ru_maxrss`` growth, a lower bound). Meaningful in a fresh process started by
    :func:`run_json_child` (fixed glibc mmap threshold). CUDA: growth of
    ``torch.cuda.max_memory_allocated`` over the memory allocated before the call.
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_growth_bytes": max(0, torch.cuda.max_memory_allocated() - base),
                "method": "torch.cuda.max_memory_allocated growth"}
    exact = reset_peak_rss()
    base = current_rss_bytes() if exact else peak_rss_bytes()
    fn()
    return {"peak_growth_bytes": max(0, peak_rss_bytes() - base),
            "method": "VmHWM reset via clear_refs" if exact else "ru_maxrss growth (lower bound)"}


def run_json_child(cmd: List[str]) -> Dict[str, object]:
    """Run ``cmd`` (a benchmark script in a child mode) and parse the JSON object it
    prints last. The child gets ``MALLOC_MMAP_THRESHOLD_=65536`` so that every block
    >= 64 KiB is a fresh mmap, unmapped on free (see ``benchmarks/README.md``)."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON from child: " + proc.stdout[-500:] + proc.stderr[-1500:]}


def largest_tensor_probe():
    """A ``TorchDispatchMode`` recording the largest tensor any aten op returns
    (``.largest_numel``, ``.largest_bytes``, ``.largest_op``, ``.ops`` = op count).
    Autograd's backward ops run under it too (the mode is thread-local state that
    the autograd engine carries over)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest_numel = 0
            self.largest_bytes = 0
            self.largest_op = ""
            self.largest_shape = ()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    if nbytes > self.largest_bytes:
                        self.largest_bytes = nbytes
                        self.largest_numel = t.numel()
                        self.largest_op = str(func)
                        self.largest_shape = tuple(t.shape)
            return out

    return LargestTensor()
