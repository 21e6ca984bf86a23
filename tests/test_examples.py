"""Smoke test of every script in ``examples/``: its ``--smoke`` mode must run to the end.

Each example is run with ``--smoke --seed S --threads T`` for seeds 0, 1, 2 at 1 and 2
torch threads (six runs). Only the first run of an example saves plots (``--no-plot``
for the others, where the script has it). All runs share one subprocess, started once
for the module (``tests/_run_examples.py`` runs each script as ``__main__`` with that
command line, as ``python examples/NAME.py ...`` would), so that ``import torch`` is paid
once rather than per run (about 50 runs); it gets ``OMP_NUM_THREADS=2`` and ``TMPDIR`` set
to a temporary folder. A run passes when the script exits normally (exit code 0),
prints the line that shows it got to its last table, prints no ``nan`` and saves its
tables and plots only under the temporary folder (``--smoke`` never writes to
``examples/output``).

``digits.py`` needs scikit-learn (the ``examples`` extra) and ``hf_finetune.py`` the ``hf``
extra; each is skipped without them;
matplotlib and tqdm are optional for every example (no plot, plain progress lines).
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RUNNER = pathlib.Path(__file__).resolve().parent / "_run_examples.py"
SEEDS = (0, 1, 2)
THREADS = (1, 2)
TIMEOUT_S = 300  # for all runs together; each takes about a second after the imports
FULL_GRID = [(s, t) for t in THREADS for s in SEEDS]

# example -> (modules it needs, a line every complete run prints, writes a table via
# _common.report, has --no-plot, the (seed, threads) runs)
CASES = {
    "quickstart.py": ((), "the point is still on the manifold: True", False, False, FULL_GRID),
    "digits.py": (("sklearn",), "| DLRT augmented BUG |", True, True, FULL_GRID),
    "char_transformer.py": ((), "| LoRA-Pre r=d/8 |", True, True, FULL_GRID),
    "matrix_problem.py": ((), "| DLRT parallel BUG |", True, True, FULL_GRID),
    "unit_circle.py": ((), "| factorised kappa = 10 |", True, True, FULL_GRID),
    "lowrank_layers.py": ((), "merged adapters:", False, False, FULL_GRID),
    "integrator_lab.py": ((), "| abc-PSI |", False, True, FULL_GRID),
    "check_my_integrator.py": ((), "## BUG: passes", False, False, FULL_GRID),
    "hf_finetune.py": (("transformers", "peft", "accelerate", "safetensors"),
                       "merged model reloaded by from_pretrained", True, True, FULL_GRID),
}
NAN = re.compile(r"\bnan\b", re.IGNORECASE)
SAVED = re.compile(r"saved to (\S+)")


def test_every_example_is_covered():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(CASES)


def available(name):
    """True when every module ``name`` needs can be imported here."""
    return all(importlib.util.find_spec(module) is not None for module in CASES[name][0])


def arguments(name):
    _, _, _, has_no_plot, grid = CASES[name]
    return [["--smoke", "--seed", str(s), "--threads", str(t)] + (["--no-plot"] if has_no_plot and i else [])
            for i, (s, t) in enumerate(grid)]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """``(results by example, the TMPDIR)``: every available example's runs, in one subprocess."""
    tmp = tmp_path_factory.mktemp("examples")
    runs = [[str(EXAMPLES / name), argv] for name in sorted(CASES) if available(name) for argv in arguments(name)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(THREADS)), MKL_NUM_THREADS=str(max(THREADS)),
               TMPDIR=str(tmp), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(runs)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_name = {}
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        by_name.setdefault(pathlib.Path(r["script"]).name, []).append(r)
    return by_name, tmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_smoke(name, smoke_runs):
    needs, last_line, writes_report, _, _ = CASES[name]
    for module in needs:
        extra = "hf" if module in ("transformers", "peft", "accelerate") else "examples"
        pytest.importorskip(module, reason=f"{name} needs {module} (pip install '.[{extra}]')")
    by_name, tmp_path = smoke_runs
    results = by_name[name]
    assert [r["argv"] for r in results] == arguments(name)
    for r in results:
        where = f"{name} {' '.join(r['argv'])}"
        out = r["output"]
        assert r["rc"] == 0, f"{where} exited with {r['rc']}:\n{out[-4000:]}"
        assert last_line in out, f"{where} did not print {last_line!r}:\n{out[-4000:]}"
        bad = [line for line in out.splitlines() if NAN.search(line)]
        assert not bad, f"{where} printed nan:\n" + "\n".join(bad[:10])
        for path in SAVED.findall(out):
            assert pathlib.Path(path).resolve().is_relative_to(tmp_path.resolve()), f"{where} wrote {path}"
    if writes_report:
        stem = name[: -len(".py")]
        tables = {f for r in results for f in r["files"] if re.fullmatch(rf"[^/]+/{stem}[^/]*\.md", f)}
        assert len(tables) >= len(results), "the tables were not written to TMPDIR"
    # torch.compile's cache (torchinductor_USER) is torch's own, kept across runs by design
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"temporary files left behind after the runs: {left}"
    print(f"{name}: " + ", ".join(f"{' '.join(r['argv'][1:])}: {r['seconds']:.1f}s" for r in results))


def test_progress_prints_plain_lines_when_not_on_a_terminal(capsys, monkeypatch):
    """In a log or a pipe (stderr not a terminal) the examples' progress is about 10 plain
    lines, not a tqdm bar's carriage-return redraws."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(_common.progress(range(50), desc="epoch")) == list(range(50))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0].strip().startswith("epoch 0/50"), lines
