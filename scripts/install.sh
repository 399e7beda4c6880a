# Sourced by the other scripts: create ./.venv and install embedq with the extras in $1.
python3 -m venv .venv
. .venv/bin/activate
# The CPU build of torch first: an unpinned torch would pull the CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[$1]"
