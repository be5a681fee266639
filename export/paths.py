"""Where exported models live: $LMSCORE_HOME/models/NAME (LMSCORE_HOME: ~/.cache/lmscore)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def lmscore_home(environ: Mapping[str, str]) -> Path:
    home = environ.get("LMSCORE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "lmscore"


def default_model_dir(environ: Mapping[str, str]) -> Path:
    """The directory `lmscore export --source default` writes and `serve --model default` reads."""
    return lmscore_home(environ) / "models" / DEFAULT_MODEL_NAME
