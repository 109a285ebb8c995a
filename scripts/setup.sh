#!/usr/bin/env bash
# Create .venv and install trainbox into it (idempotent). torch==2.13.0 goes first and stays pinned
# through constraints.txt, so pip never swaps the CPU build for gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
