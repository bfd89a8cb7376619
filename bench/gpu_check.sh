#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py): run from the repository root on a
# machine with one NVIDIA GPU, torch and transformers, no network. Extra arguments go to
# gpu_check.py (e.g. --budget-s 300, --skip-anchor); a first argument bench/<name>.py runs
# that script instead, in the same environment (e.g. bench/sampler_cost.py --nvml). Wheels
# for what the image lacks travel in .whl/ (bench/fetch_wheels.sh); the repo's packages are
# used from source.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${LLEM_SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llem-site .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/llem-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/client/src:$PWD/server/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PY' || exit 1
import importlib, sys
bad = []
for m in ["torch", "transformers", "grpc", "google.protobuf", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
          "grpc_status.rpc_status", "structlog", "pynvml", "prometheus_client", "psutil", "yaml", "llem.v1.llem_pb2_grpc",
          "llem_client", "llem_server.app"]:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m}: {e!r}")
import grpc, google.protobuf, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "grpcio", grpc.__version__, "protobuf", google.protobuf.__version__, "cuda", torch.cuda.is_available(), flush=True)
if bad:
    print("gpu_check.sh: missing imports:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
PY
script=bench/gpu_check.py
case "${1:-}" in bench/*.py) script=$1; shift ;; esac
exec "$PY" "$script" "$@"
