#!/usr/bin/env bash
# CPU CI: the tests, the benchmark smoke matrix and asv's import check, on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
pytest
pytest benchmarks/ -q
asv check --python=same
