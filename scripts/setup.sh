#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of torch and the project (editable, with tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[testing]"
echo "ready: $(.venv/bin/spinesegdiff --version)"
