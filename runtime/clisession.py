"""The CLI's sessions and files: ``toolcell session open|close`` and ``toolcell call --session/--file/--out``.

Files the supervisor returns are written under ``--out`` only: each path is checked again here (relative,
no ``..``, no control characters: the supervisor's names are its own checks, the client trusts no peer),
written with ``O_EXCL|O_NOFOLLOW`` so nothing already there (a symlink planted in the directory) is
followed or overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from toolcell.model import OutputFile
from toolcell.workspace import path_problem

# What one ``--file`` may bring (the supervisor's own caps per tool are smaller or equal).
MAX_CLI_FILES_BYTES = 64 * 1024 * 1024


class FileArgumentError(ValueError):
    """A ``--file``/``--out`` problem, said in terms of the command line."""


def read_inputs(specs: Sequence[str]) -> dict[str, bytes]:
    """``LOCAL`` or ``LOCAL=PATH`` (the path in the tool's workspace; default: the local file's name)."""
    files: dict[str, bytes] = {}
    total = 0
    for spec in specs:
        local, sep, remote = spec.partition("=")
        source = Path(local)
        target = remote if sep else source.name
        problem = path_problem(target)
        if problem:
            raise FileArgumentError(f"--file {spec!r}: the workspace path {problem}")
        if target in files:
            raise FileArgumentError(f"--file {spec!r}: {target!r} is given twice")
        try:
            size = source.stat().st_size
            if total + size > MAX_CLI_FILES_BYTES:
                raise FileArgumentError(f"--file: more than {MAX_CLI_FILES_BYTES} bytes in all")
            data = source.read_bytes()
        except OSError as exc:
            raise FileArgumentError(f"--file {spec!r}: {exc.strerror or exc}") from exc
        total += len(data)
        files[target] = data
    return files


def write_outputs(out_dir: str, files: Sequence[OutputFile]) -> list[str]:
    """Write each returned file under ``out_dir`` (created); returns the paths written."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        problem = path_problem(f.path)
        if problem:
            raise FileArgumentError(f"the supervisor returned a file name that {problem}")
        target = root.joinpath(*f.path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError as exc:
            raise FileArgumentError(f"--out: {target} exists already (not overwritten)") from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(f.text.encode() if f.text is not None else f.data)
        written.append(str(target))
    return written
