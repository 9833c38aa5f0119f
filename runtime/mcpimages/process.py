"""Run one host command (pip, npm, docker) with its output in a log file; show only the log's tail.

The argv is always a list built by this package from checked values; no shell is involved.
"""

from __future__ import annotations

import os
import subprocess  # nosec B404 - fixed programs (pip, npm, docker), argv lists, no shell
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Completed:
    """How a command ended; ``tail`` is the last lines of its combined output, printable and bounded."""

    status: int
    tail: str
    timed_out: bool = False


def run_logged(argv: Sequence[str], log: Path, *, timeout: float, cwd: Path | None = None,
               env: Mapping[str, str] | None = None, lines: int = 25) -> Completed:
    """Run ``argv`` with stdout+stderr to ``log``; never raises for a failing command (OSError aside)."""
    with open(log, "wb") as out:
        try:
            done = subprocess.run(  # noqa: S603  # nosec B603 - see the module docstring
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                env=dict(env) if env is not None else None, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            return Completed(status=-1, tail=tail(log, lines), timed_out=True)
    return Completed(status=done.returncode, tail=tail(log, lines))


def tail(log: Path, lines: int = 25, width: int = 300) -> str:
    """The last ``lines`` lines of ``log`` (each cut to ``width``), non-printable characters replaced."""
    try:
        size = os.path.getsize(log)
        with open(log, "rb") as f:
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read(_TAIL_BYTES)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    kept = [line.rstrip()[:width] for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("".join(c if c.isprintable() else "?" for c in line) for line in kept)
