"""The in-sandbox MCP driver's command and frame keys. Pure (no I/O beyond reading package data).

A tool from a stock MCP server runs ``driver_command(server command)``: the driver
(``runtime/data/mcp_driver.py``, standard library only, isolated mode, inline source) spawns the server,
initializes it before reading its one request line on stdin, and reports frames on stdout.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

PROGRESS = "progress"
REFUSED = "refused"
TOOLS = "tools"
RESULT = "result"
ERROR = "error"
FINAL_KINDS = (TOOLS, RESULT, ERROR)
# The driver's own failures (an error frame it wrote, exit status 1) carry this JSON-RPC code.
DRIVER_ERROR_CODE = -32000
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 143


@cache
def driver_source() -> str:
    return resources.files("toolcell.data").joinpath("mcp_driver.py").read_text()


def driver_command(server_command: Sequence[str], python: str = "python3", *, session: bool = False
                   ) -> tuple[str, ...]:
    """The sandbox's command: the driver in front of the server (``server_command``, run as given).

    ``session``: the resident form for a session (``--session``): one server for many request lines, each
    call's status line on ``TOOLCELL_CALL_FD``."""
    return (python, "-I", "-c", driver_source(), *(("--session",) if session else ()), "--", *server_command)
