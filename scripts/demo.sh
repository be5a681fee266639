#!/usr/bin/env bash
# The main job, from nothing: set up .venv, export the default model (once),
# start the server, score example pairs through the CLI, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
PORT=${LMSCORE_DEMO_PORT:-50051}

lmscore export --source default

log=$(mktemp -t lmscore-demo-serve.XXXXXX.log)
lmscore serve --model default --port "$PORT" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
python - "$PORT" "$log" <<'PY'
import sys
from lmscore.client import ScoringClient
port, log = sys.argv[1], sys.argv[2]
try:
    ScoringClient(f"127.0.0.1:{port}").wait_until_ready(timeout=120)
except Exception as exc:
    sys.exit(f"server did not start: {exc}\n{open(log).read()}")
PY
grep -h "serving" "$log" | sed 's/^.*INFO lmscore.server: /server: /'
echo

lmscore score --server "127.0.0.1:$PORT" --prompt "The capital of France is" \
  --completion " Paris." --completion " London." --completion " a city in Europe."
echo
lmscore score --server "127.0.0.1:$PORT" \
  --prompt "This program is free software: you can redistribute it and/or " \
  --completion "modify it under the terms of the GNU General Public License" \
  --completion "sell it to anyone who asks"
