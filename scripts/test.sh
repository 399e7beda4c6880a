#!/usr/bin/env bash
# Install embedq with its test dependencies into ./.venv, then run the test-suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# The CPU build of torch first: an unpinned torch would pull the CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[worker,dev]"
python -m pytest "$@"
