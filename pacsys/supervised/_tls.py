"""TLS for the service: the certificate files, checked and read at start and again on SIGHUP.

gRPC asks for the server's certificate configuration at each new handshake
(`grpc.dynamic_ssl_server_credentials`); `ServerTLS.reload()` reads the files and hands the
new configuration to the next handshake, so a renewed certificate takes effect without a
restart and without dropping open connections.

gRPC itself reports nothing about files it cannot use: a certificate with garbage inside
its markers, or a key of another certificate, is accepted here and fails every handshake
later (and at start it shows as a failure to bind). So the files are checked as a pair
before gRPC gets them, by the same bytes: every certificate decodes, the key decodes and
belongs to the first certificate, the client CA decodes. A file that fails is a
`TLSFileError` naming the setting, the file and the reason; at start that is a
configuration error, on reload the running files stay.

With a client CA the service does mutual TLS: every client must present a certificate that
CA signed, and its subject (``CN=ops1,O=Fermilab``) is the client's identity for policies,
limits and the audit log.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import logging
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from pacsys.settings import ConfigError

__all__ = ["Certificate", "ServerTLS", "TLSFileError", "TLSFiles"]

logger = logging.getLogger("pacsys.supervised")

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


class TLSFileError(ConfigError):
    """A TLS file the service cannot use: `key` is its setting, `path` the file."""

    def __init__(self, setting: str, path: str, reason: str):
        super().__init__(f"'{setting}' {path}: {reason}", key=setting)
        self.path = path


@dataclass(frozen=True)
class Certificate:
    """What the log says of the service's certificate (the first of its chain)."""

    serial: str  # hexadecimal, as `openssl x509 -serial` prints it
    not_before: datetime.datetime
    not_after: datetime.datetime


@dataclass(frozen=True)
class TLSFiles:
    """PEM file paths: the service's certificate chain and key, and optionally a client CA."""

    cert: str
    key: str
    client_ca: str | None = None

    def load(self) -> tuple[grpc.ServerCertificateConfiguration, Certificate]:
        """The files read now and checked as a pair; TLSFileError names the one at fault and why."""
        cert = _read("tls_cert", self.cert)
        key = _read("tls_key", self.key)
        first = _certificates("tls_cert", self.cert, cert)[0]
        _check_pair(self, cert, key)
        ca = None
        if self.client_ca is not None:
            ca = _read("tls_client_ca", self.client_ca)
            _certificates("tls_client_ca", self.client_ca, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), first

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return self.load()[0]

    def check(self) -> Certificate:
        """Check the files (TLSFileError); the service's certificate."""
        return self.load()[1]


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSFileError(setting, path, f"cannot read it: {exc.strerror or exc}") from None


def _certificates(setting: str, path: str, pem: bytes) -> list[Certificate]:
    """Every certificate of a PEM file, decoded (by OpenSSL, and here for serial and validity)."""
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        what = "a private key, not a certificate" if b"PRIVATE KEY-----" in pem else "no PEM certificate in it"
        raise TLSFileError(setting, path, what)
    found: list[Certificate] = []
    for n, block in enumerate(blocks, 1):
        where = f"certificate {n} of {len(blocks)}" if len(blocks) > 1 else "the certificate"
        try:
            der = base64.b64decode(b"".join(block.split()), validate=True)
            found.append(_decoded(der))
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=der)
        except (binascii.Error, ValueError, IndexError, ssl.SSLError) as exc:
            raise TLSFileError(setting, path, f"{where} does not decode ({exc})") from None
    return found


def _check_pair(files: TLSFiles, cert: bytes, key: bytes) -> None:
    """The key decodes and belongs to the certificate (OpenSSL's own check, on these bytes)."""

    def encrypted() -> bytes:
        raise TLSFileError("tls_key", files.key, "the key is encrypted: the service needs it without a passphrase")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _as_file(cert) as cert_path, _as_file(key) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=encrypted)
        except ssl.SSLError as exc:
            if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
                raise TLSFileError("tls_key", files.key, f"does not match the certificate {files.cert}") from None
            raise TLSFileError("tls_key", files.key, "not a private key that decodes (PEM)") from None


@contextlib.contextmanager
def _as_file(data: bytes) -> Iterator[str]:
    """A path that reads `data`: the ssl module loads certificates and keys from files only.

    In memory where the system allows it (Linux), else in a private temporary directory.
    """
    try:
        fd = os.memfd_create("pacsys-tls-check", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, or a seccomp filter that refuses it
        fd = None
    if fd is not None:
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as directory:  # mode 0700
        path = os.path.join(directory, "pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        yield path


# -- the few fields of a certificate the log shows (X.509 in DER: RFC 5280, section 4.1) -----


def _element(data: bytes, at: int) -> tuple[int, bytes, int]:
    """(tag, content, offset after it) of the DER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4:
            raise ValueError("bad DER length")
        length, at = int.from_bytes(data[at : at + size], "big"), at + size
    if at + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[at : at + length], at + length


def _decoded(der: bytes) -> Certificate:
    """Serial number and validity of a DER certificate."""
    tag, certificate, _ = _element(der, 0)
    tag2, tbs, _ = _element(certificate, 0)
    if (tag, tag2) != (0x30, 0x30):
        raise ValueError("not an X.509 certificate")
    tag, content, at = _element(tbs, 0)
    if tag == 0xA0:  # [0] version, present from v2 on
        tag, content, at = _element(tbs, at)
    if tag != 0x02:
        raise ValueError("no serial number")
    serial = (content.lstrip(b"\0") or b"\0").hex().upper()
    for _skipped in ("signature algorithm", "issuer"):
        _, _, at = _element(tbs, at)
    tag, validity, _ = _element(tbs, at)
    if tag != 0x30:
        raise ValueError("no validity")
    t1, start, after = _element(validity, 0)
    t2, end, _ = _element(validity, after)
    return Certificate(serial, _time(t1, start), _time(t2, end))


def _time(tag: int, text: bytes) -> datetime.datetime:
    value = text.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 1950 to 2049
        value = ("19" if int(value[:2]) >= 50 else "20") + value
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("bad time")
    return datetime.datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


class ServerTLS:
    """The credentials of the service port's servers, with their files re-read by `reload()`.

    Each gRPC server on the port takes credentials of its own (`credentials()`: gRPC binds one
    server per dynamic credentials object); a reload reaches every one of them at its next
    handshake.
    """

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._config, certificate = files.load()
        self._generation = 0  # reloads so far
        _log_loaded(files, certificate)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one more server of the port, serving the files as last (re)loaded."""
        with self._lock:
            initial, seen = self._config, self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each handshake: None keeps the configuration it has.
            nonlocal seen
            with self._lock:
                if seen == self._generation:
                    return None
                seen = self._generation
                return self._config

        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=self.files.client_ca is not None
        )

    def reload(self) -> None:
        """Read the files again; the next handshakes use them. Raises TLSFileError (and changes nothing)."""
        config, certificate = self.files.load()
        with self._lock:
            self._config = config
            self._generation += 1
        _log_loaded(self.files, certificate)


def _log_loaded(files: TLSFiles, certificate: Certificate) -> None:
    logger.info(
        "event=tls_certificate_loaded cert=%s serial=%s not_before=%s not_after=%s",
        files.cert,
        certificate.serial,
        certificate.not_before.isoformat(),
        certificate.not_after.isoformat(),
    )
    now = datetime.datetime.now(datetime.UTC)
    if not certificate.not_before <= now <= certificate.not_after:
        logger.warning(
            "event=tls_certificate_not_valid_now cert=%s not_before=%s not_after=%s",
            files.cert,
            certificate.not_before.isoformat(),
            certificate.not_after.isoformat(),
        )
