"""Every Python block of README.md and docs/*.md runs.

The blocks of one file run in order in one fresh interpreter (a later block may use what an
earlier one defined), in a temporary working directory. A block may be preceded by an HTML
comment, invisible on the rendered page, that sets it up or marks it::

    <!-- setup
    some_loss = lambda U, S, V: S.sum()
    -->

``<!-- teardown ... -->`` right after a block runs after it; ``<!-- slow -->`` keeps a long
block out of the default run (``pytest -m slow`` runs every block). A file passes when its
script exits normally.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>setup|slow)\b(?P<setup>.*?)-->\s*\n)?"
    r"^```python\n(?P<code>.*?)^```\n"
    r"(?:\s*<!--\s*teardown\b(?P<teardown>.*?)-->)?",
    re.S | re.M,
)
# what a file's blocks import beyond the test extra (skipped, naming the extra, without them)
NEEDS = {"docs/huggingface.md": ("transformers", "peft", "accelerate", "safetensors")}
TIMEOUT_S = 240


def blocks(path: str):
    """``(line, setup, code, teardown, slow)`` of each Python block of ``path``."""
    text = (ROOT / path).read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text[: m.start("code")].count("\n") + 1
        setup = textwrap.dedent(m.group("setup") or "") if m.group("mark") == "setup" else ""
        out.append((line, setup, m.group("code"), textwrap.dedent(m.group("teardown") or ""),
                    m.group("mark") == "slow"))
    return out


def script(path: str, slow: bool) -> str:
    # from a fixed seed: a block on random data behaves the same in every run (a block that
    # fails on some draws is a bug of the block, as the completion example's rate at the edge
    # of stability was)
    parts = ["import warnings", "warnings.filterwarnings('ignore', message='.*torch.jit.script.*')",
             "import torch", "torch.manual_seed(0)"]
    for line, setup, code, teardown, is_slow in blocks(path):
        if is_slow and not slow:
            continue
        parts += [f"# ---- {path}:{line}", setup, code, teardown]
    return "\n".join(parts)


def test_every_block_is_found():
    """The collector sees every fenced Python block (none lost to a malformed comment)."""
    for path in FILES:
        assert len(blocks(path)) == (ROOT / path).read_text().count("```python\n"), path


def _run(path, tmp_path, slow):
    for mod in NEEDS.get(path, ()):
        pytest.importorskip(mod, reason=f"{path} needs {mod}: pip install '.[hf]'")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script(path, slow)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{path}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("path", [f for f in FILES if blocks(f)])
def test_docs_blocks_run(path, tmp_path):
    _run(path, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", [f for f in FILES if any(b[-1] for b in blocks(f))])
def test_docs_blocks_run_with_the_slow_ones(path, tmp_path):
    _run(path, tmp_path, slow=True)
