"""What ScoringClient and AsyncScoringClient share: the connection, the default deadline,
bearer-token metadata and the stubs. Each twin only adds its own way of waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from lmscore.client.channel import TlsOptions, auth_metadata
from lmscore.client.errors import ServerUnavailableError
from lmscore.client.retry import RetryPolicy
from lmscore.v1 import scoring_pb2_grpc


class ClientBase:
    """`target`: HOST:PORT, several replicas as IP:PORT,IP:PORT,... or dns:///NAME:PORT
    (calls spread over every address, round_robin). `timeout` (seconds) is the default
    deadline of every call; each call may pass its own. Calls retry on UNAVAILABLE, and on
    RESOURCE_EXHAUSTED that carries a retry pushback (after waiting it: the server is
    overloaded, not the request too large); a stream cut mid-way is replayed and yields
    only the results it had not yielded."""

    # The twin's channel factory (lmscore.client.channel.sync_channel or async_channel).
    _connect: Callable[[str, TlsOptions | None], Any]

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
        channel: grpc.Channel | grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        channel = channel or type(self)._connect(target, tls)
        self._channel = channel
        self._metadata = auth_metadata(token)
        self._stub = scoring_pb2_grpc.ScorerStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        """Deadline (this call's, else the client's) and metadata of one call."""
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata,
        }

    def _not_ready(self, timeout: float) -> ServerUnavailableError:
        return ServerUnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout:g} s"
        )
