#!/usr/bin/env bash
# The checks that need a GPU, as one run of about 5 minutes: the CUDA-marked tests (the step's
# kernel and host-read counts among them), then the batched-step benchmarks on the device, with
# the CUDA activities of one opt.step() from torch.profiler. Results go to benchmarks/results/
# (*_cuda.{json,md}); put what they show in docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a CUDA device
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # the same plumbing on the CPU, quick sizes, no results
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs
    QUICK=()
else
    "$PY" -m pytest -q -p no:cacheprovider tests/test_step_cost.py
    QUICK=(--quick)
fi
"$PY" benchmarks/bench_grouped_step.py --device "$DEVICE" --budget 2 "${QUICK[@]}"
"$PY" benchmarks/bench_stack.py --device "$DEVICE" --budget 15 "${QUICK[@]}"
