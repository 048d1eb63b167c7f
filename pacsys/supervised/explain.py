"""`pacsys-supervisor explain`: which check or policy decides a request, and why, without a server.

    pacsys-supervisor explain [--config FILE] [--identity ID] --method Read|Set DRF[=VALUE]...

It builds the policy chain exactly as the service does (the file's policies, `allow_writes`,
the deny-writes-unless-granted rule), runs the door's checks (DRF syntax and length, the
shortest period, the per-request and per-stream limits), then each policy in order on the
request, printing what each one did: allowed it unchanged, approved slots, rewrote it, or
denied it. Exit status 0 when the request would be allowed, 1 when refused, 2 when the
config file or the arguments are wrong.

Per-client state is not known here: rate limits, slew-rate history, open streams and calls
in flight start empty, and the bearer token is not checked (the line says when one would
be required). No device is read either: a policy that judges a setting from the device's
current value (a slew limit's steps and rates) is shown judging everything else, and the
line names what the server would judge from the device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pacsys.drf import DRFError, parse_cached
from pacsys.supervised._policies import Policy, PolicyDecision, RequestContext, write_gate
from pacsys.supervised.config import (
    ConfigError,
    Settings,
    load_config,
    resolve_token,
)
from pacsys.supervised.gate import EVENT_RATE_HZ
from pacsys.supervised.policy_config import build_policies

__all__ = ["explain_parser", "main"]

PROG = "pacsys-supervisor explain"


def explain_parser() -> argparse.ArgumentParser:
    """The command's options (also shown in `pacsys-supervisor --help`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print which check or policy decides a request and why, without a server. "
        "Exit 0 allowed, 1 refused, 2 bad config or arguments.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="the config file (default: the defaults)")
    parser.add_argument(
        "--identity",
        default="ipv4:127.0.0.1",
        metavar="ID",
        help="the client: a certificate subject (CN=ops-1,O=Lab) or an address (ipv4:10.0.0.5); default: %(default)s",
    )
    parser.add_argument("--method", choices=("Read", "Set"), required=True)
    parser.add_argument("requests", nargs="+", metavar="DRF[=VALUE]", help="DRFs to read, or DEVICE=VALUE to set")
    return parser


def main(argv: Sequence[str]) -> int:
    ns = explain_parser().parse_args(list(argv))
    try:
        settings = load_config(ns.config) if ns.config else Settings()
        resolve_token(settings)
        chain = write_gate(settings, build_policies(settings))
    except Exception as exc:  # a message, never a traceback
        text = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
    lines, allowed = explain(settings, chain, ns.identity, ns.method, ns.requests)
    print("\n".join(lines))
    return 0 if allowed else 1


def _value(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def explain(
    settings: Settings, chain: list[Policy], identity: str, method: str, requests: list[str]
) -> tuple[list[str], bool]:
    """The explanation, one line per step, and whether the request would be allowed."""
    if method == "Set":
        pairs = [r.partition("=") for r in requests]
        drfs = [d for d, _, _ in pairs]
        values: list[tuple[str, object]] = [(d, _value(v)) for d, sep, v in pairs if sep]
        if len(values) != len(drfs):
            return [f"refused at the door: INVALID_ARGUMENT: every setting needs DEVICE=VALUE, got {requests}"], False
    else:
        drfs, values = list(requests), []
    peer = f"{identity}:0" if identity.startswith(("ipv4:", "ipv6:")) else "ipv4:0.0.0.0:0"
    lines = [f"{method} {', '.join(requests)} from {identity}"]
    door = _door(settings, method, drfs)
    if door is not None:
        return [*lines, f"refused at the door: {door}"], False
    lines.append("door: passed (syntax, length, period and per-request limits)")
    if method == "Set" and (settings.token is not None or settings.token_file is not None):
        lines.append("token: required (Bearer token in the authorization header; not checked here)")
    ctx = RequestContext(
        drfs=drfs,
        rpc_method=method,
        peer=peer,
        metadata={},
        values=values,
        raw_request=None,
        allowed=frozenset(range(len(drfs))) if method == "Read" else frozenset(),
        identity=identity,
    )
    for n, policy in enumerate(chain, 1):
        try:
            wanted = policy.needs_current(ctx)
            decision = _check_here(policy, ctx, wanted)
        except Exception as exc:
            return [*lines, f"{n}. {policy.name}: raised {type(exc).__name__}: {exc} -> INTERNAL"], False
        if not decision.allowed:
            return [*lines, f"{n}. {policy.name}: DENIED: {decision.reason} -> PERMISSION_DENIED"], False
        after = decision.ctx or ctx
        line = f"{n}. {policy.name}: {_what_changed(ctx, after)}"
        if wanted:
            line += f"; not judged here: what it judges from the current value of {', '.join(wanted)} (not read)"
        lines.append(line)
        ctx = after
    if any(p.allows_writes for p in chain):
        for i, drf in enumerate(ctx.drfs):
            if i not in ctx.allowed:
                name = ctx.device_name(drf)  # a policy may have rewritten it into anything
                return [
                    *lines,
                    f"approval: DENIED: Device {name} not approved for {method} (no policy granted it)"
                    " -> PERMISSION_DENIED",
                ], False
        lines.append("approval: every slot approved")
    else:
        lines.append("approval: no policy gates writes (nothing to approve)")
    return [*lines, "ALLOWED"], True


def _check_here(policy: Policy, ctx: RequestContext, wanted: Sequence[str]) -> PolicyDecision:
    """The policy's decision as far as it can be made without reading a device."""
    if not wanted:
        return policy.check(ctx)
    without_current = getattr(policy, "check_without_current", None)  # the machine-protection policies'
    return without_current(ctx) if without_current is not None else PolicyDecision(allowed=True)


def _what_changed(before: RequestContext, after: RequestContext) -> str:
    notes = []
    approved = sorted(after.allowed - before.allowed)
    if approved:
        notes.append("approved " + ", ".join(after.device_name(after.drfs[i]) for i in approved))
    if after.drfs != before.drfs:
        notes.append(f"rewrote the DRFs to {after.drfs}")
    if after.values != before.values:
        notes.append(f"changed the values to {after.values}")
    return "; ".join(notes) if notes else "allowed, no change"


def _door(settings: Settings, method: str, drfs: list[str]) -> str | None:
    """What the servicer's door would refuse in this request, or None."""
    limit = settings.max_drfs_per_request if method == "Read" else settings.max_settings_per_request
    if not drfs:
        return "INVALID_ARGUMENT: empty request"
    if len(drfs) > limit:
        return f"RESOURCE_EXHAUSTED: {len(drfs)} DRFs (the limit is {limit})"
    min_period_us = 1e6 / settings.max_rate_hz
    rate = 0.0
    for i, text in enumerate(drfs):
        if len(text) > settings.max_drf_length:
            return (
                f"INVALID_ARGUMENT: DRF {i} is {len(text)} characters long (max_drf_length {settings.max_drf_length})"
            )
        try:
            drf = parse_cached(text)
        except DRFError as exc:
            return f"INVALID_ARGUMENT: DRF {i}: {exc}"
        event = drf.event
        if method == "Set" or (event is not None and event.is_oneshot):
            continue
        if event is not None and event.kind in ("P", "Q"):
            period = event.period if event.period is not None else 1_000_000
            if period < min_period_us:
                return (
                    f"INVALID_ARGUMENT: DRF {i}: period {period} µs is faster than max_rate_hz {settings.max_rate_hz:g}"
                )
            rate += 1e6 / period
        else:
            rate += EVENT_RATE_HZ
    if rate > settings.max_stream_rate:
        return f"RESOURCE_EXHAUSTED: the stream asks for {rate:.0f} readings/s (max_stream_rate {settings.max_stream_rate:g})"
    return None
