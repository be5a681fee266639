"""The import directions of docs/design.md's module map, read from the source (no import runs):
contract -> export -> server -> client, with bench and the `lmscore` dispatcher on top, and a
scoring engine that neither gRPC nor ONNX Runtime reaches into."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> package (pyproject.toml's package-dir) and the lmscore packages it may import.
PACKAGES = {
    "protos/lmscore/v1": ("lmscore.v1", {"lmscore.v1"}),
    "export": ("lmscore.export", {"lmscore.export", "lmscore.v1"}),
    "server": ("lmscore.server", {"lmscore.server", "lmscore.export", "lmscore.v1"}),
    "client": ("lmscore.client", {"lmscore.client", "lmscore.v1"}),
    "bench": (
        "lmscore.bench",
        {"lmscore.bench", "lmscore.client", "lmscore.server", "lmscore.export", "lmscore.v1"},
    ),
    "cli": (
        "lmscore.cli",
        {"lmscore.cli", "lmscore.bench", "lmscore.client", "lmscore.server", "lmscore.export"},
    ),
}
# The engine: requests -> plan -> runs -> results. The servicer and the runtime are its edges.
ENGINE = ["requests", "planning", "execution", "engine", "scoring", "rolling", "batching"]
ENGINE += ["tokenization", "config", "prefix_cache", "model_runs", "assembly", "memory"]
# One Score call meets the engine's modules in this order (docs/design.md, "One call,
# followed through"); a module imports only modules of a later rank, so data never goes
# back up (the batcher drives the model runs, it is not called back by execution).
ENGINE_RANKS = {
    "engine": 0,
    "execution": 1,
    "assembly": 2,
    "batching": 2,
    "planning": 3,
    "model_runs": 3,
    "prefix_cache": 4,
    "memory": 4,
    "tokenization": 4,
    "rolling": 4,
    "scoring": 5,
    "requests": 5,
    "config": 6,
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def lmscore_package(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lmscore" and len(parts) > 1 else None


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_imports_follow_the_flow(folder: str) -> None:
    _, allowed = PACKAGES[folder]
    wrong = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / folder).glob("*.py"))
        if "_pb2" not in path.name
        for module in imported_modules(path)
        if (package := lmscore_package(module)) and package not in allowed
    }
    assert not wrong, sorted(wrong)


def test_every_folder_is_in_the_map() -> None:
    """A new package folder must say where it stands (pyproject.toml maps folders)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder, (package, _) in PACKAGES.items():
        assert f'"{package}" = "{folder}"' in pyproject


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_needs_neither_grpc_nor_onnx_runtime(module: str) -> None:
    heavy = {"grpc", "onnxruntime", "onnx", "torch", "transformers", "lmscore.v1.scoring_pb2"}
    found = {
        m
        for m in imported_modules(ROOT / "server" / f"{module}.py")
        if m.split(".")[0] in heavy or m.startswith("lmscore.v1.scoring_pb2")
    }
    assert not found, sorted(found)


@pytest.mark.parametrize("module", sorted(ENGINE_RANKS))
def test_the_engine_flows_one_way(module: str) -> None:
    rank = ENGINE_RANKS[module]
    upstream = {
        name
        for m in imported_modules(ROOT / "server" / f"{module}.py")
        if (name := m.removeprefix("lmscore.server.")) in ENGINE_RANKS
        and ENGINE_RANKS[name] <= rank
        and name != module
    }
    assert not upstream, f"{module} imports {sorted(upstream)}, which come before it"


def test_every_engine_module_has_a_rank() -> None:
    assert set(ENGINE) == set(ENGINE_RANKS)
