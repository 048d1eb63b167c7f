"""TLS for the service: the certificate files, read at start and again on SIGHUP.

gRPC asks for the server's certificate configuration at each new handshake
(`grpc.dynamic_ssl_server_credentials`); `ServerTLS.reload()` reads the files and hands the
new configuration to the next handshake, so a renewed certificate takes effect without a
restart and without dropping open connections.

With a client CA the service does mutual TLS: every client must present a certificate that
CA signed, and its subject (``CN=ops1,O=Fermilab``) is the client's identity for policies,
limits and the audit log.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

__all__ = ["ServerTLS", "TLSFiles"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM file paths: the service's certificate chain and key, and optionally a client CA."""

    cert: str
    key: str
    client_ca: str | None = None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files read now; OSError (or ValueError for an empty file) names the one at fault."""
        key, cert = _read(self.key), _read(self.cert)
        ca = _read(self.client_ca) if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" not in data:
        raise ValueError(f"{path}: not a PEM file")
    return data


class ServerTLS:
    """The credentials of the service's port, with their files re-read by `reload()`."""

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._next: grpc.ServerCertificateConfiguration | None = None
        initial = files.configuration()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=files.client_ca is not None
        )

    def reload(self) -> None:
        """Read the files again; the next handshake uses them. Raises (and changes nothing) on an error."""
        config = self.files.configuration()
        with self._lock:
            self._next = config

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake: None keeps the configuration it has.
        with self._lock:
            config, self._next = self._next, None
        return config
