#!/usr/bin/env bash
# Install embedq with its test dependencies into ./.venv, then run the test-suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh dev
python -m pytest "$@"
