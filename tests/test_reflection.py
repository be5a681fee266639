"""gRPC server reflection: generic tools (grpcurl, grpc_cli) can call the server without the
proto file; on by default only when the server listens on loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import ServerProcess, running_server
from lmscore.server.config import ServerConfig


def test_reflection_describes_the_scorer(tiny_server: ServerProcess) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"lmscore.v1.Scorer", "grpc.health.v1.Health"} <= services
        scorer = database.FindFileContainingSymbol("lmscore.v1.Scorer")
    [service] = [s for s in scorer.service if s.name == "Scorer"]
    assert {m.name for m in service.method} == {
        "Score",
        "ScoreStream",
        "ScoreRolling",
        "GetModelInfo",
        "ListModels",
    }


def test_no_reflection_flag_removes_it(tiny_export: Path) -> None:
    with (
        running_server(tiny_export, "--no-reflection") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("host", "flag", "enabled"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        ("0.0.0.0", None, False),
        ("0.0.0.0", True, True),
        ("127.0.0.1", False, False),
    ],
)
def test_reflection_default_follows_the_bind_address(host, flag, enabled) -> None:
    config = ServerConfig(model_dir=Path("unused"), host=host, reflection=flag)
    assert config.reflection_enabled is enabled
