"""The `module:factory[?ARGS]` backend spec, parsed and built without this project's `pacsys`.

    module:factory                      import `module` (dotted), call `factory()` (a dotted
                                        attribute path is allowed) with no arguments
    module:factory?key=value&key=value  the same, with keyword arguments

A value is percent-decoded (as in a URL query), then read as JSON when it is JSON (a
number, true, false, null, a "quoted string", a list or an object) and kept as text
otherwise: `host=127.0.0.1&port=50051` gives `factory(host="127.0.0.1", port=50051)`, and
`port="50051"` would give the text "50051". A key may appear once.

This is the only form a worker reads: a worker may run under another interpreter (the
`worker_python` setting), whose `pacsys` (e.g. the release's) must not be shadowed by ours.
The front owns every other form (sim, fake, grpc://: `pacsys.backends.spec`) and rewrites
it into this one before a worker sees it.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["FactorySpecError", "LoadError", "call_factory", "describe", "load_callable", "one_line", "parse_factory"]

_FACTORY = re.compile(
    r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\?(?P<args>.*))?$",
    re.DOTALL,
)
_KEY = re.compile(r"^[A-Za-z_]\w*$")


class FactorySpecError(ValueError):
    """A backend spec that cannot be parsed or built; the message names the spec."""

    @classmethod
    def about(cls, spec: str, why: str) -> FactorySpecError:
        return cls(f"backend spec {spec!r}: {why}")


def one_line(exc: BaseException) -> str:
    """An exception as one line of text: its class and its message, whitespace collapsed."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_factory(spec: str) -> tuple[str, str, dict[str, Any]] | None:
    """(module, attribute path, keyword arguments) of a factory spec; None when `spec` is not one.

    FactorySpecError when it is one with malformed arguments.
    """
    spec = spec.strip()
    match = _FACTORY.match(spec)
    if match is None:
        return None
    kwargs: dict[str, Any] = {}
    args = match["args"]
    if args is not None:
        try:
            pairs = parse_qsl(args, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise FactorySpecError.about(spec, "arguments must be key=value pairs joined by '&'") from None
        for key, text in pairs:
            if not _KEY.match(key):
                raise FactorySpecError.about(spec, f"argument name {key!r} is not a Python identifier")
            if key in kwargs:
                raise FactorySpecError.about(spec, f"argument {key!r} is given twice")
            kwargs[key] = _value(text)
    return match["module"], match["attr"], kwargs


def describe(spec: str) -> str:
    """A factory spec for log lines, without its argument values (they may be secrets)."""
    try:
        parsed = parse_factory(spec)
    except FactorySpecError:
        parsed = None
    if parsed is None:
        return spec.partition("?")[0]
    module, attr, kwargs = parsed
    return f"{module}:{attr}({', '.join(f'{k}=...' for k in kwargs)})"


class LoadError(Exception):
    """A `module:callable` that cannot be loaded; the message says why."""


def load_callable(module_name: str, attr: str) -> Callable[..., object]:
    """The callable `module_name:attr` names (`attr` may be dotted); LoadError when there is none.

    The one loader of `module:factory` names: backend factories here, custom policies in
    `pacsys.supervised.policy_config`.
    """
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise LoadError(f"cannot import module {module_name!r}: {one_line(exc)}") from exc
    found: object = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise LoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(found):
        raise LoadError(f"{module_name}:{attr} is not callable (it is a {type(found).__name__})")
    return found


def call_factory(spec: str) -> object:
    """Import the factory of `spec` and call it with its arguments; FactorySpecError on any failure.

    What the factory raised is the error's `__cause__`.
    """
    parsed = parse_factory(spec)
    if parsed is None:
        raise FactorySpecError.about(spec, "expected module:factory or module:factory?key=value&...")
    module_name, attr, kwargs = parsed
    try:
        factory = load_callable(module_name, attr)
    except LoadError as exc:
        raise FactorySpecError.about(spec, str(exc)) from exc.__cause__
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise FactorySpecError.about(spec, f"factory {module_name}:{attr}() raised {one_line(exc)}") from exc
