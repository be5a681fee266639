"""Typed Python client for the lmscore gRPC server (sync and asyncio twins).

    from lmscore.client import ScoringClient, Item

    with ScoringClient("127.0.0.1:50051") as client:
        [result] = client.score([Item("The capital of France is", [" Paris"])])
        print(result.conditional_logprob)

Imports neither onnxruntime, torch nor transformers.
"""

from lmscore.client.aio import AsyncScoringClient
from lmscore.client.channel import TlsOptions
from lmscore.client.errors import (
    DeadlineExceededError,
    InternalServerError,
    InvalidArgumentError,
    ModelNotFoundError,
    ScoringError,
    ServerUnavailableError,
)
from lmscore.client.retry import RetryPolicy
from lmscore.client.sync import ScoringClient
from lmscore.client.types import (
    Item,
    ModelInfo,
    QuantizationInfo,
    RollingOptions,
    ScoreOptions,
    ScoreRequest,
)
from lmscore.v1.results import Distribution, RollingResult, ScoreResult, Token, TopToken, Word

__all__ = [
    "AsyncScoringClient",
    "DeadlineExceededError",
    "Distribution",
    "InternalServerError",
    "InvalidArgumentError",
    "Item",
    "ModelInfo",
    "ModelNotFoundError",
    "QuantizationInfo",
    "RetryPolicy",
    "RollingOptions",
    "RollingResult",
    "ScoreOptions",
    "ScoreRequest",
    "ScoreResult",
    "ScoringClient",
    "ScoringError",
    "ServerUnavailableError",
    "TlsOptions",
    "Token",
    "TopToken",
    "Word",
]
