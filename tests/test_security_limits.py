"""Limits, bearer-token auth, TLS and mutual TLS, and the error interceptor, on real servers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import running_server
from lmscore.client import (
    Item,
    RollingOptions,
    ScoreOptions,
    ScoringClient,
    ScoringError,
    TlsOptions,
)
from lmscore.server.interceptors import ErrorInterceptor

TOKEN = "s3cret-token-for-tests"


def test_size_limits_name_the_field_and_the_limit(tiny_export: Path) -> None:
    flags = [
        "--max-items-per-request",
        "2",
        "--max-completions-per-item",
        "2",
        "--max-tokens-per-item",
        "20",
        "--max-tokens-per-request",
        "30",
        "--max-message-bytes",
        "4000",
    ]
    with running_server(tiny_export, *flags) as server, ScoringClient(server.address) as client:
        cases = [
            ([Item("a", ["b"])] * 3, grpc.StatusCode.RESOURCE_EXHAUSTED, "items", "limit of 2"),
            (
                [Item("a", ["b", "c", "d"])],
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "items[0].completions",
                "limit of 2 per item",
            ),
            (
                [Item("word " * 30, ["b"])],
                grpc.StatusCode.INVALID_ARGUMENT,
                "items[0].completions[0]",
                "per-item limit",
            ),
            (
                [Item(list(range(10, 25)), [[30]]), Item(list(range(10, 25)), [[31]])],
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "items",
                "more than 30 tokens",
            ),
        ]
        for items, code, field, words in cases:
            with pytest.raises(ScoringError) as error:
                client.score(items)
            assert error.value.code == code
            assert field in error.value.field_violations
            assert words in error.value.field_violations[field]
        with pytest.raises(ScoringError) as error:
            client.score([Item("x" * 5000, ["y"])])
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.score([Item("still", [" fine"])])[0].completion_tokens > 0


def test_bearer_token_auth(tiny_export: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one token per line\n{TOKEN}\nanother-token\n")
    flags = ["--auth-token-file", str(tokens), "--health-without-auth"]
    with running_server(tiny_export, *flags) as server:
        for token in (None, "wrong-token", TOKEN[:-1]):
            with (
                ScoringClient(server.address, token=token) as client,
                pytest.raises(ScoringError) as error,
            ):
                client.score([Item("a", [" b"])])
            assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        for token in (TOKEN, "another-token"):
            with ScoringClient(server.address, token=token) as client:
                assert client.score([Item("a", [" b"])])[0].completion_tokens == 1
                assert client.model_info().name == "tiny-llama"
        with grpc.insecure_channel(server.address) as channel:  # health needs no token here
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer=None, issuer_key=None):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert=None, key=None) -> bytes:
    if cert is not None:
        return cert.public_bytes(serialization.Encoding.PEM)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA, a server certificate and a client certificate signed by it."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("lmscore test CA", ca_key)
    files = {"ca.pem": _pem(ca)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}.pem"] = _pem(_certificate(f"{role}", key, ca, ca_key))
        files[f"{role}-key.pem"] = _pem(key=key)
    paths = {}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        paths[name] = directory / name
    return paths


def test_tls_with_a_self_signed_certificate(tiny_export: Path, pki: dict[str, Path]) -> None:
    flags = ["--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server-key.pem"])]
    tls = TlsOptions(root_certificates=pki["ca.pem"].read_bytes())
    with running_server(tiny_export, *flags, tls=tls) as running:
        with ScoringClient(running.address, tls=tls) as client:
            assert client.score([Item("a", [" b"])])[0].completion_tokens == 1
        with ScoringClient(running.address, timeout=5) as plaintext, pytest.raises(ScoringError):
            plaintext.score([Item("a", [" b"])])
        untrusted = TlsOptions(root_certificates=pki["client.pem"].read_bytes())
        with (
            ScoringClient(running.address, tls=untrusted, timeout=5) as client,
            pytest.raises(ScoringError),
        ):
            client.score([Item("a", [" b"])])


def test_mutual_tls_requires_a_client_certificate(tiny_export: Path, pki: dict[str, Path]) -> None:
    flags = [
        "--tls-cert",
        str(pki["server.pem"]),
        "--tls-key",
        str(pki["server-key.pem"]),
        "--tls-client-ca",
        str(pki["ca.pem"]),
    ]
    ca = pki["ca.pem"].read_bytes()
    mutual = TlsOptions(
        root_certificates=ca,
        certificate_chain=pki["client.pem"].read_bytes(),
        private_key=pki["client-key.pem"].read_bytes(),
    )
    with running_server(tiny_export, *flags, tls=mutual) as server:
        with ScoringClient(server.address, tls=mutual) as client:
            assert client.score([Item("a", [" b"])])[0].completion_tokens == 1
        with (
            ScoringClient(
                server.address, tls=TlsOptions(root_certificates=ca), timeout=5
            ) as client,
            pytest.raises(ScoringError),
        ):
            client.score([Item("a", [" b"])])


def test_unexpected_exceptions_become_internal_with_a_request_id(caplog) -> None:
    """The interceptor on an in-process server whose handler fails once, then works."""
    calls = []

    async def flaky(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "test.Flaky", {"Call": grpc.unary_unary_rpc_method_handler(flaky)}
    )

    async def run() -> tuple[grpc.aio.AioRpcError, bytes]:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Flaky/Call")
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(b"x")
                return error.value, await call(b"x")
        finally:
            await server.stop(None)

    error, second = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INTERNAL
    request_id = error.details().split("request id ")[1].split(",")[0]
    assert request_id in caplog.text and "KeyError" in caplog.text
    assert second == b"ok"


def test_a_result_over_the_message_limit_is_refused_before_any_run(tiny_export: Path) -> None:
    """One result is one gRPC message: a result that would not fit --max-message-bytes is
    refused naming its completion, before the model runs (no "Sent message larger than max"
    after the work), while the same request without token details is served."""
    from conftest import free_port, scrape_metrics

    metrics_port = free_port()
    flags = ("--max-message-bytes", "8192", "--max-top-k", "8", "--metrics-port", str(metrics_port))
    prompt = list(range(5, 90))
    with running_server(tiny_export, *flags) as server, ScoringClient(server.address) as client:
        runs = "lmscore_batch_sequences_count"

        def model_runs() -> float:
            return sum(v for (name, _), v in scrape_metrics(metrics_port).items() if name == runs)

        before = model_runs()
        with pytest.raises(ScoringError) as refused:
            client.score(
                [Item("a", ["b"]), Item(prompt, [[7]])], ScoreOptions(token_details=True, top_k=8)
            )
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(refused.value.field_violations) == ["items[1].completions[0]"]
        assert "message limit of 8192 bytes (--max-message-bytes)" in str(refused.value)
        assert model_runs() == before
        [served] = client.score([Item(prompt, [[7]])])
        assert served.completion_tokens == 1
        with pytest.raises(ScoringError) as rolling:
            client.score_rolling([list(range(5, 90)) * 10], RollingOptions(token_logprobs=True))
        assert list(rolling.value.field_violations) == ["texts[0]"]
