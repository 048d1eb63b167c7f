"""Reading a bearer token from a file: the service's `token_file` and `admin_token_file`, the
status command's `--token-file` and the grpc:// backend's `token_file` all read it this way."""

from __future__ import annotations

__all__ = ["TokenFileError", "read_token_file"]


class TokenFileError(ValueError):
    """A token file that cannot be read or holds no token; the message starts with its path."""


def read_token_file(path: str) -> str:
    """The token in the file at `path`, surrounding whitespace stripped (never empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenFileError(f"{path}: cannot read it: {type(exc).__name__}: {reason}") from None
    if not token:
        raise TokenFileError(f"{path} is empty")
    return token
