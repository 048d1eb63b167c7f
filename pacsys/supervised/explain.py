"""`pacsys-supervisor explain`: which check or policy decides a request, and why, without a server.

    pacsys-supervisor explain [--config FILE] [--identity ID] [--method Read|Set] DRF[=VALUE]...

The request goes through the server's own gate (`gate.Gate`), built as the service builds it
(the file's policies, `allow_writes`, the deny-writes-unless-granted rule, the limits), so
the verdict is the server's, worded as the server words it: the gRPC status, the decision
label of the metrics and the log (`invalid`, `limit`, `denied`, ...) and the details a
client would get. When the request gets as far as the policies, each one's step is shown:
allowed it unchanged, approved slots, rewrote it, or denied it. Exit status 0 when the
request would be allowed, 1 when refused, 2 when the config file or the arguments are wrong
(a setting without a value is one).

Per-client state is not known here: rate limits, slew-rate history, open streams and calls
in flight start empty, and the bearer token is not checked (the line says when one would
be required). No device is read either: a policy that judges a setting from the device's
current value (a slew limit's steps and rates) is run judging everything else, and its line
names what the server would judge from the device.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from pacsys._proto.controls.common.v1 import device_pb2
from pacsys.settings import ConfigError, Settings, load_config
from pacsys.supervised._arguments import ArgumentParser
from pacsys.supervised._policies import Policy, PolicyDecision, RequestContext, write_gate
from pacsys.supervised.gate import Gate, GateRequest, Refusal, ServicerLimits
from pacsys.supervised.policy_config import build_policies
from pacsys.supervised.startup_checks import resolve_token

__all__ = ["explain_parser", "main"]

PROG = "pacsys-supervisor explain"


def explain_parser() -> argparse.ArgumentParser:
    """The command's options (also shown in `pacsys-supervisor --help`)."""
    parser = ArgumentParser(
        prog=PROG,
        description="Print which check or policy decides a request and why, without a server, in the server's "
        "words. Exit 0 allowed, 1 refused, 2 bad config or arguments.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="the config file (default: the defaults)")
    parser.add_argument(
        "--identity",
        default="ipv4:127.0.0.1",
        metavar="ID",
        help="the client: a certificate subject (CN=ops-1,O=Lab) or an address (ipv4:10.0.0.5); default: %(default)s",
    )
    parser.add_argument(
        "--method",
        choices=("Read", "Set"),
        help="default: Set when every argument is DEVICE=VALUE, else Read",
    )
    parser.add_argument("requests", nargs="+", metavar="DRF[=VALUE]", help="DRFs to read, or DEVICE=VALUE to set")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = explain_parser()
    ns = parser.parse_args(list(argv))
    settings_given = [r for r in ns.requests if "=" in r]
    method = ns.method or ("Set" if len(settings_given) == len(ns.requests) else "Read")
    if method == "Set" and len(settings_given) != len(ns.requests):
        missing = ", ".join(repr(r) for r in ns.requests if "=" not in r)
        parser.error(f"--method Set: every setting is DEVICE=VALUE; no value in {missing}")
    if method == "Read" and settings_given and ns.method is None:
        parser.error(f"DEVICE=VALUE ({settings_given[0]!r}) is a setting: give only settings, with --method Set")
    try:
        settings = load_config(ns.config) if ns.config else Settings()
        resolve_token(settings)
        _chain(settings)  # a policy table that does not build is a bad file
    except Exception as exc:  # a message, never a traceback
        text = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
    with _gate_log_silenced():
        lines, allowed = explain(settings, ns.identity, method, ns.requests)
    print("\n".join(lines))
    return 0 if allowed else 1


@contextlib.contextmanager
def _gate_log_silenced() -> Iterator[None]:
    """The gate logs refusals and a policy's exception for a server's log; here its verdict is the output."""
    log, silent = logging.getLogger("pacsys.supervised"), logging.NullHandler()
    propagate, log.propagate = log.propagate, False
    log.addHandler(silent)
    try:
        yield
    finally:
        log.removeHandler(silent)
        log.propagate = propagate


def _chain(settings: Settings) -> list[Policy]:
    """The policy chain as the service builds it (the file's policies, then the write rule)."""
    return write_gate(settings, build_policies(settings))


def _value(text: str) -> device_pb2.Value:
    """A setting's value as a client sends it: a number as a scalar, anything else as text."""
    try:
        return device_pb2.Value(scalar=float(text))
    except ValueError:
        return device_pb2.Value(text=text)


class _Offline(Policy):
    """A policy as it can run here, where no device is read: what it would judge from a
    device's current value (`Policy.needs_current`) is left out; the rest it judges as always."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.name = policy.name

    @property
    def allows_writes(self) -> bool:
        return self.policy.allows_writes

    def unjudged(self, ctx: RequestContext) -> list[str]:
        """The settings whose current values the server would read for this policy."""
        return list(self.policy.needs_current(ctx))

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if not self.unjudged(ctx):
            return self.policy.check(ctx)
        without_current = getattr(self.policy, "check_without_current", None)  # the machine-protection policies'
        return without_current(ctx) if without_current is not None else PolicyDecision(allowed=True)

    def on_allowed(self, ctx: RequestContext) -> None:
        self.policy.on_allowed(ctx)


def explain(settings: Settings, identity: str, method: str, requests: list[str]) -> tuple[list[str], bool]:
    """The explanation, one line per step, and whether the request would be allowed.

    One chain decides in the gate; the trace of each policy's step runs on a second one built
    the same way, so that policies that count (rate limits) count once in each.
    """
    if method == "Set":
        pairs = [r.partition("=") for r in requests]
        drfs, values = [d for d, _, _ in pairs], [_value(v) for _, _, v in pairs]
    else:
        drfs, values = list(requests), []
    peer = f"{identity}:0" if identity.startswith(("ipv4:", "ipv6:")) else "ipv4:0.0.0.0:0"
    gate = Gate([_Offline(p) for p in _chain(settings)], limits=ServicerLimits.from_settings(settings))
    opened = gate.door(GateRequest(method, peer, identity, drfs=drfs, values=values))
    lines = [f"{method} {', '.join(requests)} from {identity}"]
    if isinstance(opened, Refusal):
        return [*lines, f"refused at the door: {_verdict(opened)}"], False
    lines.append("door: passed (syntax, length, period and per-request limits)")
    if method == "Set" and (settings.token is not None or settings.token_file is not None):
        lines.append("token: required (Bearer token in the authorization header; not checked here)")
    lines += _trace([_Offline(p) for p in _chain(settings)], opened.ctx)
    refusal = gate.decide(opened, {}).refusal
    return [*lines, "ALLOWED" if refusal is None else f"refused: {_verdict(refusal)}"], refusal is None


def _verdict(refusal: Refusal) -> str:
    """A refusal as the server gives it: the gRPC status, the decision label, the details."""
    return f"{refusal.code} ({refusal.decision}): {refusal.details}"


def _trace(chain: list[_Offline], ctx: RequestContext) -> list[str]:
    """Each policy's step on `ctx`, up to the first denial, then the approval rule."""
    lines: list[str] = []
    for n, policy in enumerate(chain, 1):
        try:
            unjudged = policy.unjudged(ctx)
            decision = policy.check(ctx)
        except Exception as exc:
            return [*lines, f"{n}. {policy.name}: raised {type(exc).__name__}: {exc}"]
        if not decision.allowed:
            return [*lines, f"{n}. {policy.name}: DENIED: {decision.reason}"]
        after = decision.ctx or ctx
        line = f"{n}. {policy.name}: {_what_changed(ctx, after)}"
        if unjudged:
            line += f"; not judged here: what it judges from the current value of {', '.join(unjudged)} (not read)"
        lines.append(line)
        ctx = after
    if not any(p.allows_writes for p in chain):
        return [*lines, "approval: no policy gates writes (nothing to approve)"]
    for i, drf in enumerate(ctx.drfs):
        if i not in ctx.allowed:
            name = ctx.device_name(drf)  # a policy may have rewritten it into anything
            return [*lines, f"approval: DENIED: Device {name} not approved for {ctx.rpc_method} (no policy granted it)"]
    return [*lines, "approval: every slot approved"]


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
