#!/usr/bin/env bash
# Type-check the embedq package with mypy (strict, settings from pyproject.toml).
#
# Why a temporary tree: pyproject.toml maps the one import namespace `embedq` onto
# top-level folders ([tool.setuptools.package-dir]: embedq.common -> common/,
# embedq.producer -> producer/, embedq.worker -> worker/, ...). mypy cannot follow
# that mapping (nor the editable install's import hook), so run straight on the repo
# every `from embedq.x import y` would be unresolved and cross-module types unchecked.
# This script builds embedq/ afresh under a temporary folder: symlinks to the files of
# the real embedq/ package, plus common, producer and worker linked in as subpackages
# (producer/gateway and worker/backends follow), runs mypy there, and removes it.
#
# mypy sees the files under the temporary tree (embedq/common/keys.py, ...); its output
# is rewritten to repo paths (common/keys.py, ...) so editors and readers can jump to them.
# Extra arguments go to mypy. Exits with mypy's status.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

tree=$(mktemp -d "${TMPDIR:-/tmp}/embedq-typecheck.XXXXXX")
trap 'rm -rf "$tree"' EXIT

mkdir "$tree/embedq"
for f in embedq/*.py embedq/py.typed; do
    ln -s "$repo/$f" "$tree/embedq/$(basename "$f")"
done
for sub in common producer worker; do
    ln -s "$repo/$sub" "$tree/embedq/$sub"
done

# The project's venv when there is one, else whichever python runs this (e.g. CI's).
python=${PYTHON:-python3}
[ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"

status=0
(
    cd "$tree"
    "$python" -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" "$@" embedq
) > "$tree/mypy.out" 2>&1 || status=$?

# embedq/common/x.py -> common/x.py (likewise producer, worker); embedq/*.py is already right.
sed -E 's#(^|[[:space:]"(])embedq/(common|producer|worker)/#\1\2/#g' "$tree/mypy.out"
exit "$status"
