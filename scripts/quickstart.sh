#!/usr/bin/env bash
# Install embedq into ./.venv and run the retrieve step of a RAG system on the embedded
# defaults: a private Redis, one worker with the bundled all-MiniLM-L6-v2, the SDK.
# Extra arguments are the question (e.g. `bash scripts/quickstart.sh "what is a stream?"`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh all
python examples/rag_quickstart.py "$@"
