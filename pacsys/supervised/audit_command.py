"""The ``pacsys-audit`` command: who read or set what, and when, from a pacsys audit log.

    pacsys-audit FILE [--all] [--proto] [--device PATTERN] [--method Read|Set] [--since ISO] [--json]

It reads the files that `pacsys.supervised._audit.AuditLog` writes, with its readers
(`read_audit`, `read_audit_proto`); `--all` reads FILE's rotated files first, oldest first
(`audit_files`). Exit status 0, or 1 when a file cannot be read or is damaged.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.json_format import MessageToDict

from pacsys.drf_utils import guess_device_name
from pacsys.supervised._arguments import ArgumentParser
from pacsys.supervised._audit import summarize_reply
from pacsys.supervised._audit_reader import (
    TAG_READ_REQUEST,
    TAG_SETTING_REQUEST,
    TAG_TYPES,
    audit_files,
    read_audit,
    read_audit_proto,
)
from workers.logformat import escape_value

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pacsys-audit`` command; returns the exit status."""
    parser = ArgumentParser(
        prog="pacsys-audit", description="Print who read or set what, and when, from a pacsys audit log."
    )
    parser.add_argument("file", metavar="FILE", help="JSON-lines audit log, or the binary capture with --proto")
    parser.add_argument(
        "--all",
        action="store_true",
        help="also FILE's rotated files (FILE.N, FILE-DATE[.gz]), oldest first, then FILE",
    )
    parser.add_argument("--proto", action="store_true", help="FILE is the binary capture (replies carry no devices)")
    parser.add_argument("--device", metavar="PATTERN", help="only requests naming a matching device (glob)")
    parser.add_argument("--method", choices=("Read", "Set"), help="only this RPC")
    parser.add_argument(
        "--since",
        metavar="ISO",
        type=_parse_since,
        help="only entries at or after this ISO 8601 time: 2026-11-27, 2026-11-27T08:00 (local time without a zone)",
    )
    parser.add_argument("--json", action="store_true", help="print the selected entries as JSON lines")
    args = parser.parse_args(argv)
    if args.proto and args.since:
        parser.error("--since needs the JSON log: the binary capture has no timestamps")
    if args.proto and args.all:
        parser.error("--all needs the JSON log: the binary capture has no timestamps to order its files by")
    device = re.compile(fnmatch.translate(args.device), re.IGNORECASE) if args.device else None
    try:
        if args.proto:
            _print_frames(args.file, device, args.method, args.json)
        else:
            files = (audit_files(args.file) if args.all else []) or [args.file]
            _print_entries(files, device, args.method, args.since, args.json)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`pacsys-audit ... | head`): stop quietly. Point stdout at /dev/null
        # so that the interpreter's own flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"pacsys-audit: {e.filename or args.file}: cannot read it: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"pacsys-audit: {e}", file=sys.stderr)
        return 1
    return 0


def _parse_since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes an ISO 8601 date or time, such as 2026-11-27 or 2026-11-27T08:00 (local time without a zone), "
            f"got {text!r}"
        ) from None
    return when if when.tzinfo else when.astimezone()


def _cell(value: object) -> str:
    """A value in the table, escaped as the service log escapes it: a line break, a terminal escape
    or a bidi control from a client cannot end a row, rewrite one or reorder it (a backslash is
    doubled so that an escape cannot be faked)."""
    text = value if isinstance(value, str) else json.dumps(value)
    if text.isprintable() and "\\" not in text:
        return text
    return escape_value(text, sys.maxsize)[1:-1]  # quoted, with every such character escaped


def _names_device(drfs: Sequence[str], device: re.Pattern[str]) -> bool:
    return any(device.fullmatch(guess_device_name(drf)) for drf in drfs)


def _entries(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    for path in paths:
        yield from read_audit(path)


def _print_entries(
    paths: Sequence[str], device: re.Pattern[str] | None, method: str | None, since: datetime | None, as_json: bool
) -> None:
    for path in paths:
        open(path, "rb").close()  # a file that cannot be read is said before the header
    if not as_json:
        print(f"{'TIME':<32} {'SEQ':>5} {'IDENTITY':<24} {'PEER':<24} {'METHOD':<6} {'RESULT':<8} DETAIL")
    chosen: dict[int, bool] = {}  # seq -> whether its request was selected
    for entry in _entries(paths):
        if entry.get("dir") == "in":
            drfs = entry.get("drfs", []) + entry.get("final_drfs", [])
            selected = (method is None or entry.get("method") == method) and (
                device is None or _names_device(drfs, device)
            )
            chosen[entry.get("seq", -1)] = selected
        elif entry.get("dir") == "summary":
            # Requests not recorded one by one: any of them may name the device asked for.
            selected = method is None or method in entry.get("methods", {})
        else:  # replies and events follow their request's selection
            selected = chosen.get(entry.get("seq", -1), device is None and method is None)
        if not selected or (since is not None and datetime.fromisoformat(entry.get("ts", "")) < since):
            continue
        print(json.dumps(entry) if as_json else _entry_row(entry))


def _entry_row(e: dict[str, Any]) -> str:
    kind = e.get("dir")
    if kind == "in":
        result = "allowed" if e.get("allowed") else "DENIED"
        if "values" in e:
            detail = ", ".join(f"{_cell(drf)}={_cell(value)}" for drf, value in e["values"])
        else:
            detail = ", ".join(_cell(drf) for drf in e.get("drfs", []))
        detail += _left_out(e.get("drfs_left_out"))
        if "final_drfs" in e:
            detail += " => " + ", ".join(_cell(drf) for drf in e["final_drfs"])
            detail += _left_out(e.get("final_drfs_left_out"))
        if e.get("reason"):
            detail += f"  ({_cell(e['reason'])})"
        # Who: the certificate's subject under mutual TLS, else the address (without its port).
        identity, peer, method = e.get("identity") or "-", e.get("peer", ""), e.get("method", "")
    else:
        result = {"out": "reply", "summary": "summary"}.get(kind or "") or e.get("event", "event")
        standard: tuple[str, ...] = ("ts", "seq", "dir", "event", "method")
        if kind == "summary":  # a client's requests not recorded one by one: who, in the columns
            standard += ("identity", "peer")
            identity, peer = e.get("identity") or "-", e.get("peer", "")
        else:
            identity, peer = "", ""
        detail = " ".join(f"{_cell(k)}={_cell(v)}" for k, v in e.items() if k not in standard)
        method = e.get("method", "-")
    cells = [_cell(e.get(key, "")) for key in ("ts", "seq")] + [_cell(x) for x in (identity, peer, method, result)]
    ts, seq, identity, peer, method, result = cells
    return f"{ts:<32} {seq:>5} {identity:<24} {peer:<24} {method:<6} {result:<8} {detail}"


def _left_out(left_out: Any) -> str:
    """What an entry says it left out of a DRF list, as the end of its detail."""
    if not isinstance(left_out, dict):
        return ""
    return f" ... and {_cell(left_out.get('count'))} more DRFs (sha256 {_cell(left_out.get('sha256'))[:16]})"


def _print_frames(path: str, device: re.Pattern[str] | None, method: str | None, as_json: bool) -> None:
    open(path, "rb").close()  # a file that cannot be read is said before the header
    if not as_json:
        print(f"{'FRAME':>6} {'TYPE':<13} DETAIL")
    for n, (tag, message) in enumerate(read_audit_proto(path, decode=True)):
        frame_method, type_name = TAG_TYPES[tag]
        if method is not None and frame_method != method:
            continue
        if device is not None:
            drfs = list(getattr(message, "drf", [])) or [s.device for s in getattr(message, "setting", [])]
            if not _names_device(drfs, device):
                continue
        if as_json:
            print(json.dumps({"frame": n, "tag": tag, "type": type_name, "message": MessageToDict(message)}))
        else:
            print(f"{n:>6} {type_name:<13} {_frame_detail(tag, message)}")


def _frame_detail(tag: int, m: Any) -> str:
    if tag == TAG_READ_REQUEST:
        return ", ".join(_cell(drf) for drf in m.drf)
    if tag == TAG_SETTING_REQUEST:
        return ", ".join(f"{_cell(s.device)}={_cell(_proto_value(s.value))}" for s in m.setting)
    return " ".join(f"{k}={_cell(v)}" for k, v in summarize_reply(TAG_TYPES[tag][0], m).items())


def _proto_value(value: Any) -> object:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    inner = getattr(value, kind)
    if kind == "raw":
        return inner.hex()
    return MessageToDict(inner) if hasattr(inner, "DESCRIPTOR") else inner


if __name__ == "__main__":
    sys.exit(main())
