"""What a start checks beyond the settings themselves: the files and secrets they name.

The bearer token and the Admin/Status token (read from their files), the TLS files (readable
and PEM) and the audit files (could be opened for appending). The service runs them when it
starts and on each reload; `check-config` runs them too, so that a file it passes also starts.
Each failure is a `ConfigError` naming the setting.
"""

from __future__ import annotations

import os

from pacsys.settings import ConfigError, Settings
from pacsys.supervised._tls import TLSFiles
from pacsys.token_file import TokenFileError, read_token_file

__all__ = ["check_files", "resolve_admin_token", "resolve_token", "tls_files"]


def check_files(settings: Settings) -> None:
    """ConfigError when an audit file could not be opened for appending, as start-up would find.

    Checked without creating anything: the file, when it exists, must be a writable regular
    file; when it does not, its directory must exist and be writable.
    """
    for key in ("audit_path", "audit_proto_path"):
        path = getattr(settings, key)
        if path is None:
            continue
        problem = _append_problem(path)
        directory = os.path.dirname(os.path.abspath(path))
        if problem is None and settings.audit_max_bytes and not os.access(directory, os.W_OK | os.X_OK):
            problem = f"its directory {directory} is not writable by this user (audit_max_bytes renames files there)"
        if problem is not None:
            raise ConfigError(f"'{key}' {path}: {problem}", key=key, body=problem)


def _append_problem(path: str) -> str | None:
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "is not writable by this user"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"its directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable by this user"
    return None


def resolve_token(settings: Settings) -> str | None:
    """The bearer token: `token`, or the stripped contents of `token_file`, or None."""
    if settings.token is not None:
        return settings.token
    return _read_token_file(settings.token_file, "token_file")


def resolve_admin_token(settings: Settings) -> str | None:
    """The Admin/Status token: the stripped contents of `admin_token_file`, or None."""
    return _read_token_file(settings.admin_token_file, "admin_token_file")


def _read_token_file(path: str | None, key: str) -> str | None:
    if path is None:
        return None
    try:
        return read_token_file(path)
    except TokenFileError as exc:
        raise ConfigError(f"'{key}' {exc}", key=key) from None


def tls_files(settings: Settings) -> TLSFiles | None:
    """The service's TLS files (None: plaintext), checked now as a pair (`_tls.TLSFiles.check`)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = TLSFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    files.check()  # a TLSFileError is a ConfigError naming the setting, the file and the reason
    return files
