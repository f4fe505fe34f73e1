#!/usr/bin/env bash
# The first GPU run (docs/benchmark.md, "GPU check"): random-initialised LLaVA-NeXT-8B- and
# Qwen2-VL-7B-shaped models in bf16 pruned with ATV, Wanda and SparseGPT at 50% and 2:4 on 128
# samples of ~3,000 tokens; wall time per phase, peak GPU and host memory, block-0 masks against
# the CPU fp32 path. No network needed. On an H200 the two model builds, the ATV and Wanda 50% runs
# and their checks took 356 s; SparseGPT on every block did not finish in 300 s, so give it --layers.
#
#   benchmarks/gpu_check.sh                       # on the GPU machine, figures also in $OUT (or ./gpu-check)
#   benchmarks/gpu_check.sh --device cpu --tiny   # the same script on tiny shapes (the test suite runs it)
#
# The pruning path needs torch, transformers, accelerate, safetensors, pydantic, pillow, tqdm and numpy.
# A machine without pydantic (the device image) takes its wheels from .whl/ (fetched beforehand,
# where PyPI is reachable, with: benchmarks/gpu_check.sh --fetch-wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # pydantic and what it needs (pinned together), for the device image's Python 3.12 on x86-64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
    "typing-extensions==4.16.0"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  ls "$WHEELS"
  exit 0
fi

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    echo "error: pydantic is not installed and $WHEELS/ holds no wheels: run benchmarks/gpu_check.sh --fetch-wheels where PyPI is reachable, and carry $WHEELS" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/atv-prune-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/atv-prune-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package from this checkout, without touching the machine's packages
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-gpu-check}" "$@"
