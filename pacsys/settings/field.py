"""How a setting is declared and checked, one by one: `setting(...)` (the metadata of one field
of `pacsys.settings.schema.Settings`), `Field` (what a declaration says, read once) and
`ConfigError` (a bad value, worded as the project words it around msgspec's own errors).
The schema holds the fields themselves and the rules between them.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

__all__ = ["ConfigError", "Field", "field_of", "flag_name", "range_text", "setting"]


class ConfigError(ValueError):
    """A bad setting. `key` names the setting (or ``policies[i]``) when there is one."""

    def __init__(self, message: str, key: str | None = None, body: str | None = None):
        super().__init__(message)
        self.key = key
        self.body = body

    @classmethod
    def of(cls, key: str, body: str) -> ConfigError:
        """The error of `key`, worded ``'key' body`` (``policies[2] body``)."""
        return cls(f"{key if '[' in key else repr(key)} {body}", key=key, body=body)


def range_text(lo: float | None, hi: float | None, gt: float | None) -> str:
    """The bounds of a number for an error message: " from 1 to 5", " > 0", " >= 1" or ""."""
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if gt is not None:
        return f" > {gt:g}"
    if lo is not None:
        return f" >= {lo:g}"
    if hi is not None:
        return f" <= {hi:g}"
    return ""


def setting(
    help: str,
    *,
    section: str,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    flag: bool = True,
    in_file: bool = True,
    example: Any = None,
    metavar: str | None = None,
    normalize: Callable[[str], str] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> msgspec.Meta:
    """A field's metadata: bounds msgspec checks, the help, and where the setting shows.

    `flag`: a command line option and an environment variable; `in_file`: a key of the TOML
    file; `example`: shown in the example file for a setting unset by default; `normalize`: a
    text's spelling made canonical before the check (``str.lower``); `check`: a last check of
    the converted value, returning what is wrong with it (read after the key) or None.
    """
    extra = {
        "section": section,
        "flag": flag,
        "in_file": in_file,
        "example": example,
        "metavar": metavar,
        "normalize": normalize,
        "check": check,
    }
    bounds: dict[str, Any] = {k: v for k, v in (("ge", ge), ("le", le), ("gt", gt)) if v is not None}
    return msgspec.Meta(**bounds, description=help, extra=extra)


@dataclass(frozen=True)
class Field:
    """One setting as its declaration says: its type, bounds, default, help and where it shows."""

    name: str
    type: Any  # what msgspec converts a value to: the annotated type, without None
    kind: type  # int, float, str, bool or tuple (a list)
    optional: bool
    default: Any
    help: str
    section: str
    flag: bool
    in_file: bool
    example: Any
    metavar: str | None
    choices: tuple[str, ...] | None
    bounds: str  # " from 0 to 65535", " > 0" ...: for messages
    normalize: Callable[[str], str] | None
    extra_check: Callable[[Any], str | None] | None

    def check(self, value: Any) -> Any:
        """`value` converted to the field's type by msgspec, or ConfigError worded as the project words it."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError.of(self.name, "must be set")
        if self.normalize is not None and isinstance(value, str):
            value = self.normalize(value)
        try:
            converted = msgspec.convert(value, self.type)
        except msgspec.ValidationError as exc:
            raise self._refused(value, exc) from None
        if self.kind is float and not math.isfinite(converted):
            raise ConfigError.of(self.name, f"must be a number{self.bounds}, got {value!r}")
        if self.extra_check is not None:
            problem = self.extra_check(converted)
            if problem is not None:
                raise ConfigError.of(self.name, problem)
        return converted

    def _refused(self, value: Any, exc: msgspec.ValidationError) -> ConfigError:
        if self.kind is bool:
            return ConfigError.of(self.name, f"must be true or false, got {value!r}")
        if self.kind is int:
            return ConfigError.of(self.name, f"must be an integer{self.bounds}, got {value!r}")
        if self.kind is float:
            return ConfigError.of(self.name, f"must be a number{self.bounds}, got {value!r}")
        if self.choices is not None:
            return ConfigError.of(self.name, f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.kind is str:
            return ConfigError.of(self.name, f"must be a string, got {value!r}")
        if self.name == "policies":
            at = re.search(r"at `\$\[(\d+)\]", str(exc))
            if at is not None and isinstance(value, list | tuple):
                i = int(at[1])
                return ConfigError.of(f"policies[{i}]", f"must be a table ([[policies]]), got {value[i]!r}")
            return ConfigError.of(self.name, f"must be an array of tables ([[policies]]), got {value!r}")
        return ConfigError.of(self.name, f"must be a list of strings, got {value!r}")


def field_of(info: msgspec.structs.FieldInfo, hint: Any) -> Field:
    """What the struct field `info`, annotated `hint` (``Annotated[base, setting(...)]``), declares."""
    optional = typing.get_origin(hint) in (typing.Union, _UnionType) and type(None) in typing.get_args(hint)
    if optional:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    base, meta = typing.get_args(hint)  # Annotated[base, setting(...)]
    extra = meta.extra
    choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
    origin = typing.get_origin(base) or base
    return Field(
        name=info.name,
        type=hint,
        kind=str if choices else origin,
        optional=optional,
        default=info.default,
        help=meta.description,
        section=extra["section"],
        flag=extra["flag"],
        in_file=extra["in_file"],
        example=extra["example"],
        metavar=extra["metavar"],
        choices=choices,
        bounds=range_text(meta.ge, meta.le, meta.gt),
        normalize=extra["normalize"],
        extra_check=extra["check"],
    )


_UnionType = type(int | None)


def flag_name(name: str) -> str:
    """The command line option of a setting: ``threads_per_worker`` -> ``--threads-per-worker``."""
    return "--" + name.replace("_", "-")
