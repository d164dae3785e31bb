#!/usr/bin/env bash
# One command for a lent CUDA machine: check the environment, run the GPU tests and benchmark, train the
# shipped configs for longer than a CPU can, and pack the results into at most 8 files under $OUT.
#   bash training/gpu_run.sh                # on the GPU (OUT, CONFIGS, STEPS_FACTOR, TIME_LIMIT_PER_RUN, ...)
#   bash training/gpu_run.sh --cpu-smoke    # the same steps on a CPU, tiny smoke configs
#   bash training/gpu_run.sh --help         # every flag and its environment variable
# The steps live in training/gpu_run.py; PYTHON picks the interpreter (default python3, the GPU image's torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
if [ -z "$python" ]; then
  echo "gpu_run.sh: error: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
  exit 2
fi
exec "$python" "$here/gpu_run.py" "$@"
