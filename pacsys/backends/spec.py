"""Backend SPECs of the command line (`--backend SPEC`): a string that names a backend.

    sim                         simulated devices, the built-in table (the default)
    sim:PATH                    simulated devices from the device table at PATH
    fake                        an in-memory FakeBackend with M:OUTTMP=72.5 and G:AMANDA=42.0
    grpc://HOST:PORT[?QUERY]    forward to another DAQ gRPC server; QUERY keys:
                                token_file=PATH (bearer token read from PATH),
                                pass_token=1 (send the caller's own authorization header),
                                timeout=SECONDS (deadline of one-shot calls, default 5),
                                tls=1, ca=PATH, cert=PATH&key=PATH (TLS to the server)
    module:factory[?ARGS]       import `module` (dotted names allowed), call `factory()`
                                (a dotted attribute path is allowed), with keyword arguments
                                from ARGS: key=value&key=value, each value read as JSON when
                                it is JSON and as text otherwise (see workers.backend_spec)

This module is the one owner of the forms. Each built-in form is a factory here (or in
`pacsys.testing`), and `factory_spec` rewrites a built-in spec into the `module:factory?ARGS`
spec of its factory: a worker reads only that form (`workers.backend_spec`), and
`build_backend`, in the front process, builds every spec the same way. `check_backend_spec`
checks a spec's syntax for the settings, without importing or building anything.
Every failure is a BackendSpecError (a ValueError) with a one-line message naming the spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import parse_qsl, quote, urlsplit

from workers.backend_spec import FactorySpecError, call_factory, one_line, parse_factory

if TYPE_CHECKING:
    from pacsys.aio import AsyncBackend
    from pacsys.backends import Backend
    from pacsys.backends.grpc_client import DAQClientBackend
    from pacsys.backends.sim import SimBackend

__all__ = [
    "FORMS",
    "BackendSpecError",
    "build_backend",
    "check_backend_spec",
    "factory_spec",
    "grpc_backend",
    "is_builtin",
    "sim_backend",
]

FORMS = "sim, sim:PATH, fake, grpc://HOST:PORT or module:factory[?key=value&...]"

# The factories of the built-in forms. `fake` is a factory of the test fakes, named here
# rather than imported: a service's code does not depend on test code.
SIM_FACTORY = "pacsys.backends.spec:sim_backend"
GRPC_FACTORY = "pacsys.backends.spec:grpc_backend"
FAKE_FACTORY = "pacsys.testing:demo_backend"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_GRPC_KEYS = {"token_file", "pass_token", "timeout", "tls", "ca", "cert", "key"}


class BackendSpecError(FactorySpecError):
    """A backend SPEC that cannot be turned into a backend."""


class _UnknownForm(BackendSpecError):
    """A spec of none of the forms."""


def is_builtin(spec: str) -> bool:
    """Whether `spec` names one of this project's own backends (sim, sim:PATH, fake, grpc://)."""
    spec = spec.strip()
    return spec in ("sim", "fake") or spec.startswith(("sim:", "grpc://"))


def _argument(value: str) -> str:
    """A text as a factory argument: JSON-quoted (a path like `1.5` stays text), percent-encoded."""
    return quote(json.dumps(value), safe="")


def factory_spec(spec: str) -> str:
    """The `module:factory?ARGS` spec that builds `spec`: a built-in form rewritten, a factory spec as is.

    Only the syntax is checked (nothing is imported): BackendSpecError when it is wrong.
    """
    spec = spec.strip()
    if spec == "sim":
        return SIM_FACTORY
    if spec.startswith("sim:"):
        if not spec[4:]:
            raise BackendSpecError.about(spec, "no device table path after 'sim:' (name a devices file)")
        return f"{SIM_FACTORY}?devices={_argument(spec[4:])}"
    if spec == "fake":
        return FAKE_FACTORY
    if spec.startswith("grpc://"):
        _grpc_parts(spec)  # its errors now, in the front, not in each worker
        return f"{GRPC_FACTORY}?url={_argument(spec)}"
    try:
        if parse_factory(spec) is not None:
            return spec
    except FactorySpecError as exc:
        raise BackendSpecError(str(exc)) from None
    raise _UnknownForm.about(spec, f"unknown form (expected one of: {FORMS})")


def check_backend_spec(spec: str) -> str | None:
    """What is wrong with the syntax of a backend spec (nothing is imported or built), or None.

    The text reads after the setting's name: ``'backend' must be sim, sim:PATH, ...``.
    """
    try:
        factory_spec(spec)
    except _UnknownForm:
        return f"must be {FORMS}, got {spec!r}"
    except BackendSpecError as exc:
        return f"is invalid: {exc}"
    return None


def build_backend(spec: str) -> Backend | AsyncBackend:
    """The backend `spec` names, built in this process; BackendSpecError when it cannot be built."""
    from pacsys.aio import AsyncBackend
    from pacsys.backends import Backend

    spec = spec.strip()
    built = factory_spec(spec)
    try:
        backend = call_factory(built)
    except FactorySpecError as exc:
        if isinstance(exc.__cause__, BackendSpecError):  # a built-in factory's own message names the spec
            raise exc.__cause__ from None
        raise BackendSpecError(str(exc)) from exc.__cause__
    if not isinstance(backend, Backend | AsyncBackend):
        raise BackendSpecError.about(
            spec, f"factory returned {type(backend).__name__}, not a pacsys Backend or AsyncBackend instance"
        )
    return backend


# -- the factories of the built-in forms (they run where the backend is built: a worker, or here) --


def sim_backend(devices: str | None = None) -> SimBackend:
    """`sim` and `sim:PATH`: the simulator, with the built-in device table or the one at `devices`."""
    spec = "sim" if devices is None else f"sim:{devices}"
    if devices is not None and not Path(devices).is_file():
        raise BackendSpecError.about(spec, f"device table {devices!r} is not a readable file")
    try:
        from pacsys.backends.sim import SimBackend

        return SimBackend() if devices is None else SimBackend(devices=devices)
    except Exception as exc:
        raise BackendSpecError.about(spec, f"cannot build the simulated backend: {one_line(exc)}") from exc


def grpc_backend(url: str) -> DAQClientBackend:
    """`grpc://HOST:PORT?QUERY`: a client of another DAQ gRPC server (its token file read here)."""
    parts = _grpc_parts(url)
    token = None
    if parts.token_file is not None:
        from pacsys.token_file import TokenFileError, read_token_file

        try:
            token = read_token_file(parts.token_file)
        except TokenFileError as exc:
            raise BackendSpecError.about(url, f"token_file {exc}") from None
    from pacsys.backends.grpc_client import ClientTLS, DAQClientBackend

    tls = ClientTLS(parts.ca, parts.cert, parts.key) if parts.tls else None
    try:
        return DAQClientBackend(
            parts.target, token=token, pass_caller_token=parts.pass_token, default_timeout=parts.timeout, tls=tls
        )
    except OSError as exc:
        raise BackendSpecError.about(url, f"cannot read a TLS file: {one_line(exc)}") from exc


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
        raise BackendSpecError.about(spec, f"bad port: {exc}") from None
    if not host or port is None:
        raise BackendSpecError.about(spec, "expected grpc://HOST:PORT")
    if url.path not in ("", "/") or url.fragment or url.username or url.password:
        raise BackendSpecError.about(spec, "expected grpc://HOST:PORT with nothing after the port but ?query")
    try:
        query = dict(parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query)))
    except ValueError as exc:
        raise BackendSpecError.about(spec, f"bad query: {exc}") from None
    unknown = sorted(set(query) - _GRPC_KEYS)
    if unknown:
        raise BackendSpecError.about(spec, f"unknown query key {unknown[0]!r} (known: {', '.join(sorted(_GRPC_KEYS))})")
    flag = query.get("pass_token", "0").lower()
    if flag not in _TRUE | _FALSE:
        raise BackendSpecError.about(spec, f"pass_token must be 1 or 0, got {query['pass_token']!r}")
    timeout = 5.0
    if "timeout" in query:
        try:
            timeout = float(query["timeout"])
        except ValueError:
            timeout = float("nan")
        if not timeout > 0 or timeout == float("inf"):
            raise BackendSpecError.about(
                spec, f"timeout must be a positive number of seconds, got {query['timeout']!r}"
            )
    tls_flag = query.get("tls", "0").lower()
    if tls_flag not in _TRUE | _FALSE:
        raise BackendSpecError.about(spec, f"tls must be 1 or 0, got {query['tls']!r}")
    ca, cert, key = (query.get(k) or None for k in ("ca", "cert", "key"))
    if (cert is None) != (key is None):
        raise BackendSpecError.about(spec, "a client certificate needs both cert= and key=")
    tls = tls_flag in _TRUE or any(v is not None for v in (ca, cert, key))
    if tls_flag in _FALSE and "tls" in query and tls:
        raise BackendSpecError.about(spec, "tls=0 contradicts ca=, cert= or key=")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _GrpcParts(target, query.get("token_file") or None, flag in _TRUE, timeout, tls, ca, cert, key)
