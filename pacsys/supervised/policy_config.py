"""The policy configuration: [[policies]] tables built into Policy objects.

Each table's `type` picks a builder that checks its keys and values (every error names
``policies[i]`` and the key) and builds the policy from `pacsys.supervised._policies`.
`build_policies` builds a file's chain in order. `write_gate`, the service's rule that writes are
denied unless something grants them, lives with the policies (`_policies.write_gate`) and is
re-exported here. The settings themselves are `pacsys.settings.Settings`, whose schema checks
each table's structure and type name (`POLICY_TYPES`) without importing the policies.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from pacsys.settings import POLICY_TYPES, ConfigError, Settings, range_text
from pacsys.supervised._identity import IdentityPatternError
from pacsys.supervised._machine_protection import SlewLimit, SlewRatePolicy, ValueRangePolicy
from pacsys.supervised._policies import (
    DeviceAccessPolicy,
    Policy,
    RateLimitPolicy,
    ReadOnlyPolicy,
    WriteGrantPolicy,
    write_gate,  # the rule lives with the policies; imported from here by the service and the admin commands
)
from workers.backend_spec import LoadError, load_callable

__all__ = ["EXAMPLE_POLICIES", "POLICY_TYPES", "build_policies", "write_gate"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENT}(\.{_IDENT})*")


class _PolicyTable:
    """Typed access to one [[policies]] table; every error names policies[i] and the key."""

    def __init__(self, table: dict[str, Any], index: int, where: str, known: tuple[str, ...]):
        self.table = table
        self.prefix = f"{where}policies[{index}] ({table['type']})"
        for key in table:
            if key not in known and key not in ("type", "name"):
                close = difflib.get_close_matches(key, (*known, "name"), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"its parameters: {', '.join((*known, 'name'))}"
                raise self.error(key, f"is not a parameter of this policy type ({hint})")

    def error(self, key: str | None, body: str) -> ConfigError:
        text = f"{self.prefix}: '{key}' {body}" if key else f"{self.prefix}: {body}"
        return ConfigError(text, key=key, body=body)

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.table:
            return self.table[key]
        if default is ...:
            raise self.error(key, "is required")
        return default

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def number(self, key: str, value: Any, *, gt: float | None = None, ge: float | None = None) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (gt is not None and value <= gt) or (ge is not None and value < ge):
            raise self.error(key, f"must be a number{range_text(ge, None, gt)}, got {value!r}")
        return float(value)

    def table_of(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        if not isinstance(value, Mapping) or not value:
            raise self.error(key, f"must be a non-empty table of device pattern = limit, got {value!r}")
        return dict(value)


def _read_only(t: _PolicyTable) -> Policy:
    return ReadOnlyPolicy()


def _device_access(t: _PolicyTable) -> Policy:
    patterns = t.get("patterns")
    if (
        isinstance(patterns, str)
        or not isinstance(patterns, list)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise t.error("patterns", f'must be a non-empty list of device patterns, e.g. ["M:*"], got {patterns!r}')
    mode = t.choice("mode", ("allow", "deny"), "allow")
    action = t.choice("action", ("all", "read", "set"), "all")
    syntax = t.choice("syntax", ("glob", "regex"), "glob")
    try:
        return DeviceAccessPolicy(patterns, mode=mode, action=action, syntax=syntax)
    except ValueError as exc:
        raise t.error("patterns" if "pattern" in str(exc) else "action", f"is invalid: {exc}") from None


def _string_list(t: _PolicyTable, key: str, example: str) -> list[str]:
    value = t.get(key)
    if (
        isinstance(value, str)
        or not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise t.error(key, f"must be a non-empty list of patterns, e.g. [{example}], got {value!r}")
    return value


def _write_grant(t: _PolicyTable) -> Policy:
    identities = _string_list(t, "identities", '"CN=ops*"')
    patterns = _string_list(t, "patterns", '"Z:*"')
    try:
        return WriteGrantPolicy(identities, patterns)
    except IdentityPatternError as exc:
        raise t.error("identities", f"is invalid: {exc}") from None
    except ValueError as exc:
        raise t.error("patterns", f"is invalid: {exc}") from None


def _rate_limit(t: _PolicyTable) -> Policy:
    max_requests = t.get("max_requests")
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
        raise t.error("max_requests", f"must be an integer >= 1, got {max_requests!r}")
    window = t.number("window_seconds", t.get("window_seconds", 60.0), gt=0)
    return RateLimitPolicy(max_requests, window)


def _value_range(t: _PolicyTable) -> Policy:
    bounds: dict[str, tuple[float, float]] = {}
    for pattern, pair in t.table_of("limits").items():
        key = f'limits."{pattern}"'
        if not isinstance(pair, list) or len(pair) != 2:
            raise t.error(key, f"must be [lo, hi], got {pair!r}")
        lo, hi = (t.number(key, v) for v in pair)
        if lo > hi:
            raise t.error(key, f"lo {lo:g} is above hi {hi:g}")
        bounds[pattern] = (lo, hi)
    return ValueRangePolicy(bounds)


def _slew_rate(t: _PolicyTable) -> Policy:
    slews: dict[str, SlewLimit] = {}
    for pattern, spec in t.table_of("limits").items():
        key = f'limits."{pattern}"'
        if not isinstance(spec, Mapping) or not spec:
            raise t.error(key, f"must be a table with max_step and/or max_rate, got {spec!r}")
        for sub in spec:
            if sub not in ("max_step", "max_rate"):
                raise t.error(f"{key}.{sub}", "is not a slew limit: use max_step and/or max_rate")
        step, rate = (
            None if spec.get(name) is None else t.number(f"{key}.{name}", spec[name], ge=0)
            for name in ("max_step", "max_rate")
        )
        slews[pattern] = SlewLimit(max_step=step, max_rate=rate)
    return SlewRatePolicy(slews)


def _custom_spec(t: _PolicyTable) -> tuple[str, Mapping[str, Any]]:
    """The factory spec and args of a custom policy, checked without importing anything."""
    spec = t.get("factory")
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and _DOTTED.fullmatch(module) and _DOTTED.fullmatch(attr)):
        raise t.error("factory", f'must be "module:callable", got {spec!r}')
    args = t.get("args", {})
    if not isinstance(args, Mapping):
        raise t.error("args", f"must be a table of keyword arguments, got {args!r}")
    return spec, args


def _custom(t: _PolicyTable) -> Policy:
    spec, args = _custom_spec(t)
    try:
        module_name, _, attr = spec.partition(":")
        factory = load_callable(module_name, attr)
    except LoadError as exc:
        raise t.error("factory", f"cannot load {spec}: {exc}") from None
    try:
        policy = factory(**args)
    except Exception as exc:
        raise t.error("args", f"rejected: {spec}(**args) raised {type(exc).__name__}: {exc}") from None
    if not callable(getattr(policy, "check", None)):
        raise t.error("factory", f"{spec} returned {type(policy).__name__}, not a Policy")
    return policy  # type: ignore[return-value]  # site code: checked for its `check` method above


_BUILDERS: dict[str, tuple[Callable[[_PolicyTable], Policy], tuple[str, ...]]] = {
    "read_only": (_read_only, ()),
    "device_access": (_device_access, ("patterns", "mode", "action", "syntax")),
    "write_grant": (_write_grant, ("identities", "patterns")),
    "rate_limit": (_rate_limit, ("max_requests", "window_seconds")),
    "value_range": (_value_range, ("limits",)),
    "slew_rate": (_slew_rate, ("limits",)),
    "custom": (_custom, ("factory", "args")),
}


def build_policies(settings: Settings) -> list[Policy]:
    """The configured policies, in file order; ConfigError naming policies[i] and the key."""
    where = f"{settings.config}: " if settings.config else ""
    built: list[Policy | None] = []
    custom: list[tuple[int, _PolicyTable]] = []
    # Every table is checked before any custom factory runs: site code is not called for a
    # file that is going to be refused anyway.
    for i, table in enumerate(settings.policies):
        builder, known = _BUILDERS[table["type"]]
        t = _PolicyTable(table, i, where, known)
        name = t.get("name", None)
        if name is not None and (not isinstance(name, str) or not name):
            raise t.error("name", f"must be a non-empty string, got {name!r}")
        if builder is _custom:
            _custom_spec(t)
            custom.append((i, t))
            built.append(None)
        else:
            built.append(_named(builder(t), name))
    for i, t in custom:
        built[i] = _named(_custom(t), t.get("name", None))
    return [p for p in built if p is not None]


def _named(policy: Policy, name: str | None) -> Policy:
    if name is not None:
        policy.name = name
    return policy


# (help lines, table) of the example [[policies]], one of each type.
EXAMPLE_POLICIES: list[tuple[list[str], dict[str, Any]]] = [
    (
        ["read_only: deny every Set (the service adds it first when nothing grants writes)."],
        {"type": "read_only"},
    ),
    (
        [
            "device_access: mode allow approves matching devices (for action set or all: grants writes),",
            "mode deny refuses any request naming one. action: all, read or set; syntax: glob or regex.",
        ],
        {"type": "device_access", "patterns": ["Z:*", "E:*"], "mode": "deny", "action": "set", "syntax": "glob"},
    ),
    (
        [
            "write_grant: clients whose identity matches (their TLS certificate's subject, or their address",
            "without the port, e.g. ipv4:10.0.1.*) may write matching devices; grants writes.",
        ],
        {"type": "write_grant", "identities": ["CN=ops-*", "ipv4:10.0.1.*"], "patterns": ["Z:ACLTS*"]},
    ),
    (
        ["rate_limit: at most max_requests requests per client address within any window_seconds."],
        {"type": "rate_limit", "max_requests": 100, "window_seconds": 60.0},
    ),
    (
        [
            "value_range: deny a Set that would put a matching device's setting outside [lo, hi], and one",
            "it cannot judge (an array, text, raw bytes, an element range...).",
        ],
        {"type": "value_range", "limits": {"M:OUTTMP": [40.0, 105.0], "Z:ACLTS*": [-10.0, 10.0]}},
    ),
    (
        [
            "slew_rate: deny a Set that moves a matching device's setting more than max_step from the value it",
            "has (read just before), or faster than max_rate per second since the last accepted write.",
        ],
        {"type": "slew_rate", "limits": {"M:OUTTMP": {"max_step": 5.0, "max_rate": 1.0}}},
    ),
    (
        [
            'custom: any Policy, built by calling factory ("module:callable") with args as keyword arguments.',
            "Every policy may also have a name, used in logs and metrics.",
        ],
        {
            "type": "custom",
            "name": "night-shift",
            "factory": "mysite.policies:night_shift",
            "args": {"start_hour": 22, "end_hour": 6},
        },
    ),
]
