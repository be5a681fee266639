"""`lmscore serve` flags -> ServerConfig: every setting is one field with one flag of the same
name, and each flag lands in its field (lmscore.server.config, lmscore.server.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from lmscore.export.paths import default_model_dir
from lmscore.server.cli import ConfigError, add_arguments, config_from_args
from lmscore.server.config import (
    EngineSettings,
    ModelDirectory,
    RuntimeOptions,
    ServerConfig,
    is_flag,
)

ENVIRON = {"LMSCORE_HOME": "/srv/lmscore"}


def parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv), ENVIRON)


def test_no_flags_give_the_declared_defaults() -> None:
    assert parse() == ServerConfig(model_dir=default_model_dir(ENVIRON))


def another_value(setting: dataclasses.Field[Any], hint: Any) -> tuple[list[str], Any]:
    """Flags that set `setting` to a value other than its default, and that value."""
    flag = "--" + setting.name.replace("_", "-")
    default = setting.default
    if typing.get_origin(hint) is typing.Literal:
        value = next(v for v in typing.get_args(hint) if v != default)
        return [flag, value], value
    kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
    if bool in kinds:
        value = not default
        return [flag if value else "--no-" + flag[2:]], value
    if int in kinds:
        return [flag, str(default + 7)], default + 7
    if float in kinds:
        return [flag, str(default + 0.5)], default + 0.5
    if Path in kinds:
        return [flag, "/tmp/elsewhere"], Path("/tmp/elsewhere")
    return [flag, "somewhere"], "somewhere"


SETTINGS = [
    (owner, setting)
    for owner in (ServerConfig, RuntimeOptions, EngineSettings)
    for setting in dataclasses.fields(owner)
    if is_flag(setting)
]


@pytest.mark.parametrize(("owner", "setting"), SETTINGS, ids=[s.name for _, s in SETTINGS])
def test_each_flag_sets_its_field(owner: type, setting: dataclasses.Field[Any]) -> None:
    argv, value = another_value(setting, typing.get_type_hints(owner)[setting.name])
    config = parse(*argv)
    default = ServerConfig(model_dir=default_model_dir(ENVIRON))
    if owner is ServerConfig:
        expected = dataclasses.replace(default, **{setting.name: value})
    else:
        part = "runtime" if owner is RuntimeOptions else "engine"
        changed = dataclasses.replace(getattr(default, part), **{setting.name: value})
        expected = dataclasses.replace(default, **{part: changed})
    assert config == expected


def test_flags_without_a_plain_field_are_read_here(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nsecret\n")
    config = parse("--model", str(tmp_path), "--auth-token-file", str(tokens))
    assert config.models == (ModelDirectory(tmp_path.name, tmp_path),)
    assert config.auth_tokens == ("secret",)
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        parse("--tls-cert", str(tokens))


def test_model_flags_name_and_order_the_models(tmp_path: Path) -> None:
    default = default_model_dir(ENVIRON)
    assert parse().models == (ModelDirectory("SmolLM2-135M-Instruct", default),)
    config = parse(
        *("--model", f"small={tmp_path / 'a'}", "--model", str(tmp_path / "b" / "..")),
        *("--model", "base=default", "--model", "default", "--model", "./odd=name"),
        *("--model", "gemma-3-270m"),
    )
    assert config.models == (
        ModelDirectory("small", tmp_path / "a"),
        ModelDirectory(tmp_path.name, tmp_path / "b" / ".."),  # named after the directory
        ModelDirectory("base", default),
        ModelDirectory("SmolLM2-135M-Instruct", default),
        ModelDirectory("odd=name", Path("./odd=name")),  # a path: its '=' follows a '/'
        ModelDirectory("gemma-3-270m", default.parent / "gemma-3-270m"),  # the second shipped one
    )
    assert ServerConfig(model_dir=tmp_path).models == (ModelDirectory(tmp_path.name, tmp_path),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--model", "/x/m", "--model", "/y/m"), r"two models named 'm' \(/x/m and /y/m\)"),
        (("--model", "a=/x", "--model", "a=/y"), "two models named 'a'"),
        (("--model", "=/x"), "NAME=DIR needs both"),
        (("--model", "a="), "NAME=DIR needs both"),
    ],
)
def test_bad_model_flags_are_config_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


NUMERIC = (int, float)


def numeric_settings() -> list[tuple[type, dataclasses.Field[Any]]]:
    found = []
    for settings in (ServerConfig, RuntimeOptions, EngineSettings):
        hints = typing.get_type_hints(settings)
        for setting in dataclasses.fields(settings):
            if is_flag(setting) and hints[setting.name] in NUMERIC:
                found.append((settings, setting))
    return found


@pytest.mark.parametrize(
    ("settings", "setting"), numeric_settings(), ids=lambda v: getattr(v, "name", "")
)
def test_every_numeric_setting_declares_its_range(settings: type, setting: Any) -> None:
    """A new limit must say which values make sense, so nonsense stops the server at once."""
    low, high = setting.metadata.get("low"), setting.metadata.get("high")
    assert low is not None or high is not None, f"{settings.__name__}.{setting.name}"
    if low is not None and high is not None:
        assert low <= setting.default <= high


# Values issue 23 found starting a server that died at warm-up or refused every call.
NONSENSE = [
    ("--max-text-bytes", "1", "must be >= 32"),
    ("--prefill-chunk-tokens", "-1", "must be >= 0"),
    ("--max-top-k", "-5", "must be in [0, 1000000]"),
    ("--metrics-port", "99999", "must be in [0, 65535]"),
    ("--http-port", "-2", "must be in [0, 65535]"),
    ("--max-items-per-request", "0", "must be >= 1"),
    ("--max-concurrent-requests", "0", "must be >= 1"),
    ("--max-queue-length", "0", "must be >= 1"),
    ("--shutdown-grace", "nan", "must be in [0, 3600]"),
    ("--intra-op-threads", "-1", "must be in [0, 1024]"),
]


@pytest.mark.parametrize(("flag", "value", "rule"), NONSENSE)
def test_a_value_out_of_range_exits_2_with_one_line_before_loading(
    flag: str, value: str, rule: str, tmp_path: Path
) -> None:
    """Checked before anything loads: the model directory does not even exist."""
    import subprocess

    from conftest import LMSCORE

    run = subprocess.run(
        [LMSCORE, "serve", "--model", str(tmp_path / "absent"), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"lmscore serve: {flag} {value}: {rule}"


def test_settings_made_in_python_are_checked_too(tmp_path: Path) -> None:
    from lmscore.server.config import SettingOutOfRange

    with pytest.raises(SettingOutOfRange, match=r"max_top_k = -5: must be in \[0, 1000000\]"):
        EngineSettings(max_top_k=-5)
    with pytest.raises(SettingOutOfRange, match="port = 70000"):
        ServerConfig(model_dir=tmp_path, port=70000)
    with pytest.raises(SettingOutOfRange, match="intra_op_threads"):
        RuntimeOptions(intra_op_threads=-3)
