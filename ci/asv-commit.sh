#!/usr/bin/env bash
# asv results for one commit in the current environment (no per-commit virtualenv, which would
# download torch again): check it out, install it, run the lower-is-better and graphed tracks.
# Usage: ci/asv-commit.sh COMMIT MACHINE
# It publishes nothing: after the last commit, `asv publish && python ci/asv_offline.py` writes
# HTML that works without internet (asv 0.6 loads its JavaScript from CDNs otherwise).
set -euo pipefail
commit=$1
machine=$2
git checkout --quiet "$commit"
python -m pip install --quiet -e .
asv run --python=same --set-commit-hash "$commit" --machine "$machine" --show-stderr
