"""Backend SPECs of the command line (`--backend SPEC`): a string that names a backend.

    sim                         simulated devices, the built-in table (the default)
    sim:PATH                    simulated devices from the device table at PATH
    fake                        an in-memory FakeBackend with M:OUTTMP=72.5 and G:AMANDA=42.0
    grpc://HOST:PORT[?QUERY]    forward to another DAQ gRPC server; QUERY keys:
                                token_file=PATH (bearer token read from PATH),
                                pass_token=1 (send the caller's own authorization header),
                                timeout=SECONDS (deadline of one-shot calls, default 5)
    module:factory[?ARGS]       import `module` (dotted names allowed), call `factory()`
                                (a dotted attribute path is allowed), with keyword arguments
                                from ARGS: key=value&key=value, each value read as JSON when
                                it is JSON and as text otherwise (see workers.backend_spec)

`build_backend` returns the backend; every failure is a BackendSpecError (a ValueError)
with a one-line message that names the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

from pacsys.aio import AsyncBackend
from pacsys.backends import Backend
from workers.backend_spec import FactorySpecError, call_factory, parse_factory
from workers.backend_spec import describe as describe_factory

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_GRPC_KEYS = {"token_file", "pass_token", "timeout", "tls", "ca", "cert", "key"}

FORMS = "sim, sim:PATH, fake, grpc://HOST:PORT, module:factory[?key=value&...]"
# `fake` is a factory of the test fakes, named here rather than imported: a service's
# code does not depend on test code.
FAKE_FACTORY = "pacsys.testing:demo_backend"


class BackendSpecError(ValueError):
    """A backend SPEC that cannot be turned into a backend."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(spec: str, why: str) -> BackendSpecError:
    return BackendSpecError(f"backend spec {spec!r}: {why}")


def build_backend(spec: str) -> Backend | AsyncBackend:
    """The backend `spec` names; BackendSpecError when it cannot be built."""
    spec = spec.strip()
    if spec == "sim" or spec.startswith("sim:"):
        return _build_sim(spec)
    if spec == "fake":
        return _build_factory(FAKE_FACTORY)
    if spec.startswith("grpc://"):
        return _build_grpc(spec)
    try:
        factory = parse_factory(spec)
    except FactorySpecError as exc:
        raise BackendSpecError(str(exc)) from None
    if factory is not None:
        return _build_factory(spec)
    raise _fail(spec, f"unknown form (expected one of: {FORMS})")


def _build_sim(spec: str) -> AsyncBackend:
    path = spec[len("sim:") :] if spec.startswith("sim:") else None
    if path is not None:
        if not path:
            raise _fail(spec, "no device table path after 'sim:'")
        if not Path(path).is_file():
            raise _fail(spec, f"device table {path!r} is not a readable file")
    try:
        from pacsys.backends.sim import SimBackend

        return SimBackend() if path is None else SimBackend(devices=path)
    except Exception as exc:
        raise _fail(spec, f"cannot build the simulated backend: {_one_line(exc)}") from exc


class _GrpcParts(NamedTuple):
    target: str
    token_file: str | None
    pass_token: bool
    timeout: float
    tls: bool  # tls=1, or any of ca, cert, key
    ca: str | None
    cert: str | None
    key: str | None


def _grpc_parts(spec: str) -> _GrpcParts:
    """The parts of a grpc:// spec; ``?tls=1`` (the system's CAs), ``?ca=``, ``?cert=&key=`` ask for TLS."""
    url = urlsplit(spec)
    try:
        host, port = url.hostname, url.port
    except ValueError as exc:  # a port that is not a number or out of range
        raise _fail(spec, f"bad port: {exc}") from None
    if not host or port is None:
        raise _fail(spec, "expected grpc://HOST:PORT")
    if url.path not in ("", "/") or url.fragment or url.username or url.password:
        raise _fail(spec, "expected grpc://HOST:PORT with nothing after the port but ?query")
    try:
        query = dict(parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query)))
    except ValueError as exc:
        raise _fail(spec, f"bad query: {exc}") from None
    unknown = sorted(set(query) - _GRPC_KEYS)
    if unknown:
        raise _fail(spec, f"unknown query key {unknown[0]!r} (known: {', '.join(sorted(_GRPC_KEYS))})")
    flag = query.get("pass_token", "0").lower()
    if flag not in _TRUE | _FALSE:
        raise _fail(spec, f"pass_token must be 1 or 0, got {query['pass_token']!r}")
    timeout = 5.0
    if "timeout" in query:
        try:
            timeout = float(query["timeout"])
        except ValueError:
            timeout = float("nan")
        if not timeout > 0 or timeout == float("inf"):
            raise _fail(spec, f"timeout must be a positive number of seconds, got {query['timeout']!r}")
    tls_flag = query.get("tls", "0").lower()
    if tls_flag not in _TRUE | _FALSE:
        raise _fail(spec, f"tls must be 1 or 0, got {query['tls']!r}")
    ca, cert, key = (query.get(k) or None for k in ("ca", "cert", "key"))
    if (cert is None) != (key is None):
        raise _fail(spec, "a client certificate needs both cert= and key=")
    tls = tls_flag in _TRUE or any(v is not None for v in (ca, cert, key))
    if tls_flag in _FALSE and "tls" in query and tls:
        raise _fail(spec, "tls=0 contradicts ca=, cert= or key=")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _GrpcParts(target, query.get("token_file") or None, flag in _TRUE, timeout, tls, ca, cert, key)


def _build_grpc(spec: str) -> AsyncBackend:
    parts = _grpc_parts(spec)
    target, token_file, pass_token, timeout = parts[:4]
    token = None
    if token_file is not None:
        from pacsys.token_file import TokenFileError, read_token_file

        try:
            token = read_token_file(token_file)
        except TokenFileError as exc:
            raise _fail(spec, f"token_file {exc}") from None
    from pacsys.backends.grpc_client import ClientTLS, DAQClientBackend

    tls = ClientTLS(parts.ca, parts.cert, parts.key) if parts.tls else None
    try:
        return DAQClientBackend(target, token=token, pass_caller_token=pass_token, default_timeout=timeout, tls=tls)
    except OSError as exc:
        raise _fail(spec, f"cannot read a TLS file: {_one_line(exc)}") from exc


def _build_factory(spec: str) -> Backend | AsyncBackend:
    try:
        backend = call_factory(spec)
    except FactorySpecError as exc:
        raise BackendSpecError(str(exc)) from exc.__cause__
    if not isinstance(backend, Backend | AsyncBackend):
        raise _fail(
            spec,
            f"factory returned {type(backend).__name__}, not a pacsys Backend or AsyncBackend instance",
        )
    return backend


def describe_spec(spec: str) -> str:
    """A short human description of `spec` for log lines (never raises, never shows a token)."""
    spec = spec.strip()
    if spec == "sim":
        return "simulated devices (built-in table)"
    if spec.startswith("sim:"):
        return f"simulated devices from {spec[4:]}"
    if spec == "fake":
        return "in-memory fake backend (M:OUTTMP, G:AMANDA)"
    if spec.startswith("grpc://"):
        try:
            parts = _grpc_parts(spec)
        except BackendSpecError:
            return f"invalid grpc spec {spec!r}"
        target, token_file, pass_token, timeout = parts[:4]
        extras = [f"timeout {timeout:g} s"]
        if parts.tls:
            extras.append(f"TLS, CA {parts.ca or 'of the system'}" + (", client certificate" if parts.cert else ""))
        if token_file:
            extras.append(f"token from {token_file}")
        if pass_token:
            extras.append("caller token passed on")
        return f"DAQ gRPC server at {target} ({', '.join(extras)})"
    try:
        if parse_factory(spec) is not None:
            return f"backend from factory {describe_factory(spec)}"
    except FactorySpecError:
        return f"invalid factory spec {spec.partition('?')[0]!r}"
    return f"unknown backend spec {spec!r}"


__all__ = ["BackendSpecError", "build_backend", "describe_spec"]
