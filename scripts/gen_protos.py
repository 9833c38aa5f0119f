#!/usr/bin/env python3
"""Regenerate runtime/api/v1 from proto/. CI runs this and fails when git shows a diff.

Usage: python scripts/gen_protos.py [--check]
"""

from __future__ import annotations

import re
import subprocess  # nosec B404 - runs grpc_tools.protoc from this venv with fixed arguments
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "runtime" / "api" / "v1"
PROTOS = ["toolcell/v1/supervisor.proto"]


def generate(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS,
        ]
        subprocess.run(cmd, check=True)  # noqa: S603 # nosec B603 - fixed argv
        gen = Path(tmp) / "toolcell" / "v1"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(gen.glob("*.py*")):
            text = src.read_text()
            # Generated code imports "toolcell.v1"; our package lives at runtime.api.v1.
            text = re.sub(r"^from toolcell\.v1 import", "from . import", text, flags=re.M)
            (dest / src.name).write_text(text)


def main() -> int:
    check = "--check" in sys.argv
    if not check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [p.name for p in Path(tmp).iterdir() if (OUT / p.name).read_text() != p.read_text()]
    if stale:
        print(f"generated protobuf code is stale: {stale}; run scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("generated protobuf code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
