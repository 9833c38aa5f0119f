"""python.repl: the resident form of pyrun.py for sessions: one interpreter, one `__main__`, many calls.

Started once per session, with env TOOLCELL_CALL_FD naming the write end of a pipe to the session host
(refuses to start without it: exit 2). Per call, ONE line on stdin (at most 64 MiB), the same contract as
python.run:
    {"code": "<python source>"}
The code runs with `exec` in the namespace of one `__main__` module kept for the whole session: variables,
imports and functions of earlier calls are there. Output streams as it is printed; once the call is over
stdout and stderr are flushed and `NNN\\n` (the call's status, 3 digits) is written to TOOLCELL_CALL_FD.
Status: 0 when the code finishes; 1 with the traceback on stderr when it raises (shown as `<code-N>`, the
N-th call's source); the code's `SystemExit` code mapped as the interpreter maps it (the session goes on);
2 when the line is not valid arguments. EOF on stdin ends the session: exit 0.

The code's own stdin is empty (input() sees EOF; a child process does not read the next calls).
Isolation is the container's job, not this file's: this is a plain interpreter.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import sys
import traceback
import types
import typing

MAX_LINE = 64 << 20
CHUNK = 1 << 16


def read_call(calls: typing.BinaryIO) -> bytes | None:
    """The next call's line; None at EOF. ValueError for a line over MAX_LINE, skipped to its newline."""
    line = calls.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE and not line.endswith(b"\n"):
        while (rest := calls.readline(CHUNK)) and not rest.endswith(b"\n"):
            pass
        raise ValueError(f"the call line is over {MAX_LINE} bytes")
    return line


def read_code(raw: bytes) -> str:
    """The `code` argument of the JSON document `raw`; ValueError when missing or not a string."""
    try:
        args = json.loads(raw)
    except RecursionError:
        raise ValueError("arguments nested too deep") from None
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    code = args.get("code")
    if not isinstance(code, str):
        raise ValueError('argument "code" must be a string')
    return code


def new_main() -> dict[str, typing.Any]:
    """The namespace of a new, empty `__main__` module, installed in sys.modules (pickle, dataclasses)."""
    module = types.ModuleType("__main__")
    module.__file__ = "<code>"
    sys.modules["__main__"] = module
    sys.argv = ["<code>"]
    return module.__dict__


def exit_status(code: object) -> int:
    """A SystemExit code as the interpreter's exit status: None 0, an int its low byte, else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run(code: str, filename: str, namespace: dict[str, typing.Any]) -> int:
    """Execute `code` in `namespace`: 0, 1 (traceback on stderr) on an exception, a SystemExit's status."""
    # Let tracebacks show the offending source lines, this call's and earlier calls' alike.
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    try:
        compiled = compile(code, filename, "exec", dont_inherit=True)
        # Executing the caller's code is this tool's whole job; the container is the sandbox.
        exec(compiled, namespace)  # noqa: S102  # nosec B102
    except SystemExit as exc:
        return exit_status(exc.code)
    except BaseException as exc:  # the code's failure, KeyboardInterrupt included, is reported, not raised
        tb = exc.__traceback__
        # Drop this file's own frame so the traceback starts in the caller's code.
        if tb is not None and tb.tb_frame.f_code is run.__code__:
            tb = tb.tb_next
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
        return 1
    return 0


def flush() -> None:
    """Flush what the code printed, through whatever sys.stdout/sys.stderr it left in place."""
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


def main() -> int:
    named = os.environ.pop("TOOLCELL_CALL_FD", "")
    try:
        done_fd = int(named)
        os.set_inheritable(done_fd, False)  # the code's child processes do not get it
    except (ValueError, OSError):
        print("python.repl: TOOLCELL_CALL_FD names no open fd: this tool runs only in a session", file=sys.stderr)
        return 2
    # The calls are read from a private copy of stdin; fd 0 becomes an empty pipe for the code.
    calls = os.fdopen(os.dup(0), "rb")
    empty_r, empty_w = os.pipe()
    os.close(empty_w)
    os.dup2(empty_r, 0)
    os.close(empty_r)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
    namespace = new_main()
    count = 0
    while True:
        try:
            line = read_call(calls)
            if line is None:
                return 0
            code = read_code(line)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
            print(f"python.repl: invalid arguments: {exc}", file=sys.stderr)
            status = 2
        else:
            count += 1
            status = run(code, f"<code-{count}>", namespace)
        flush()
        try:
            os.write(done_fd, f"{status:03d}\n".encode())
        except OSError:  # the session host is gone: so is the session
            return 1


if __name__ == "__main__":
    sys.exit(main())
