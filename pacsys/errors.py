"""Exceptions of the pacsys library. The gateway maps them to gRPC status codes."""

from __future__ import annotations


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
