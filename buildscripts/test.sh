#!/usr/bin/env bash
# The test command: set up, lint the contract with buf, run every test. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash buildscripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== buf lint proto"
command -v npm >/dev/null || { echo "npm is needed for buf lint (npm package @bufbuild/buf) and the Node driver example" >&2; exit 1; }
[ -x .tools/node_modules/.bin/buf ] || npm install --silent --no-save --prefix .tools @bufbuild/buf@1.75.0
.tools/node_modules/.bin/buf lint proto

echo "== Node driver example deps (tests/test_node_driver.py)"
[ -d examples/node/node_modules ] || npm ci --silent --prefix examples/node

echo "== stubs up to date"
python buildscripts/gen_stubs.py --check

echo "== pytest"
python -m pytest -q "$@"
