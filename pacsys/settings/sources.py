"""Where settings come from: the TOML file, the environment and the command line, layered.

The TOML file is flat: its top-level keys are field names. Policies are an array of tables,
run in file order (the first denial wins)::

    port = 50051
    workers = 4
    allow_writes = ["Z:ACLTST*"]

    [[policies]]
    type = "rate_limit"
    max_requests = 100
    window_seconds = 60

Every setting that has a command line option can also come from the environment, as
``PACSYS_SUPERVISOR_<SETTING>`` (``PACSYS_SUPERVISOR_WORKERS=4``). The command line wins over
the environment, which wins over the file. An error names the key where it came from:
``config.toml: unknown key 'wokers'``, ``PACSYS_SUPERVISOR_PORT must be ...``, ``--port must be ...``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from pacsys.settings.schema import FIELDS, ConfigError, Settings, flag_name

__all__ = [
    "ENV_PREFIX",
    "env_name",
    "env_settings",
    "load_config",
    "read_config_file",
    "setting_sources",
    "settings_from",
]


def read_config_file(path: str) -> dict[str, Any]:
    """The raw TOML table of a config file; ConfigError when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: an array nested 500 deep
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


def load_config(path: str, env: Mapping[str, Any] | None = None) -> Settings:
    """Settings from a TOML file (and `env`, see `env_settings`); defaults for everything else."""
    return settings_from(read_config_file(path), {"config": path}, env=env, source=path)


def _unknown_key(key: str, where: str) -> ConfigError:
    known = [name for name, f in FIELDS.items() if f.in_file]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}", key=key, body=f"unknown key{hint}")


# -- the environment -----------------------------------------------------------------------------

ENV_PREFIX = "PACSYS_SUPERVISOR_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(name: str) -> str:
    """The environment variable of a setting: ``workers`` -> ``PACSYS_SUPERVISOR_WORKERS``."""
    return ENV_PREFIX + name.upper()


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given as ``PACSYS_SUPERVISOR_<SETTING>`` variables, by field name, typed.

    Every setting with a command line option has one. An empty variable counts as not set; a
    list (allow_writes) is separated by commas or spaces; a boolean is 1/0, true/false, yes/no
    or on/off. An unknown ``PACSYS_SUPERVISOR_`` variable is an error (a typo would otherwise
    be ignored). Values are checked later, by `settings_from`, with the variable's name.
    """
    environ = os.environ if environ is None else environ
    by_env = {env_name(name): name for name, f in FIELDS.items() if f.flag}
    values: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = by_env.get(var)
        if name is None:
            close = difflib.get_close_matches(var, by_env, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {var}{hint}", key=var)
        text = text.strip()
        if not text:
            continue
        kind = FIELDS[name].kind
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{var} must be true or false (1/0, yes/no, on/off), got {text!r}", key=name)
            values[name] = text.lower() in _TRUE
        elif kind is int or kind is float:
            try:
                values[name] = kind(text)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"{var} must be {what}, got {text!r}", key=name) from None
        elif kind is tuple:
            values[name] = [p for p in re.split(r"[,\s]+", text) if p]
        else:
            values[name] = text
    return values


# -- the layers ----------------------------------------------------------------------------------


def settings_from(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    env: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Settings:
    """Settings from the file's table, the environment's values and the command line's (which win).

    `overrides` and `env` are keyed by field name (`env` as `env_settings` returns it); a None
    value means "not given". `source` names the file in errors. A later layer's `token` drops an
    earlier layer's `token_file` and the reverse, so ``--token-file`` replaces a token set in the
    file.
    """
    where = f"{source}: " if source else ""
    for key in file_values:
        if key not in FIELDS:
            raise _unknown_key(key, where)
        if not FIELDS[key].in_file:
            raise ConfigError(f"{where}'{key}' cannot be set in the config file", key=key)
    env = dict(env or {})
    for key in (*overrides, *env):
        if key not in FIELDS:
            raise ConfigError(f"unknown setting '{key}'", key=key)
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = dict(file_values)
    for layer in (env, given):
        if "token" in layer:
            merged.pop("token_file", None)
        if "token_file" in layer:
            merged.pop("token", None)
        merged.update(layer)
    try:
        return Settings(**merged)
    except ConfigError as exc:
        if exc.key is None or exc.body is None:
            raise
        raise _located(exc.key, exc.body, given, env, where) from None


def _located(key: str, body: str, given: Mapping[str, Any], env: Mapping[str, Any], where: str) -> ConfigError:
    """The error of `key` named where its value came from: the option, the variable or the file."""
    if key in given and FIELDS[key].flag:
        return ConfigError(f"{flag_name(key)} {body}", key=key, body=body)
    if key in env and key not in given:
        return ConfigError(f"{env_name(key)} {body}", key=key, body=body)
    return ConfigError(f"{where}{ConfigError.of(key, body)}", key=key, body=body)


def setting_sources(
    file_values: Mapping[str, Any], overrides: Mapping[str, Any], env: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Where each setting's value came from: command line, environment (VAR), file or default."""
    env = env or {}
    sources = {}
    for name in FIELDS:
        if overrides.get(name) is not None:
            sources[name] = "command line"
        elif name in env:
            sources[name] = f"environment ({env_name(name)})"
        elif name in file_values:
            sources[name] = "file"
        else:
            sources[name] = "default"
    # A later layer's token or token_file replaces the other one: that one is not in effect.
    rank = ("default", "file", "environment", "command line")
    layer = {name: rank.index(text.split(" (")[0]) for name, text in sources.items()}
    if layer["token"] and layer["token_file"]:
        sources["token" if layer["token"] < layer["token_file"] else "token_file"] = "default"
    return sources
