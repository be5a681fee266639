"""Server configuration: every setting declared once, with its default, unit and help.

A field whose metadata is `flag(...)` is also a flag of `lmscore serve`: `--NAME` with
the field's name (underscores as dashes), type, default and help
(lmscore.server.cli derives the flags from here). The server builds one
ServerConfig at start and passes its parts down unchanged: `runtime` to ONNX
Runtime (lmscore.server.runtime), `engine` to the scoring engine. A new limit
is one field here. Standard library only, so the CLI shows the defaults without
loading ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from lmscore.v1.limits import DEFAULT_MAX_MESSAGE_BYTES

Device = Literal["auto", "cpu", "cuda"]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# `lmscore serve --help` groups.
LIMITS_GROUP = "batching and limits"
SECURITY_GROUP = "security"


# How long the memory recent requests needed is kept through idleness (lmscore.server.memory):
# traffic of a request every few seconds to a minute runs as back to back.
MEMORY_HOLD_S = 60.0


def flag(
    help: str, *, low: float | None = None, high: float | None = None, **argparse_keywords: Any
) -> dict[str, Any]:
    """The metadata that makes a field a flag of `lmscore serve` (extra keywords: metavar,
    and group: the --help group, else its class's); `low` and `high`: its valid range,
    checked when the settings are made (check_ranges)."""
    limits = {k: v for k, v in (("low", low), ("high", high)) if v is not None}
    return {"help": help, **limits, **argparse_keywords}


class SettingOutOfRange(ValueError):
    """A setting outside the range its field declares; `name` is the field's."""

    def __init__(self, name: str, value: Any, low: float | None, high: float | None) -> None:
        self.name, self.value = name, value
        self.allowed = describe_range(low, high)
        super().__init__(f"{name} = {value!r}: must be {self.allowed}")


def describe_range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"


def check_ranges(settings: Any) -> None:
    """SettingOutOfRange for the first field of `settings` outside its declared range, so a
    nonsense value stops the server before anything loads, not at warm-up or at every call."""
    for setting in dataclasses.fields(settings):
        low, high = setting.metadata.get("low"), setting.metadata.get("high")
        value = getattr(settings, setting.name)
        if value is None or (low is None and high is None):
            continue
        above = low is None or value >= low
        below = high is None or value <= high
        if not (above and below):  # NaN fails both
            raise SettingOutOfRange(setting.name, value, low, high)


def is_flag(setting: dataclasses.Field[Any]) -> bool:
    return "help" in setting.metadata


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime runs the graph."""

    device: Device = field(
        default="auto",
        metadata=flag("cuda fails unless CUDA actually loads; auto falls back to CPU"),
    )
    intra_op_threads: int = field(
        default=0,
        metadata=flag("ONNX Runtime threads per run; 0 = one per physical core", low=0, high=1024),
    )
    # ORT's CPU arena keeps the peak of every batch shape (onnxruntime #11627) until it is
    # shrunk, which the model thread does when it goes idle after a burst. Without it every
    # run's large buffers are mapped afresh and fault in, large vocabularies most (figures in
    # docs/benchmarks.md, session settings).
    cpu_arena: bool = field(
        default=True,
        metadata=flag(
            "ONNX Runtime's CPU memory arena, shrunk when the model goes idle after a burst "
            "(off: buffers freed after every run, slower, large vocabularies most)"
        ),
    )
    # ONNX Runtime pre-packs each weight matrix into the layout its GEMM reads fastest, a
    # copy beside the mapped file: faster GEMMs for about the model's size in memory
    # (docs/benchmarks.md, session settings).
    low_memory: bool = field(
        default=False,
        metadata=flag(
            "run the weights from the mapped file as they are, without ONNX Runtime's "
            "pre-packed copies: about the model's size less memory, 10-20%% slower"
        ),
    )
    ort_cache_dir: Path | None = field(
        default=None,
        metadata=flag(
            "cache the ORT-optimized graph here and load it on later starts (off by default: "
            "on the benchmark machine the cached graph started no faster and ran ~18%% slower)",
            metavar="DIR",
        ),
    )
    # Run through session.io_binding(): scores to host arrays, the key/value cache left where
    # ORT wrote it (on CPU this saves a copy of the cache per run, docs/design.md). False:
    # plain session.run, which copies every output into numpy (the tests hold the two paths
    # to each other).
    io_binding: bool = True
    # ONNX Runtime's threads spin for a while after each run, waiting for the next op. With
    # one model that saves a wake-up (2-3% of a batch here); with several, one session's
    # spinning threads take the cores from the next model's run: the app turns it off when
    # it serves more than one model (docs/benchmarks.md, "Two models": Gemma-3 16.6 -> 13.9 s
    # beside SmolLM2's short pairs).
    thread_spinning: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Batching, prefix reuse and the per-request limits of the scoring engine."""

    max_batch_tokens: int = field(
        default=1536,
        metadata=flag("padded tokens per model run (batch size x longest sequence)", low=1),
    )
    max_queue_delay_ms: float = field(
        default=0.0,
        metadata=flag(
            "dynamic batching: how long queued sequences wait for others to share a model "
            "run, unless --max-batch-tokens are already waiting (0: none; what queued "
            "during the previous run shares the next one anyway)",
            low=0,
            high=60_000,
        ),
    )
    cross_request_batching: bool = field(
        default=True,
        metadata=flag(
            "batch sequences of concurrent requests together (off: only within a request)"
        ),
    )
    prefix_reuse: bool = field(
        default=True,
        metadata=flag(
            "score the completions of a shared prompt against one pass over the prompt "
            "(off: every completion gets a full pass)",
        ),
    )
    # Where prefix reuse starts to pay (`python -m lmscore.bench.prefix`, docs/benchmarks.md):
    # below it, full passes batched with other items are faster.
    min_prefix_reuse_tokens: int = field(
        default=96,
        metadata=flag(
            "reuse a shared prompt's pass only when it saves at least N tokens, "
            "(completions - 1) x prompt tokens; shorter prompts batch better as full passes",
            metavar="N",
            low=0,
        ),
    )
    prefix_cache_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=flag(
            "bytes of prompt key/value caches kept across requests, per served model (least "
            "recently used out), so that a later prompt starting with at least "
            "--min-prefix-reuse-tokens of the same tokens runs only the rest; scores equal "
            "to float32 rounding (0: off)",
            metavar="BYTES",
            low=0,
        ),
    )
    # A chunk is what a short request from another client waits for at most; smaller chunks
    # cost no throughput down to this size on the default model (docs/benchmarks.md, long
    # sequences).
    prefill_chunk_tokens: int = field(
        default=128,
        metadata=flag(
            "run sequences longer than N tokens in chunks of N through the key/value cache: "
            "memory bounded by the chunk, deadlines and cancellations checked and other "
            "requests' runs interleaved between chunks (0: one pass however long)",
            metavar="N",
            low=0,
        ),
    )
    # The scoring head holds ~3 tensors of [tokens, vocab] float32 while it runs, which a
    # large vocabulary makes GBs for a full batch. The default keeps a 49k vocabulary's usual
    # batches whole and cuts a 262k vocabulary's to 256 tokens a run.
    max_logits_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=flag(
            "bytes of [tokens, vocabulary] float32 scores one model run may hold; a batch "
            "over it runs in chunks of positions, as --prefill-chunk-tokens",
            metavar="BYTES",
            low=1,
        ),
    )
    # Idle release (lmscore.server.memory): a request after idle pays ~15 % of its time to
    # fault released buffers in again; sporadic traffic keeps them (docs/benchmarks.md).
    memory_hold: float = field(
        default=MEMORY_HOLD_S,
        metadata=flag(
            "keep the memory recent requests' runs needed (ONNX Runtime's arena) until the "
            "model has been idle this many seconds, so that a request every few seconds runs "
            "as fast as back to back; a burst needing more than the requests of the last "
            "hold goes back after 1 s idle, and so does everything at 0 (tight memory limits)",
            metavar="SECONDS",
            low=0,
            high=86_400,
        ),
    )
    max_top_k: int = field(
        default=20, metadata=flag("largest top_k a request may ask for", low=0, high=1_000_000)
    )
    max_items_per_request: int = field(default=1024, metadata=flag("items in one request", low=1))
    max_completions_per_item: int = field(
        default=256, metadata=flag("completions of one item", low=1)
    )
    max_tokens_per_item: int = field(
        default=0,
        metadata=flag("tokens of one joint sequence, BOS included (0: the model's context)", low=0),
    )
    max_tokens_per_request: int = field(
        default=262_144, metadata=flag("tokens over all sequences of one request", low=1)
    )
    max_text_bytes: int = field(
        default=1024 * 1024,
        metadata=flag(
            "UTF-8 bytes of one prompt, completion or rolling text, checked before tokenizing",
            metavar="BYTES",
            low=32,
        ),
    )
    max_request_id_bytes: int = field(
        default=256,
        metadata=flag(
            "UTF-8 bytes of a request_id (echoed in every result)", metavar="BYTES", low=0
        ),
    )
    max_response_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=flag(
            "estimated bytes of one request's results (texts echoed, token details, top-k); "
            "a request over it is refused before any work",
            metavar="BYTES",
            low=1024,
        ),
    )
    max_queue_length: int = field(
        default=4096, metadata=flag("sequences waiting for the model, all requests together", low=1)
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclasses.dataclass(frozen=True)
class ModelDirectory:
    """One model to serve: the name requests select it by, and its export directory."""

    name: str
    directory: Path

    @classmethod
    def named_after(cls, directory: Path) -> ModelDirectory:
        """Named after its directory, as `lmscore serve --model DIR` names it (`..` resolved,
        symbolic links not: a link's own name is the one its user chose)."""
        return cls(Path(os.path.abspath(directory)).name, Path(directory))


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `lmscore serve` runs with, built once from the command line."""

    # The models served, in the order given; a request whose `model` is empty goes to the
    # first. Names are unique (ValueError otherwise).
    models: tuple[ModelDirectory, ...] = ()
    # Shorthand for one model named after its directory: models=(ModelDirectory.named_after(d),).
    model_dir: dataclasses.InitVar[Path | None] = None
    host: str = field(default="127.0.0.1", metadata=flag("bind address"))
    port: int = field(default=50051, metadata=flag("port", low=0, high=65_535))
    # gRPC server reflection; None: on when listening on loopback only.
    reflection: bool | None = field(
        default=None,
        metadata=flag(
            "register gRPC server reflection (default: on when --host is loopback, off "
            "otherwise: it describes every service to anyone who can connect)",
        ),
    )
    http_port: int = field(
        default=0,
        metadata=flag(
            "also serve HTTP on this port (0: off): OpenAI's /v1/completions for scoring, the "
            "gRPC API as JSON (POST /lmscore.v1.Scorer/METHOD), the tokenizer routes and "
            "/health; same host, TLS, tokens and limits as gRPC (docs/clients.md)",
            low=0,
            high=65_535,
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=flag(
            "serve Prometheus metrics at http://HOST:PORT/metrics (0: off)", low=0, high=65_535
        ),
    )
    metrics_host: str | None = field(
        default=None, metadata=flag("bind address of the metrics port (default: --host)")
    )
    shutdown_grace: float = field(
        default=10.0,
        metadata=flag("seconds in-flight requests get to finish after SIGTERM", low=0, high=3600),
    )
    log_level: str = field(default="INFO", metadata=flag("logging level"))
    # What a quiet model's short request waits at most behind another model's long one
    # (lmscore.server.model_runs.ModelThread); shorter turns cost the busy model per-run
    # overhead (docs/benchmarks.md, "Two models").
    model_turn_ms: float = field(
        default=250.0,
        metadata=flag(
            "with several models: while another model is active, keep each model run to about "
            "this many milliseconds (by its measured cost), so that no model waits longer "
            "behind another (0: runs as long as --prefill-chunk-tokens makes them)",
            low=0,
            high=60_000,
        ),
    )
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata=flag("size of one gRPC message", group=LIMITS_GROUP, low=1024, high=2_147_483_647),
    )
    max_concurrent_requests: int = field(
        default=64,
        metadata=flag(
            "requests being scored at once (a ScoreStream counts only while one of its "
            "requests is)",
            group=LIMITS_GROUP,
            low=1,
        ),
    )
    # Waiting costs nothing but the message; a refusal costs a call's CPU each time the
    # client comes back (issue 23: goodput under 5x overload, docs/production.md).
    max_waiting_requests: int = field(
        default=256,
        metadata=flag(
            "requests past --max-concurrent-requests that wait for a slot, first come first "
            "served, until their deadline (0: refuse them at once); past it they are refused "
            "with RESOURCE_EXHAUSTED and a retry pushback",
            group=LIMITS_GROUP,
            low=0,
        ),
    )
    max_waiting_bytes: int = field(
        default=256 * 2**20,
        metadata=flag(
            "bytes of request messages that wait for a slot, all together (each waits whole)",
            group=LIMITS_GROUP,
            metavar="BYTES",
            low=0,
        ),
    )
    stream_idle_timeout: float = field(
        default=60.0,
        metadata=flag(
            "seconds a ScoreStream may wait for its next request before the server ends it "
            "with DEADLINE_EXCEEDED (0: never)",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    keepalive_time: float = field(
        default=60.0,
        metadata=flag(
            "ping a connection after this many idle seconds to find dead peers (0: never)",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    keepalive_timeout: float = field(
        default=20.0,
        metadata=flag(
            "close a connection whose keepalive ping gets no answer in this many seconds",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    max_connection_idle: float = field(
        default=600.0,
        metadata=flag(
            "close a connection with no RPC for this many seconds (0: never)",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    max_connection_age: float = field(
        default=0.0,
        metadata=flag(
            "close connections older than this many seconds, after a grace period for their "
            "calls, so clients spread over new servers (0: never)",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    max_connection_age_grace: float = field(
        default=300.0,
        metadata=flag(
            "seconds the calls of a connection past --max-connection-age get to finish",
            group=LIMITS_GROUP,
            metavar="SECONDS",
            low=0,
        ),
    )
    # Security: TLS (PEM bytes; a client CA turns on mutual TLS) and bearer tokens, read from
    # the files that lmscore.server.cli's security flags name.
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    auth_tokens: tuple[str, ...] = ()
    health_without_auth: bool = field(
        default=False,
        metadata=flag(
            "let grpc.health.v1 calls through without a token (for load-balancer probes)",
            group=SECURITY_GROUP,
        ),
    )
    runtime: RuntimeOptions = RuntimeOptions()
    engine: EngineSettings = EngineSettings()

    def __post_init__(self, model_dir: Path | None) -> None:
        check_ranges(self)
        if model_dir is not None:
            if self.models:
                raise ValueError("give models or model_dir, not both")
            object.__setattr__(self, "models", (ModelDirectory.named_after(model_dir),))
        if not self.models:
            raise ValueError("no model to serve")
        seen: dict[str, Path] = {}
        for model in self.models:
            if not model.name:
                raise ValueError(f"the model of {model.directory} has an empty name")
            if model.name in seen:
                raise ValueError(
                    f"two models named {model.name!r} ({seen[model.name]} and {model.directory}); "
                    "name one with --model NAME=DIR"
                )
            seen[model.name] = model.directory

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def reflection_enabled(self) -> bool:
        """Reflection describes every service to anyone who can connect: by default only
        to local tools."""
        return self.loopback_only if self.reflection is None else self.reflection

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
