"""The `pacsys-supervisor` command: the entry point, which parses the command line and hands over.

    pacsys-supervisor [serve options]          serve DAQ (the default; `serve` may be given)
    pacsys-supervisor check-config|probe|status|explain ...
                                               the admin commands (`admin.py`)
    pacsys-supervisor --version

The serve options are derived from `pacsys.settings.Settings` (one option per
setting whose metadata has ``flag``, and one ``PACSYS_SUPERVISOR_<SETTING>`` environment
variable each); the command line wins over the environment, which wins over the config file.
Exit status (`reporting.py`): 0 after a clean stop, 2 for a usage or configuration error, 3 for
a start that failed (port in use, audit log not writable, backend that cannot be built, workers
not ready). The running service and its signals are `service.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pacsys.settings import FIELDS, ConfigError, Field, env_settings, flag_name, read_config_file, settings_from
from pacsys.supervised import admin
from pacsys.supervised._arguments import ArgumentParser
from pacsys.supervised.reporting import EXIT_USAGE, PROG, configure_service_logging, report_error, version
from pacsys.supervised.service import Service

__all__ = ["main", "serve_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = admin.COMMANDS.get(args[0]) if args else None
        if command is not None:
            return command(args[1:])
        if args and args[0] == "serve":
            args = args[1:]
        return _serve(args)
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


# -- serve options, derived from Settings ---------------------------------------------------------


def _default_text(f: Field) -> str:
    if f.default is None:
        return "unset"
    if isinstance(f.default, tuple):
        return " ".join(f.default) or "none"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def serve_parser() -> argparse.ArgumentParser:
    """The serve command's options: one per setting whose metadata has ``flag``."""
    parser = ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [serve] [options]\n"
        + "\n".join(f"       {sub.format_usage()[7:].rstrip()}" for sub in admin.subparsers()),
        description="Serve the DAQ gRPC service with policies, audit and supervised backend workers.",
        epilog=(
            "Every option is also an environment variable, PACSYS_SUPERVISOR_<SETTING> (e.g.\n"
            "PACSYS_SUPERVISOR_WORKERS=4). The command line wins over the environment, which wins\n"
            "over the config file. Writes are denied unless --allow-writes or a policy grants them.\n\n"
            "exit status: 0 stopped cleanly, 2 usage or configuration error, 3 the start failed\n"
            "(port in use, audit log not writable, backend that cannot be built, workers not ready)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    groups: dict[str, Any] = {}
    exclusive: Any = None
    for f in FIELDS.values():
        if not f.flag:
            continue
        group = groups.get(f.section)
        if group is None:
            group = groups[f.section] = parser.add_argument_group(f.section.lower())
        if f.name in ("token", "token_file"):
            if exclusive is None:
                exclusive = group.add_mutually_exclusive_group()
            group = exclusive
        kind = f.kind
        help_text = f"{f.help} (default: {_default_text(f)})".replace("%", "%%")
        names = [flag_name(f.name)] + (["-c"] if f.name == "config" else [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.metavar:
            kwargs["metavar"] = f.metavar
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(nargs="+", action="extend")
        elif kind is int or kind is float:
            kwargs["type"] = admin.number_type(kind)
            kwargs.setdefault("metavar", "N" if kind is int else "X")
        elif f.choices:
            kwargs["metavar"] = "{" + ",".join(c.lower() if f.name == "log_level" else c for c in f.choices) + "}"
        group.add_argument(*names, **kwargs)
    return parser


def overrides_from(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by field name."""
    return {name: getattr(ns, name) for name in FIELDS if getattr(ns, name, None) is not None}


def _serve(argv: list[str]) -> int:
    ns = serve_parser().parse_args(argv)
    overrides = overrides_from(ns)
    try:
        env = env_settings()
        config = overrides.get("config") or env.get("config")
        file_values = read_config_file(config) if config else {}
        settings = settings_from(file_values, overrides, env=env, source=config)
    except ConfigError as exc:
        return report_error(exc)
    configure_service_logging(settings)
    return Service(settings, overrides, env).run()


if __name__ == "__main__":
    sys.exit(main())
