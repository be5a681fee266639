"""Where exported models live: $LMSCORE_HOME/models/NAME (LMSCORE_HOME: ~/.cache/lmscore)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GEMMA_MODEL_NAME = "gemma-3-270m"
# The models the project ships: `lmscore export --source KEY` writes, and `lmscore serve
# --model KEY` reads, $LMSCORE_HOME/models/NAME.
SHIPPED_MODELS = {"default": DEFAULT_MODEL_NAME, GEMMA_MODEL_NAME: GEMMA_MODEL_NAME}


def lmscore_home(environ: Mapping[str, str]) -> Path:
    home = environ.get("LMSCORE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "lmscore"


def default_model_dir(environ: Mapping[str, str]) -> Path:
    """The directory `lmscore export --source default` writes and `serve --model default` reads."""
    return lmscore_home(environ) / "models" / DEFAULT_MODEL_NAME


def shipped_model_dir(key: str, environ: Mapping[str, str]) -> Path | None:
    """The export directory of a shipped model's key ('default', 'gemma-3-270m'), else None."""
    name = SHIPPED_MODELS.get(key)
    return None if name is None else lmscore_home(environ) / "models" / name
