"""Server configuration: one typed object, built once from the command line, passed down."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmscore.server.runtime import Device, RuntimeOptions


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
    max_batch_tokens: int = 1536
    # Dynamic batching: how long a sequence may wait for others to share its model run.
    max_queue_delay_ms: float = 2.0
    cross_request_batching: bool = True
    prefix_reuse: bool = True
    max_top_k: int = 20
    reflection: bool = True
    shutdown_grace_seconds: float = 10.0
    # Limits (RESOURCE_EXHAUSTED for load and size, INVALID_ARGUMENT for shape).
    max_message_bytes: int = 16 * 1024 * 1024
    max_items_per_request: int = 1024
    max_completions_per_item: int = 256
    max_tokens_per_item: int | None = None
    max_tokens_per_request: int = 262_144
    max_concurrent_requests: int = 64
    max_queue_length: int = 4096
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
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
