"""Default limits and batching settings, in one place (standard library only, so the CLI can
show them without loading ONNX Runtime)."""

MAX_BATCH_TOKENS = 1536
MAX_QUEUE_DELAY_MS = 2.0
MAX_TOP_K = 20
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_ITEMS_PER_REQUEST = 1024
MAX_COMPLETIONS_PER_ITEM = 256
MAX_TOKENS_PER_REQUEST = 262_144
MAX_CONCURRENT_REQUESTS = 64
MAX_QUEUE_LENGTH = 4096
# Prefix reuse pays once it saves this many prompt tokens, (completions - 1) x prompt:
# `python -m lmscore.bench.prefix` (docs/benchmarks.md) on the 2-core CPU: full passes /
# prefix reuse = 0.50 at 14 saved, 1.02 at 64, 1.30 at 96, 1.85 at 192, 2.85 at 384.
# Below it, full passes batched with other items are faster.
MIN_PREFIX_REUSE_SAVED_TOKENS = 96
