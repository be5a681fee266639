"""The server process: load the models, warm them up, serve gRPC, shut down gracefully.

Every model has its own session, tokenizer, engine and batcher; their model runs take
turns on one thread, as one model's runs do (lmscore.server.model_runs.new_model_thread),
and they share one memory policy (lmscore.server.memory.MemoryPolicy): the heap is the
process's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import grpc
import onnxruntime
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmscore.export.cpu import REQUIRES_KEY, cpu_flags
from lmscore.export.manifest import TOKENIZER_NAME, Manifest, ManifestError
from lmscore.export.words import read_word_starts
from lmscore.server import metrics
from lmscore.server.asgi_server import AsgiServer, bind_tcp
from lmscore.server.config import ModelDirectory, ServerConfig
from lmscore.server.engine import ScoringEngine
from lmscore.server.http_transport import HttpTransport, ssl_context
from lmscore.server.interceptors import (
    BearerTokenInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from lmscore.server.memory import MemoryPolicy, limit_arenas
from lmscore.server.model_runs import new_model_thread
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.runtime import OnnxCausalLM
from lmscore.server.servicer import ScorerServicer, ServedModel
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1 import scoring_pb2, scoring_pb2_grpc
from lmscore.v1.options import ScoreOptions

log = logging.getLogger("lmscore.server")

SCORER_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name


@dataclasses.dataclass
class LoadedModel:
    manifest: Manifest
    runtime: OnnxCausalLM
    engine: ScoringEngine
    info: scoring_pb2.ModelInfo


def check_cpu(manifest: Manifest, directory: Path) -> None:
    """Refuse a quantized variant whose kernels give wrong scores on this CPU: 8-bit int8
    weights overflow ONNX Runtime's u8 x s8 kernel where there is no int8 dot product."""
    needed = (manifest.quantization or {}).get(REQUIRES_KEY) or []
    if needed and not cpu_flags() & set(needed):
        raise ManifestError(
            f"{directory}: this {manifest.quantization['recipe']} variant was exported for a CPU"
            f" with an int8 dot product ({' or '.join(needed)}), and this CPU has none: its"
            " scores would be wrong here. Export the variant on this machine"
            f" (`lmscore export --quantize {manifest.quantization['recipe']}`), which picks"
            " weights this CPU computes exactly."
        )


def load_model(
    config: ServerConfig,
    source: ModelDirectory | None = None,
    model_thread: Executor | None = None,
    memory: MemoryPolicy | None = None,
) -> LoadedModel:
    """Read the manifest, open the ONNX session and the tokenizer, build the engine, of
    `source` (default: the config's first model); `model_thread` and `memory`: shared with
    other models' engines (default: the engine's own)."""
    source = source or config.models[0]
    manifest = Manifest.read(source.directory)
    check_cpu(manifest, source.directory)
    # Several models' sessions take turns on the cores: none may spin while another runs.
    several = len(config.models) > 1
    runtime_options = dataclasses.replace(config.runtime, thread_spinning=not several)
    runtime = OnnxCausalLM(source.directory, runtime_options)
    # Word scores need both halves of the export: the head's sums and the mask behind them.
    word_starts = read_word_starts(source.directory) if runtime.word_starts else None
    tokenizer = TextTokenizer(source.directory / TOKENIZER_NAME, word_starts)
    facts = ModelFacts(
        max_context=manifest.max_context,
        vocab_size=manifest.vocab_size,
        bos_token_id=manifest.bos_token_id,
        eos_token_id=manifest.eos_token_id,
        bos_by_default=tokenizer.adds_bos(manifest.bos_token_id),
    )
    engine = ScoringEngine(
        runtime,
        tokenizer,
        facts,
        config.engine,
        memory=memory,
        model_thread=model_thread,
        name=source.name,
        message_limit=config.max_message_bytes,
    )
    info = scoring_pb2.ModelInfo(
        name=source.name,
        architecture=manifest.architecture,
        vocab_size=manifest.vocab_size,
        bos_token_id=-1 if manifest.bos_token_id is None else manifest.bos_token_id,
        eos_token_id=-1 if manifest.eos_token_id is None else manifest.eos_token_id,
        max_context=manifest.max_context,
        dtype=manifest.dtype,
        providers=runtime.providers,
        onnxruntime_version=onnxruntime.__version__,
        export_validation_max_abs_diff=manifest.validation_max_abs_diff,
        source_sha256=manifest.source_sha256,
        max_top_k=config.engine.max_top_k,
        bos_by_default=facts.bos_by_default,
        manifest_json=manifest.to_json(),
    )
    if manifest.quantization:
        q = manifest.quantization
        info.quantization.CopyFrom(
            scoring_pb2.QuantizationInfo(
                recipe=q["recipe"],
                speedup=q["speedup"],
                mean_abs_deviation=q["mean_abs_deviation"],
                max_abs_deviation=q["max_abs_deviation"],
                held_out_tokens=q["held_out_tokens"],
                # Absent from the manifests of older exports: 0, as the proto's default.
                kl_divergence=q.get("kl_divergence", 0.0),
                top1_agreement=q.get("top1_agreement", 0.0),
            )
        )
    return LoadedModel(manifest, runtime, engine, info)


def warm_up(engine: ScoringEngine) -> None:
    """One small request through the whole engine, so the first client pays no start-up cost;
    then what it allocated goes back, and the RSS left is the memory policy's resting size,
    which later requests' needs are measured from (lmscore.server.memory)."""
    plan = engine.plan([ItemInput("Warm up the model", [" now."])], ScoreOptions())
    engine.score_sync(plan)
    engine.release_memory()


class BindError(RuntimeError):
    """A port of the server (gRPC or metrics) cannot be bound."""


def asgi_servers(
    config: ServerConfig,
    http_transport: HttpTransport | None,
    http_socket: Any,
    metrics_socket: Any,
) -> list[AsgiServer]:
    """The event-loop HTTP servers: /metrics (slow or idle scrapers cost no thread) and the
    HTTP transport, each where its port was bound."""
    servers = []
    if metrics_socket is not None:
        grace = config.shutdown_grace
        servers.append(AsgiServer(metrics.metrics_app(), metrics_socket, grace, None, 1000))
    if http_transport is not None:
        grace, tls = config.shutdown_grace, ssl_context(config)
        servers.append(AsgiServer(http_transport.app, http_socket, grace, tls))
    return servers


def _bind(host: str, port: int, what: str) -> Any:
    """A listening socket for the HTTP or metrics port; BindError in one line."""
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise BindError(f"cannot serve {what} on {host}:{port}: {exc.strerror}") from None


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC core options: message size, one process per port, keepalive, connection age."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # and take half the connections. Off, binding a used port fails.
        ("grpc.so_reuseport", 0),
        # Clients may ping idle connections, every 10 s at most (faster: GOAWAY too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.keepalive_time > 0:
        options += [
            ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        ]
    if config.max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(config.max_connection_idle)))
    if config.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace)),
        ]
    return options


def new_server(config: ServerConfig) -> grpc.aio.Server:
    """The gRPC server with its interceptors and options, no services yet."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        MetricsInterceptor([model.name for model in config.models])
    ]
    if config.auth_tokens:
        exempt = [health.SERVICE_NAME] if config.health_without_auth else []
        interceptors.append(BearerTokenInterceptor(config.auth_tokens, exempt))
    interceptors.append(ErrorInterceptor())
    return grpc.aio.server(interceptors=interceptors, options=server_options(config))


def add_scorer(
    server: grpc.aio.Server, config: ServerConfig, models: list[LoadedModel]
) -> ScorerServicer:
    """The servicer of every transport: the gRPC server's, and the HTTP routes' too."""
    servicer = ScorerServicer(
        [ServedModel(loaded.engine, loaded.info) for loaded in models],
        config.max_concurrent_requests,
        config.stream_idle_timeout,
        config.max_waiting_requests,
        config.max_waiting_bytes,
    )
    scoring_pb2_grpc.add_ScorerServicer_to_server(servicer, server)
    return servicer


def health_services(models: list[LoadedModel]) -> list[str]:
    """The names health reports SERVING once every model is loaded: the server (""), the
    Scorer service, and each model as `lmscore.v1.Scorer/NAME`."""
    return ["", SCORER_SERVICE, *(f"{SCORER_SERVICE}/{loaded.info.name}" for loaded in models)]


def log_stats(loaded: LoadedModel) -> None:
    stats = loaded.engine.stats()
    log.info(
        "stopped: %d sequences scored in %d batches, %d model runs (%d of %d padded tokens "
        "real), %d prompts with several completions scored by prefix reuse, model %s",
        stats.sequences,
        stats.batches,
        stats.model_runs,
        stats.real_tokens,
        stats.padded_tokens,
        stats.calls,
        loaded.info.name,
    )
    runtime = loaded.runtime
    log.info(
        "model %s: %d runs through the IO binding, %d key/value caches repeated on the device, "
        "%d cache tensors repeated on the host",
        loaded.info.name,
        runtime.io_binding_runs,
        runtime.device_past_tiles,
        runtime.host_past_tensors,
    )


def bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Listen with TLS when a certificate is configured; warn about exposed plaintext.
    Raises BindError when the address cannot be bound (in use, or not this host's)."""
    try:
        port = _add_port(server, config)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        port, reason = 0, f": {exc}"
    else:
        reason = ""
    if port == 0:
        raise BindError(f"cannot listen on {config.address} (in use by another process?){reason}")
    return port


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key, config.tls_cert)],
            root_certificates=config.tls_client_ca,
            require_client_auth=config.tls_client_ca is not None,
        )
        return server.add_secure_port(config.address, credentials)
    if not config.loopback_only and not config.auth_tokens:
        log.warning("listening on %s without TLS or authentication", config.host)
    elif not config.loopback_only:
        log.warning("listening on %s without TLS: bearer tokens travel in clear text", config.host)
    return server.add_insecure_port(config.address)


async def serve(config: ServerConfig) -> None:
    started = time.perf_counter()
    limit_arenas()
    # Every port first, so a port in use fails in a second, not after the model loaded.
    server = new_server(config)
    port = bind(server, config)
    http_socket = _bind(config.host, config.http_port, "HTTP") if config.http_port else None
    metrics_socket = None
    if config.metrics_port:
        metrics_socket = _bind(config.metrics_host or config.host, config.metrics_port, "metrics")

    model_thread = new_model_thread(config.model_turn_ms / 1000)
    memory = MemoryPolicy(hold_s=config.engine.memory_hold)
    models: list[LoadedModel] = []
    for source in config.models:
        log.info("loading %s from %s", source.name, source.directory)
        models.append(load_model(config, source, model_thread, memory))
        warm_up(models[-1].engine)
    servicer = add_scorer(server, config, models)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection_enabled:
        reflection.enable_server_reflection(
            [SCORER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    for loaded in models:
        metrics.MODEL.labels(loaded.info.name).info(
            {
                "name": loaded.manifest.name,
                "dtype": loaded.manifest.dtype,
                "providers": ",".join(loaded.runtime.providers),
                "source_sha256": loaded.manifest.source_sha256,
            }
        )
    await server.start()
    http_transport = HttpTransport(servicer, config) if http_socket is not None else None
    http_servers = asgi_servers(config, http_transport, http_socket, metrics_socket)
    for http_server in http_servers:
        await http_server.start()
    for service in health_services(models):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    providers = dict.fromkeys(p for loaded in models for p in loaded.runtime.providers)
    log.info(
        "serving %s on %s:%d (%s), ready in %.2f s",
        ", ".join(loaded.info.name for loaded in models),
        config.host,
        port,
        ", ".join(providers),
        time.perf_counter() - started,
    )
    if http_socket is not None:
        log.info("serving HTTP on %s:%d", config.host, http_socket.getsockname()[1])

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down: finishing in-flight requests (grace %.1f s)", config.shutdown_grace)
    await health_servicer.enter_graceful_shutdown()
    if http_transport is not None:
        http_transport.serving = False
    # Both transports drain at once: neither takes new calls, both finish theirs.
    await asyncio.gather(
        server.stop(config.shutdown_grace), *(http.stop() for http in http_servers)
    )
    for loaded in models:
        loaded.engine.close()
        log_stats(loaded)
    model_thread.shutdown(wait=True)  # the engines share it: theirs to use, not to close
