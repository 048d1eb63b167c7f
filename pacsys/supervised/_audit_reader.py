"""Reading the audit files back: the JSON-lines log (gzip-compressed too, as logrotate leaves
old ones), the binary capture's frames, and the list of a log's rotated files in order.

The formats are described in `pacsys.supervised._audit`, which writes them; this module
imports nothing of the writer, so that the `pacsys-audit` command and other readers need
only this.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "TAG_READ_REPLY",
    "TAG_READ_REQUEST",
    "TAG_SETTING_REPLY",
    "TAG_SETTING_REQUEST",
    "TAG_TYPES",
    "PathLike",
    "audit_files",
    "read_audit",
    "read_audit_proto",
]

TAG_READ_REQUEST = 0
TAG_READ_REPLY = 1
TAG_SETTING_REQUEST = 2
TAG_SETTING_REPLY = 3

# tag -> (method, DAQ_pb2 message name)
TAG_TYPES = {
    TAG_READ_REQUEST: ("Read", "ReadingList"),
    TAG_READ_REPLY: ("Read", "ReadingReply"),
    TAG_SETTING_REQUEST: ("Set", "SettingList"),
    TAG_SETTING_REPLY: ("Set", "SettingReply"),
}

PathLike = str | os.PathLike[str]


def read_audit(path: PathLike) -> Iterator[dict[str, Any]]:
    """Yield the entries of a JSON-lines audit log (gzip-compressed when its name ends in
    ``.gz``, as logrotate leaves old ones); raises ValueError at a malformed line."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON audit entry (truncated write?)") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON object")
            yield entry


def audit_files(path: PathLike) -> list[str]:
    """`path` and the files rotated from it, oldest first, `path` last (when it exists).

    Rotated files are the service's own (``path.1``, newest, ... ``path.N``, with
    ``audit_max_bytes``) and logrotate's (``path-DATE``, or ``path-DATE.gz`` once compressed).
    They are ordered by the time of their first entry, so that both kinds interleave rightly.
    """
    name = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(name))
    rotated = re.compile(re.escape(base) + r"(?:\.(\d+)|-\d[\w-]*)(?:\.gz)?")
    found = []
    for entry in os.listdir(directory):
        match = rotated.fullmatch(entry)
        if match is not None:
            number = int(match.group(1)) if match.group(1) else 0
            found.append((_first_time(os.path.join(directory, entry)), -number, os.path.join(directory, entry)))
    files = [p for _, _, p in sorted(found)]
    return [*files, name] if os.path.exists(name) else files


def _first_time(path: str) -> datetime:
    """The time of a file's first entry; the earliest possible when it has none that reads."""
    try:
        with _open_text(path) as f:
            return datetime.fromisoformat(json.loads(f.readline())["ts"])
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return datetime.min.replace(tzinfo=UTC)


def _open_text(path: PathLike) -> IO[str]:
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


@overload
def read_audit_proto(path: PathLike, decode: Literal[False] = False) -> Iterator[tuple[int, bytes]]: ...
@overload
def read_audit_proto(path: PathLike, decode: Literal[True]) -> Iterator[tuple[int, Message]]: ...
def read_audit_proto(path: PathLike, decode: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(tag, payload)`` per frame of a binary capture; with ``decode`` the payload is parsed
    into its DAQ_pb2 message. Raises ValueError at a truncated or malformed frame."""
    classes: dict[int, Any] = {}
    if decode:  # the generated code is needed only to decode
        from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

        classes = {tag: getattr(DAQ_pb2, name) for tag, (_, name) in TAG_TYPES.items()}
    name = os.fspath(path)
    with open(path, "rb") as f:
        offset = 0
        while tag_byte := f.read(1):
            tag = tag_byte[0]
            if tag not in TAG_TYPES:
                raise ValueError(f"{name}: unknown frame tag {tag} at offset {offset}")
            length, width = _read_varint(f, name, offset)
            payload = f.read(length)
            if len(payload) < length:
                raise ValueError(
                    f"{name}: truncated frame at offset {offset}: {len(payload)} of {length} payload bytes"
                )
            if decode:
                try:
                    yield tag, classes[tag].FromString(payload)
                except Exception as e:  # protobuf's DecodeError
                    raise ValueError(f"{name}: undecodable frame at offset {offset}: {e}") from None
            else:
                yield tag, payload
            offset += 1 + width + length


def _read_varint(f: IO[bytes], name: str, offset: int) -> tuple[int, int]:
    """(value, bytes used) of the length varint of the frame at ``offset``."""
    value = 0
    for i in range(10):  # a 64-bit varint has at most 10 bytes
        byte = f.read(1)
        if not byte:
            raise ValueError(f"{name}: truncated frame at offset {offset}: length cut short")
        value |= (byte[0] & 0x7F) << (7 * i)
        if not byte[0] & 0x80:
            return value, i + 1
    raise ValueError(f"{name}: malformed frame length at offset {offset}")
