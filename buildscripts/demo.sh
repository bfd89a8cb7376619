#!/usr/bin/env bash
# The README's first command: set up, then serve a small demo model and call it end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash buildscripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python buildscripts/demo.py "$@"
