"""`lmscore serve`: command-line flags -> ServerConfig -> the server.

The flags are ServerConfig's settings (lmscore.server.config), derived from its
fields: `--NAME` for field NAME, with its type, default and help. Only what is
not a plain value is written here: `--model` (NAME=DIR, a directory or 'default',
repeatable) and the security flags that name files to read.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lmscore.export.manifest import ManifestError
from lmscore.export.paths import default_model_dir, shipped_model_dir
from lmscore.server.config import (
    LIMITS_GROUP,
    SECURITY_GROUP,
    EngineSettings,
    ModelDirectory,
    RuntimeOptions,
    ServerConfig,
    SettingOutOfRange,
    describe_range,
    is_flag,
)

# Each settings class and the help group its flags go in (None: the main list) unless a
# field names its own (flag(..., group=...)).
_GROUPS: tuple[tuple[type, str | None], ...] = (
    (ServerConfig, None),
    (RuntimeOptions, "ONNX Runtime"),
    (EngineSettings, LIMITS_GROUP),
)


def _flag_options(field: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    """argparse keywords for one settings field, from its type hint and metadata."""
    options: dict[str, Any] = {
        k: v for k, v in field.metadata.items() if k not in ("help", "group", "low", "high")
    }
    options["default"] = field.default
    help_text = field.metadata["help"]
    # X | None: a flag of type X whose default None means "not set".
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if is_union else hint
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction  # --NAME / --no-NAME
        if field.default is not None:
            help_text += f" (default: {'on' if field.default else 'off'})"
    else:
        if typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
        if field.default is not None:
            help_text += " (default: %(default)s)"
    low, high = field.metadata.get("low"), field.metadata.get("high")
    if low is not None or high is not None:
        help_text += f"; {describe_range(low, high)}"
    options["help"] = help_text
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]DIR",
        help="an exported model directory, or 'default' for $LMSCORE_HOME/models/"
        "SmolLM2-135M-Instruct (the default) or 'gemma-3-270m' for $LMSCORE_HOME/models/"
        "gemma-3-270m, served under NAME or else the directory's "
        "name; repeat to serve several models: a request's `model` field picks one, an "
        "empty one the first",
    )
    groups: dict[str | None, Any] = {None: parser}
    for title in (*(t for _, t in _GROUPS), SECURITY_GROUP):
        groups.setdefault(title, parser.add_argument_group(title))
    for settings, title in _GROUPS:
        hints = typing.get_type_hints(settings)
        for field in dataclasses.fields(settings):
            if is_flag(field):
                group = groups[field.metadata.get("group", title)]
                flag = "--" + field.name.replace("_", "-")
                group.add_argument(flag, dest=field.name, **_flag_options(field, hints[field.name]))
    security = groups[SECURITY_GROUP]
    security.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument(
        "--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to (mTLS)"
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        help="bearer tokens, one per line; also read from $LMSCORE_AUTH_TOKENS (comma-separated)",
    )


class ConfigError(ValueError):
    pass


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def auth_tokens(token_file: Path | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    tokens = [t.strip() for t in environ.get("LMSCORE_AUTH_TOKENS", "").split(",")]
    data = _read(token_file, "--auth-token-file")
    if data is not None:
        tokens += [line.strip() for line in data.decode().splitlines()]
    return tuple(t for t in tokens if t and not t.startswith("#"))


def _settings(settings: type, args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(settings) if is_flag(f)}


def model_source(spec: str, environ: Mapping[str, str]) -> ModelDirectory:
    """One `--model` value: NAME=DIR, or DIR named after itself; DIR 'default' or
    'gemma-3-270m' is that shipped model's export. A value whose '=' comes after a '/' is a
    path (write ./a=b for a directory a=b)."""
    name, equals, directory = spec.partition("=")
    if not equals or "/" in name:
        name, directory = "", spec
    elif not name or not directory:
        raise ConfigError(f"--model {spec}: NAME=DIR needs both a name and a directory")
    path = shipped_model_dir(directory, environ) or Path(directory)
    return ModelDirectory(name, path) if name else ModelDirectory.named_after(path)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """The one place flags become a ServerConfig; ConfigError for unusable security flags
    or models (two of one name)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    tokens = auth_tokens(args.auth_token_file, environ)
    if args.auth_token_file is not None and not tokens:
        raise ConfigError(f"--auth-token-file {args.auth_token_file} holds no token")
    models = tuple(model_source(spec, environ) for spec in args.model or ["default"])
    tls = {
        "tls_cert": _read(args.tls_cert, "--tls-cert"),
        "tls_key": _read(args.tls_key, "--tls-key"),
        "tls_client_ca": _read(args.tls_client_ca, "--tls-client-ca"),
    }
    try:
        return ServerConfig(
            models=models,
            auth_tokens=tokens,
            **tls,
            runtime=RuntimeOptions(**_settings(RuntimeOptions, args)),
            engine=EngineSettings(**_settings(EngineSettings, args)),
            **_settings(ServerConfig, args),
        )
    except SettingOutOfRange as exc:  # a flag's value outside its field's range
        flag = "--" + exc.name.replace("_", "-")
        raise ConfigError(f"{flag} {exc.value}: must be {exc.allowed}") from None
    except ValueError as exc:  # ServerConfig's own checks: the models' names
        raise ConfigError(f"--model: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from lmscore.server.app import BindError, serve
    from lmscore.server.runtime import DeviceError, ModelLoadError

    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config))
    except ManifestError as exc:
        default = default_model_dir(os.environ)
        # The usual cause when the default model fails: it was never exported.
        about_default = any(m.directory == default for m in config.models) and (
            len(config.models) == 1 or str(default) in str(exc)
        )
        hint = " (run `lmscore export` first)" if about_default else ""
        print(f"lmscore serve: {exc}{hint}", file=sys.stderr)
        return 2
    except (DeviceError, ModelLoadError) as exc:
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 2
    except BindError as exc:
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 1
    return 0
