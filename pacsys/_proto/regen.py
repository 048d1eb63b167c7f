"""Regenerate the DAQ wire-contract modules from proto/.

Usage: python -m pacsys._proto.regen [OUTDIR]   (default OUTDIR: this package)

protoc emits imports rooted at the proto include path (``from controls.common.v1 import ...``),
which only resolve if ``controls`` is top-level; we rewrite them to ``pacsys._proto.controls...``
so the generated code lives inside the pacsys package. The committed output is checked against
a fresh run by tests/test_wire_contract.py, so edit proto/ and re-run this, never the output.
"""

from __future__ import annotations

import re
import shutil
import sys
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"
PACKAGE = "pacsys._proto"
# Top-level proto directory; everything under OUTDIR/<GENERATED_ROOT> is generated and replaced.
GENERATED_ROOT = "controls"

_IMPORT_RE = re.compile(rf"^(from|import) {GENERATED_ROOT}\.", re.MULTILINE)


def regenerate(outdir: Path = PACKAGE_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every .proto under proto_root into outdir; return the files written."""
    from grpc_tools import protoc  # build-time dependency only (grpcio-tools)

    outdir = Path(outdir)
    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")

    # Start from an empty tree so a removed .proto does not leave a stale module behind.
    shutil.rmtree(outdir / GENERATED_ROOT, ignore_errors=True)
    outdir.mkdir(parents=True, exist_ok=True)

    # grpc_tools ships google/protobuf/*.proto (timestamp.proto) as package data.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={outdir}",
        f"--pyi_out={outdir}",
        f"--grpc_python_out={outdir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")

    written = sorted(p for p in (outdir / GENERATED_ROOT).rglob("*") if p.suffix in (".py", ".pyi"))
    for path in written:
        text = path.read_text()
        path.write_text(_IMPORT_RE.sub(rf"\1 {PACKAGE}.{GENERATED_ROOT}.", text))

    # protoc writes no __init__.py; add empty ones so every level is a regular package.
    for d in [outdir / GENERATED_ROOT, *(p for p in (outdir / GENERATED_ROOT).rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return sorted(written)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        raise SystemExit(__doc__)
    outdir = Path(argv[0]) if argv else PACKAGE_DIR
    for path in regenerate(outdir):
        print(path)


if __name__ == "__main__":
    main()
