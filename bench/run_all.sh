#!/usr/bin/env bash
# The CPU benchmark set (tiny demo model; ~15 min on 2 cores, each script waiting up to 90 s
# for a quiet machine first). Results overwrite bench/results/<name>-cpu.{md,json}, the
# committed ones. Extra arguments go to every script (e.g. --quiet-wait 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for s in roundtrip throughput concurrency metering sampler_cost sweep; do
  echo "=== bench/$s.py"
  "$PY" "bench/$s.py" "$@"
done
"$PY" bench/phase_quality.py  # deterministic (a fake clock): takes no extra arguments
"$PY" bench/gpu_check.py --smoke
