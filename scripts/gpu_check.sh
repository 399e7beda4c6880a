#!/usr/bin/env bash
# Runs on the device machine (see scripts/device_kit.sh): installs the carried wheels
# beside that machine's torch, then measures bench/gpu_throughput.py into $OUT.
# Extra arguments go to the benchmark.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 bench/gpu_throughput.py --tokenizer-from .whl/tokenizer --json-out "${OUT:-.}/gpu.json" "$@" \
  2>&1 | grep -v -e '^Loading weights' -e '^Writing model' | tee "${OUT:-.}/gpu.log"
