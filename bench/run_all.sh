#!/usr/bin/env bash
# The CPU benchmark set (tiny demo model; each script < 2 min on 2 cores). Results land in
# bench/results/<name>-cpu.{md,json}. Extra arguments go to every script (e.g. --quiet-wait 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for s in roundtrip throughput concurrency metering sampler_cost sweep; do
  echo "=== bench/$s.py"
  "$PY" "bench/$s.py" "$@"
done
"$PY" bench/phase_quality.py  # deterministic (a fake clock): takes no extra arguments
"$PY" bench/gpu_check.py --smoke
