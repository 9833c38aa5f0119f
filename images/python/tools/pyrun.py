"""python.run: execute the Python source given in the `code` argument (the code-interpreter case).

Tool contract: one JSON object on stdin, the result on stdout, diagnostics on stderr.
    stdin:  {"code": "<python source>"}
The code runs with `exec` as a fresh `__main__` module: whatever it prints streams to stdout as it
happens (run as `python3 -u`; stdout is also switched to line buffering here).  Exit status: 0 when the
code finishes; 1 with the traceback on stderr when it raises (a SyntaxError included); the code's own
`SystemExit` code when it calls `sys.exit`; 2 when the arguments are not as above.

Isolation is the container's job, not this file's: this is a plain interpreter.
"""

from __future__ import annotations

import io
import json
import linecache
import sys
import traceback
import types

FILENAME = "<code>"


def read_code(raw: bytes) -> str:
    """The `code` argument of the JSON document `raw`; ValueError when missing or not a string."""
    args = json.loads(raw)
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    code = args.get("code")
    if not isinstance(code, str):
        raise ValueError('argument "code" must be a string')
    return code


def fresh_main() -> types.ModuleType:
    """A new, empty `__main__` module, installed in sys.modules so pickle/dataclasses/typing find it."""
    module = types.ModuleType("__main__")
    module.__file__ = FILENAME
    sys.modules["__main__"] = module
    sys.argv = [FILENAME]
    return module


def run(code: str) -> int:
    """Execute `code` as `__main__`; 0 on success, 1 (traceback on stderr) on an uncaught exception.

    SystemExit is not caught: it leaves the interpreter with the code's own exit status.
    """
    # Let tracebacks show the offending source lines.
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(keepends=True), FILENAME)
    try:
        compiled = compile(code, FILENAME, "exec", dont_inherit=True)
        # Executing the caller's code is this tool's whole job; the container is the sandbox.
        exec(compiled, fresh_main().__dict__)  # noqa: S102  # nosec B102
    except SystemExit:
        raise
    except BaseException as exc:  # the code's failure, KeyboardInterrupt included, is reported, not raised
        tb = exc.__traceback__
        # Drop this file's own frame so the traceback starts in the caller's code.
        if tb is not None and tb.tb_frame.f_code is run.__code__:
            tb = tb.tb_next
        sys.stdout.flush()
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
        sys.stderr.flush()
        return 1
    return 0


def main() -> int:
    try:
        code = read_code(sys.stdin.buffer.read())
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
        print(f"python.run: invalid arguments: {exc}", file=sys.stderr)
        return 2
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
    status = run(code)
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
