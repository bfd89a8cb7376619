#!/usr/bin/env bash
# Create .venv and install the client, the server and the test tools into it.
#
# torch comes first and alone, pinned, so that pip never swaps it for another build:
#   - here and in CI, torch==2.13.0 resolves to the CPU wheel on local disk (fast);
#   - on a GPU machine with internet, the same pin pulls PyPI's CUDA build;
#   - TORCH_SPEC / TORCH_INDEX_URL override both (e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128).
# An already-installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
    pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e client -e "server[test]"
