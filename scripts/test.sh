#!/usr/bin/env bash
# Everything CI checks, from nothing: set up .venv, lint, run the whole test suite
# (unit, integration on a tiny model, end to end on the default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
python -m pytest -q "$@"
