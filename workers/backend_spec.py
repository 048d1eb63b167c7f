"""The `module:factory[?ARGS]` backend spec, parsed and built without this project's `pacsys`.

    module:factory                      import `module` (dotted), call `factory()` (a dotted
                                        attribute path is allowed) with no arguments
    module:factory?key=value&key=value  the same, with keyword arguments

A value is percent-decoded (as in a URL query), then read as JSON when it is JSON (a
number, true, false, null, a "quoted string", a list or an object) and kept as text
otherwise: `host=127.0.0.1&port=50051` gives `factory(host="127.0.0.1", port=50051)`, and
`port="50051"` would give the text "50051". A key may appear once.

Workers build their backend here: a worker may run under another interpreter (the
`worker_python` setting), whose `pacsys` (e.g. the release's) must not be shadowed by ours.
The other spec forms (sim, fake, grpc://) name this project's own backends and are built by
`pacsys.backends.spec`, which uses this module for the factory form.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["FactorySpecError", "LoadError", "build", "call_factory", "is_builtin", "load_callable", "parse_factory"]

_FACTORY = re.compile(
    r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\?(?P<args>.*))?$",
    re.DOTALL,
)
_KEY = re.compile(r"^[A-Za-z_]\w*$")


class FactorySpecError(ValueError):
    """A factory spec that cannot be parsed or built; the message names the spec."""


def _fail(spec: str, why: str) -> FactorySpecError:
    return FactorySpecError(f"backend spec {spec!r}: {why}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_builtin(spec: str) -> bool:
    """Whether `spec` names one of this project's own backends (sim, sim:PATH, fake, grpc://)."""
    spec = spec.strip()
    return spec in ("sim", "fake") or spec.startswith(("sim:", "grpc://"))


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
    if match is None or is_builtin(spec):
        return None
    kwargs: dict[str, Any] = {}
    args = match["args"]
    if args is not None:
        try:
            pairs = parse_qsl(args, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise _fail(spec, "arguments must be key=value pairs joined by '&'") from None
        for key, text in pairs:
            if not _KEY.match(key):
                raise _fail(spec, f"argument name {key!r} is not a Python identifier")
            if key in kwargs:
                raise _fail(spec, f"argument {key!r} is given twice")
            kwargs[key] = _value(text)
    return match["module"], match["attr"], kwargs


def describe(spec: str) -> str:
    """The spec for log lines: a factory without its argument values (they may be secrets)."""
    if is_builtin(spec):
        try:
            from pacsys.backends.spec import describe_spec  # only where our own backends are
        except ImportError:
            return spec.partition("?")[0]
        return describe_spec(spec)
    parsed = parse_factory(spec)
    if parsed is None:
        return spec
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
        raise LoadError(f"cannot import module {module_name!r}: {_one_line(exc)}") from exc
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
    """Import the factory of `spec` and call it with its arguments; FactorySpecError on any failure."""
    parsed = parse_factory(spec)
    if parsed is None:
        raise _fail(spec, "expected module:factory or module:factory?key=value&...")
    module_name, attr, kwargs = parsed
    try:
        factory = load_callable(module_name, attr)
    except LoadError as exc:
        raise _fail(spec, str(exc)) from exc.__cause__
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise _fail(spec, f"factory {module_name}:{attr}() raised {_one_line(exc)}") from exc


def build(spec: str) -> object:
    """The backend `spec` names, as a worker builds it.

    A factory spec is built here. The built-in forms need this project's `pacsys`; under
    another interpreter, where `pacsys` is another package, they fail with a clear message.
    """
    if not is_builtin(spec):
        return call_factory(spec)
    try:
        from pacsys.backends.spec import build_backend  # this project's own backends
    except ImportError as exc:
        raise _fail(
            spec,
            f"names a backend of this project's pacsys, which is not importable here ({_one_line(exc)}); "
            "under another interpreter use the module:factory form",
        ) from None
    return build_backend(spec)
