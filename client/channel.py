"""Channels for both clients: plaintext or TLS (optionally mutual), bearer-token metadata, and
targets naming several replicas (load-balanced with gRPC's round_robin)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import grpc
import grpc.experimental

# Results with token details and top-k can exceed gRPC's 4 MiB default.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024

# round_robin keeps a connection to every address the target resolves to and sends each call to
# the next READY one; a replica that dies leaves the rotation as soon as its connection drops.
# Always on: with one address it behaves like gRPC's default pick_first, and with a DNS name
# that resolves to several pods (a headless Service) pick_first would send everything to one.
# No retryPolicy here: gRPC's own retries stop once a response message has arrived, so the
# clients' retry loop (which also resumes a stream cut mid-way) is the one retry mechanism.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Server-streaming calls of the sync channel read in the calling thread (Python option).
SINGLE_THREADED_UNARY_STREAM = grpc.experimental.ChannelOptions.SingleThreadedUnaryStream

# Targets that already name a resolver; passed to gRPC untouched.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """PEM bytes. No root certificates: the system's. A client certificate and key: mTLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    # When the server certificate names another host than the target (tests, IP targets).
    server_name: str | None = None


def grpc_target(target: str) -> str:
    """`HOST:PORT,HOST:PORT,...` (IP literals, IPv6 in brackets) -> gRPC's address-list URI
    `ipv4:a:p,b:p` or `ipv6:[a]:p,[b]:p`. Anything else (one HOST:PORT, `dns:///NAME:PORT`, a
    URI) is returned unchanged. gRPC has no resolver for a list of host names: for a name with
    several addresses use `dns:///NAME:PORT`, which round_robin spreads over all of them.
    With TLS, a list needs TlsOptions.server_name: the certificate is checked against that name,
    as no single host name stands for the list."""
    if "," not in target or target.startswith(_SCHEMES):
        return target
    versions: set[int] = set()
    addresses: list[str] = []
    for part in (p.strip() for p in target.split(",")):
        host, _, port = part.rpartition(":")
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(
                f"{part!r} in target {target!r}: a list of replicas takes IP:PORT entries "
                "(IPv6 as [IP]:PORT); for a DNS name use dns:///NAME:PORT"
            ) from None
        if not port.isdigit():
            raise ValueError(f"{part!r} in target {target!r}: no port")
        versions.add(address.version)
        addresses.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    if len(versions) > 1:
        raise ValueError(f"target {target!r} mixes IPv4 and IPv6 addresses (gRPC cannot)")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def channel_options(tls: TlsOptions | None) -> list[tuple[str, object]]:
    """gRPC core options of both channel kinds."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.service_config", SERVICE_CONFIG),
    ]
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
    target = grpc_target(target)
    # A server-streaming call (Score) read in the calling thread: without it, grpc starts a
    # thread per call to drive the channel, ~1 ms of a short pair on two cores.
    options = [*channel_options(tls), (SINGLE_THREADED_UNARY_STREAM, 1)]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(tls), options=options)


def async_channel(target: str, tls: TlsOptions | None) -> grpc.aio.Channel:
    target = grpc_target(target)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=channel_options(tls))
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=channel_options(tls))
