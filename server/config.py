"""Server configuration: one typed object, built once from the command line, passed down."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmscore.server import defaults
from lmscore.server.runtime import Device, RuntimeOptions

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: Device = "auto"
    # 0 lets ONNX Runtime use one thread per physical core.
    intra_op_threads: int = 0
    cpu_arena: bool = False
    optimized_cache_dir: Path | None = None
    max_batch_tokens: int = defaults.MAX_BATCH_TOKENS
    # Dynamic batching: how long a sequence may wait for others to share its model run.
    max_queue_delay_ms: float = defaults.MAX_QUEUE_DELAY_MS
    cross_request_batching: bool = True
    prefix_reuse: bool = True
    min_prefix_reuse_saved_tokens: int = defaults.MIN_PREFIX_REUSE_SAVED_TOKENS
    max_top_k: int = defaults.MAX_TOP_K
    # gRPC server reflection; None: on when listening on loopback only.
    reflection: bool | None = None
    # Prometheus /metrics over HTTP; 0: off. Host defaults to the gRPC host.
    metrics_port: int = 0
    metrics_host: str | None = None
    shutdown_grace_seconds: float = 10.0
    # Limits (RESOURCE_EXHAUSTED for load and size, INVALID_ARGUMENT for shape).
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    max_items_per_request: int = defaults.MAX_ITEMS_PER_REQUEST
    max_completions_per_item: int = defaults.MAX_COMPLETIONS_PER_ITEM
    max_tokens_per_item: int | None = None
    max_tokens_per_request: int = defaults.MAX_TOKENS_PER_REQUEST
    max_concurrent_requests: int = defaults.MAX_CONCURRENT_REQUESTS
    max_queue_length: int = defaults.MAX_QUEUE_LENGTH
    # Security: TLS (PEM bytes; a client CA turns on mutual TLS) and bearer tokens.
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    auth_tokens: tuple[str, ...] = ()
    health_without_auth: bool = False

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            device=self.device,
            intra_op_threads=self.intra_op_threads,
            cpu_arena=self.cpu_arena,
            optimized_cache_dir=self.optimized_cache_dir,
        )

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
