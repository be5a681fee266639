"""Channels for both clients: plaintext or TLS (optionally mutual), and bearer-token metadata."""

from __future__ import annotations

import dataclasses

import grpc

# Results with token details and top-k can exceed gRPC's 4 MiB default.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """PEM bytes. No root certificates: the system's. A client certificate and key: mTLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    # When the server certificate names another host than the target (tests, IP targets).
    server_name: str | None = None


def channel_options(tls: TlsOptions | None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def channel_credentials(tls: TlsOptions) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def sync_channel(target: str, tls: TlsOptions | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=channel_options(tls))
    return grpc.secure_channel(target, channel_credentials(tls), options=channel_options(tls))


def async_channel(target: str, tls: TlsOptions | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=channel_options(tls))
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=channel_options(tls))
