"""One exception class per kind of failure, built from the gRPC status and its rich details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ScoringError(Exception):
    """A scoring call failed. `code` is the gRPC status code; `field_violations` maps
    request fields to what is wrong with them (from google.rpc.BadRequest details)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, field_violations: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations or {}


class InvalidArgumentError(ScoringError):
    pass


class ModelNotFoundError(ScoringError):
    pass


class ServerUnavailableError(ScoringError):
    pass


class DeadlineExceededError(ScoringError):
    pass


class InternalServerError(ScoringError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ScoringError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalServerError,
}


def error_from_rpc(error: grpc.RpcError) -> ScoringError:
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    violations: dict[str, str] = {}
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                for violation in bad_request.field_violations:
                    violations[violation.field] = violation.description
    return _BY_CODE.get(code, ScoringError)(code, message, violations)
