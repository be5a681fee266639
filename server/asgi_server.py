"""ASGI apps served by uvicorn inside the server's own event loop: the HTTP transport
(lmscore.server.http_transport) and the Prometheus metrics. Their ports are bound before
the models load, as the gRPC port is; an idle or slow connection costs no thread."""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from typing import Any

import uvicorn


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError when it cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say they
    # are TCP, and with it on every response waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class AsgiServer:
    """uvicorn serving `app` on `sock` in the running event loop. stop() stops accepting
    and lets in-flight calls finish within `shutdown_grace` seconds. `max_connections`:
    connections and calls at once, past which uvicorn answers 503."""

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        shutdown_grace: float,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int | None = None,
    ) -> None:
        self._sock = sock
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(shutdown_grace)),
            limit_concurrency=max_connections,
            http="httptools",
        )
        config.load()
        config.ssl = ssl_context  # uvicorn reads certificates from files only; ours are bytes
        self._server = uvicorn.Server(config)
        self._main: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        server = self._server
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[self._sock])
        self._main = asyncio.get_running_loop().create_task(server.main_loop())

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._main is not None:
            await self._main
        await self._server.shutdown(sockets=[self._sock])
