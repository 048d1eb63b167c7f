"""Exceptions of the pacsys library, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

from dataclasses import dataclass


class PacsysError(Exception):
    """Base of every pacsys error."""


class DeviceError(PacsysError):
    """A device answered with an error status."""

    def __init__(self, drf: str, facility_code: int, error_code: int, message: str | None = None):
        self.drf = drf
        self.facility_code = facility_code
        self.error_code = error_code
        self.message = message
        super().__init__(f"{drf}: status {facility_code} {error_code}" + (f" ({message})" if message else ""))


class ReadError(PacsysError):
    """A read could not be made (transport or backend failure, not a device status)."""


class WriteError(PacsysError):
    """A write could not be made."""


class AuthenticationError(PacsysError):
    """Missing or rejected credentials."""


class BackendUnavailable(PacsysError):
    """No backend (worker) can serve the request right now; the gateway answers UNAVAILABLE."""


class LimitExceeded(PacsysError):
    """A configured limit was hit; the gateway answers RESOURCE_EXHAUSTED."""


class PolicyDenied(PacsysError, PermissionError):
    """A policy refused the request (here or at an upstream DAQ server); PERMISSION_DENIED."""


# -- one error vocabulary --------------------------------------------------------------------
#
# An exception of a backend, the gRPC status the gateway answers it with, and the name a
# worker reports it by (`workers.protocol.Failed.kind`, the class name: a worker may host
# another pacsys, so classes cannot cross). The servicer, the worker pool and the grpc://
# client backend all read this one table. gRPC codes are named as `grpc.StatusCode` names,
# so this module stays free of gRPC.


@dataclass(frozen=True)
class ErrorKind:
    """One row of the vocabulary: an exception class and its gRPC status code's name."""

    exception: type[Exception]
    code: str
    # details when the exception has no message of its own
    default_details: str = ""


# In order: an exception takes the first row whose class it is an instance of.
ERROR_KINDS: tuple[ErrorKind, ...] = (
    ErrorKind(NotImplementedError, "UNIMPLEMENTED", "not implemented by the backend"),
    ErrorKind(AuthenticationError, "UNAUTHENTICATED"),
    ErrorKind(PolicyDenied, "PERMISSION_DENIED"),
    ErrorKind(BackendUnavailable, "UNAVAILABLE"),
    ErrorKind(LimitExceeded, "RESOURCE_EXHAUSTED"),
    ErrorKind(TimeoutError, "DEADLINE_EXCEEDED", "backend timed out"),
    ErrorKind(ValueError, "INVALID_ARGUMENT"),
)

# gRPC codes of an upstream that mean the same as a row's code: CANCELLED by the upstream is
# a server going away (as UNAVAILABLE), OUT_OF_RANGE a bad argument.
_CODE_ALIASES = {"CANCELLED": "UNAVAILABLE", "OUT_OF_RANGE": "INVALID_ARGUMENT"}
# Worker-reported class names that are subclasses of a row's class (the parser's DRFError).
_KIND_ALIASES = {"DRFError": "ValueError"}

_BY_CODE = {kind.code: kind.exception for kind in ERROR_KINDS}
_BY_NAME = {kind.exception.__name__: kind.exception for kind in ERROR_KINDS}


def grpc_status_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, details) the gateway answers a backend's exception with.

    An exception of no row is a bug somewhere: INTERNAL, naming its class.
    """
    for kind in ERROR_KINDS:
        if isinstance(exc, kind.exception):
            return kind.code, str(exc) or kind.default_details
    return "INTERNAL", f"internal error: {type(exc).__name__}: {exc}"


def exception_for_code(code: str, message: str, fallback: type[Exception]) -> Exception:
    """The exception for an upstream's gRPC status code name, so it is answered with the same code."""
    return _BY_CODE.get(_CODE_ALIASES.get(code, code), fallback)(message)


def exception_for_kind(kind: str, message: str) -> Exception:
    """The exception for a worker's `Failed.kind` (a class name); RuntimeError (INTERNAL) when unknown."""
    return _BY_NAME.get(_KIND_ALIASES.get(kind, kind), RuntimeError)(message)
