"""Run example scripts in this process, one after the other, as ``python SCRIPT ARGS`` would.

    python tests/_run_examples.py RUNS_JSON

``RUNS_JSON`` is a JSON list of ``[script, [arg, ...]]`` pairs. Each run executes the
script as ``__main__`` (``runpy.run_path``) with ``sys.argv = [script, arg, ...]`` and
the script's folder first on ``sys.path``, its stdout and stderr captured; a
``SystemExit`` with a non-zero code or any other exception is that run's failure (exit
code 1, the traceback in its output). One process serves every run so that
``import torch`` is paid once. Prints one JSON line: a list of ``{"script", "argv",
"rc", "seconds", "output", "files"}`` (``files``: the files under the temporary folder after
the run).

A helper of ``tests/test_examples.py``; not a test module.
"""
import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import time
import traceback


def run_once(script, argv):
    buffer = io.StringIO()
    rc = 0
    start = time.perf_counter()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script] + list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:
                code = exc.code
                rc = 0 if code in (None, 0) else (code if isinstance(code, int) else 1)
                if rc:
                    print(f"SystemExit: {code}")
            except BaseException:  # noqa: BLE001 - report whatever the script raised
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return {"script": script, "argv": list(argv), "rc": rc, "seconds": time.perf_counter() - start,
            "output": buffer.getvalue(), "files": written()}


def written():
    """The files under the temporary folder now (relative paths): what the runs wrote there
    before their process exits and removes its temporary folders."""
    root = tempfile.gettempdir()
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def main():
    results = [run_once(script, argv) for script, argv in json.loads(sys.argv[1])]
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
