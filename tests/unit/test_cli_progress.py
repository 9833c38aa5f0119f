"""`toolcell call` with a tool from an MCP server: progress on stderr; --json carries content and is_error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from collections.abc import AsyncGenerator
from typing import Any
from unittest import mock

from toolcell import cli
from toolcell.model import Event, Progress, Result, Status, Usage

CONTENT = ({"type": "text", "text": "12:00"}, {"type": "image", "data": "AA==", "mimeType": "image/png"})
EVENTS: list[Event] = [
    Progress(1, 4, "warming\x1b[2J up"), Progress(2.5, None, ""),
    Result(status=Status.ERROR, exit_code=0, output="12:00", stderr="", truncated=False, duration_ms=1,
           usage=Usage(), trace_id="t", invocation_id="i", content=CONTENT, is_error=True),
]


class Scripted:
    """Stands in for the gRPC client: streams EVENTS."""

    async def __aenter__(self) -> Scripted:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return

    async def execute(self, tool: str, arguments: str, **kw: Any) -> AsyncGenerator[Event, None]:
        for event in EVENTS:
            yield event


async def call(*, as_json: bool) -> tuple[str, str]:
    """Run ``toolcell call`` against ``Scripted``; its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(cli, "_client", lambda args: Scripted()), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await cli._call(argparse.Namespace(args="{}", tool="time.now", timeout=None, json=as_json,
                                                 session=None, file=None, out=None))
    assert code == cli.EXIT_STATUS
    return out.getvalue(), err.getvalue()


def test_call_prints_texts_and_progress() -> None:
    out, err = asyncio.run(call(as_json=False))
    assert out == "12:00\n"  # the blocks' texts: an MCP server's tool streams no stdout
    assert err.splitlines()[:3] == ["toolcell: progress 1/4 warming\\x1b[2J up", "toolcell: progress 2.5",
                                    "toolcell: 1 non-text content block(s), shown by --json"]
    assert "status=error" in err and "is_error=true" in err


def test_call_json_carries_content_and_is_error() -> None:
    out, err = asyncio.run(call(as_json=True))
    printed = json.loads(out)
    assert (printed["content"], printed["is_error"], printed["output"]) == ([dict(b) for b in CONTENT], True, "12:00")
    assert "progress" not in err
