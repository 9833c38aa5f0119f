"""Serve the supervisor's tools on an MCP server (the official ``mcp`` SDK, low-level ``Server``).

``SandboxedTools`` supplies the two handlers an MCP server needs for tools:

- ``list_tools``: every tool the supervisor lists (or the chosen subset) with its name, title,
  description, input/output schema and annotations (derived from the tool's isolation profile by the
  supervisor, the admin's overrides on top);
- ``call_tool``: runs the tool through the supervisor, so it executes in a fresh sandbox. Streamed
  stdout, and a stock MCP server's own progress, become MCP progress notifications when the client's
  request asked for them (a progressToken; this also keeps client-side timeouts alive); MCP
  cancellation sends ``Cancel`` for the invocation and closes the stream (the sandbox is removed); the
  final result becomes a ``CallToolResult``: text content (a stock MCP server's tool: its own content
  blocks, each validated against the SDK's types), structured content when the tool declares an
  output schema, ``isError`` with the status and a readable message when the status is not ok, or the
  server's own ``isError``.

Over HTTP with bearer authentication (``caller_token``), every supervisor call of a request carries the
MCP caller's own verified token, so the supervisor's rules decide what that caller may do; the bridge's
own credentials are never used on a caller's behalf.

Use it as the handlers of a new server (``Server(name, on_list_tools=t.list_tools, on_call_tool=t.call_tool)``)
or ``install`` it on a server that has tools of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from pydantic import BaseModel, ValidationError

from toolcell.client import Client, ClientError, InvalidArgumentError, NotFoundError
from toolcell.model import OutputChunk, Progress, Result, Started, Status, Tool
from toolcell.quoting import printable

log = logging.getLogger("toolcell.mcp")

META_PREFIX = "io.toolcell/"
PROGRESS_MESSAGE_MAX = 2000  # characters of a stdout chunk carried in one progress notification
CANCEL_GRACE_S = 5.0


def mcp_tool(tool: Tool) -> types.Tool:
    """A supervisor tool as an MCP ``Tool`` (the image, command and profile are never exposed)."""
    ann = dict(tool.annotations)
    annotations = types.ToolAnnotations(
        title=ann.get("title") or tool.title or None,
        read_only_hint=ann.get("readOnlyHint"),
        destructive_hint=ann.get("destructiveHint"),
        idempotent_hint=ann.get("idempotentHint"),
        open_world_hint=ann.get("openWorldHint"),
    )
    return types.Tool(
        name=tool.name,
        title=tool.title or None,
        description=tool.description,
        input_schema=dict(tool.input_schema),
        output_schema=dict(tool.output_schema) if tool.output_schema else None,
        annotations=annotations,
    )


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


# MCP's content block types by their ``type``: each block is validated by its own model, so a block is
# never read as another kind (the SDK's ``ContentBlock`` union has no discriminator).
BLOCK_TYPES: dict[str, type[BaseModel]] = {
    "text": types.TextContent, "image": types.ImageContent, "audio": types.AudioContent,
    "resource": types.EmbeddedResource, "resource_link": types.ResourceLink,
}


def content_block(index: int, block: Mapping[str, Any]) -> types.ContentBlock:
    """One of the supervisor's content blocks as the SDK's type; one it rejects becomes a text block saying so.

    The notice names the block's position, its type and the first offending field (all bounded), never
    the block's values.
    """
    kind = block.get("type")
    model = BLOCK_TYPES.get(kind) if isinstance(kind, str) else None
    shown = printable(kind, 32) if isinstance(kind, str) else "(none)"
    if model is None:
        return _text(f"[toolcell: content block {index} has a type MCP does not know: {shown}]")
    try:
        validated: types.ContentBlock = model.model_validate(dict(block))  # type: ignore[assignment]
        return validated
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        return _text(f"[toolcell: content block {index} ({shown}) is not valid MCP content: "
                     f"{printable(where, 80) or 'the block'} {printable(errors[0]['msg'], 120) if errors else ''}]")


def content_blocks(blocks: Sequence[Mapping[str, Any]]) -> list[types.ContentBlock]:
    """The supervisor's content blocks (``Result.content``) as the SDK's, in order, none dropped."""
    return [content_block(i, block) for i, block in enumerate(blocks)]


def call_result(tool: Tool | None, result: Result) -> types.CallToolResult:
    """The supervisor's final ``Result`` as an MCP ``CallToolResult``.

    Structured content is the supervisor's (stdout parsed and validated against the tool's output
    schema); a tool that declares an output schema but produced none is an error, as MCP requires.
    """
    meta: dict[str, Any] = {f"{META_PREFIX}{k}": v for k, v in (
        ("status", result.status.value), ("exit_code", result.exit_code), ("invocation_id", result.invocation_id),
        ("trace_id", result.trace_id), ("duration_ms", result.duration_ms), ("truncated", result.truncated))}
    for key, counts in (("redactions", result.redactions), ("injection_markers", result.injection_markers)):
        if counts:
            meta[f"{META_PREFIX}{key}"] = dict(counts)
    note = "\n[output truncated]" if result.truncated else ""
    name = tool.name if tool else "?"
    if result.content:  # a tool from a stock MCP server: its own blocks
        return _mcp_call_result(tool, result, meta)
    if result.status is not Status.OK:
        lines = [f"Tool {name} ended with status {result.status.value} (exit code {result.exit_code})"
                 + (f": {result.message}" if result.message else "")]
        if result.output:
            lines.append(f"stdout:\n{result.output}")
        if result.stderr:
            lines.append(f"stderr:\n{result.stderr}")
        return types.CallToolResult(content=[_text("\n".join(lines) + note)], is_error=True, _meta=meta)
    if result.structured_content is not None:
        return types.CallToolResult(content=[_text(result.output + note)],
                                    structured_content=dict(result.structured_content), _meta=meta)
    if tool is not None and tool.output_schema is not None:
        return types.CallToolResult(is_error=True, _meta=meta, content=[_text(
            f"Tool {name} declares an output schema but its output is not a JSON object valid against it:\n"
            f"{result.output}{note}")])
    return types.CallToolResult(content=[_text(result.output + note)], _meta=meta)


def _mcp_call_result(tool: Tool | None, result: Result, meta: dict[str, Any]) -> types.CallToolResult:
    """``call_result`` for a Result with content blocks (a stock MCP server's CallToolResult)."""
    blocks = content_blocks(result.content)
    if result.truncated:
        blocks.append(_text("[output truncated]"))
    structured = dict(result.structured_content) if result.structured_content is not None else None
    name = tool.name if tool else "?"
    if result.status is not Status.OK and not result.is_error:  # the sandbox ended it: timeout, OOM, killed ...
        head = (f"Tool {name} ended with status {result.status.value} (exit code {result.exit_code})"
                + (f": {result.message}" if result.message else "")
                + (f"\nstderr:\n{result.stderr}" if result.stderr else ""))
        return types.CallToolResult(content=[_text(head), *blocks], structured_content=structured, is_error=True,
                                    _meta=meta)
    if result.is_error:  # the server's own isError: its content is what the model needs to correct itself
        return types.CallToolResult(content=blocks, structured_content=structured, is_error=True, _meta=meta)
    if structured is None and tool is not None and tool.output_schema is not None:
        return types.CallToolResult(is_error=True, _meta=meta, content=[_text(
            f"Tool {name} declares an output schema but returned no structured content valid against it"), *blocks])
    return types.CallToolResult(content=blocks, structured_content=structured, _meta=meta)


class ProgressRelay:
    """Progress for one MCP request: sandbox start, stdout, and a stock MCP server's own progress.

    Sent through ``report_progress``, a no-op unless the client's request carried a progressToken.
    MCP requires each value to be greater than the last, so a value that is not (or not finite) is
    skipped; a non-finite or negative total is left out.
    """

    def __init__(self, report: Callable[[float, float | None, str | None], Awaitable[None]]) -> None:
        self._report = report
        self._last: float | None = None
        self._stdout_chars = 0

    async def _send(self, value: float, total: float | None, message: str | None) -> None:
        if not math.isfinite(value) or (self._last is not None and value <= self._last):
            return
        self._last = value
        await self._report(value, total, message)

    async def started(self, event: Started) -> None:
        await self._send(0, None, f"running in sandbox (profile {event.profile})")

    async def stdout(self, text: str) -> None:
        self._stdout_chars += len(text)
        await self._send(self._stdout_chars, None, text[-PROGRESS_MESSAGE_MAX:])

    async def progress(self, event: Progress) -> None:
        total = event.total if event.total is not None and math.isfinite(event.total) and event.total >= 0 else None
        await self._send(event.progress, total, event.message[:PROGRESS_MESSAGE_MAX] or None)


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[_text(message)], is_error=True)


class SandboxedTools:
    """MCP tool handlers backed by the supervisor. ``tools``: serve only these names (default: all).

    ``caller_token``: given the HTTP request behind an MCP message (``ctx.request``), the caller's
    verified bearer token. When set, each call goes to the supervisor with that token and a message
    without one is refused (fail closed): the client's own token is never used for a caller.
    """

    def __init__(self, client: Client | None = None, *, target: str | None = None,
                 tools: Iterable[str] | None = None,
                 caller_token: Callable[[Any], str | None] | None = None) -> None:
        self._owns_client = client is None
        self.client = client or Client(target)
        self.only = frozenset(tools) if tools is not None else None
        self.caller_token = caller_token
        self._tools: dict[str, Tool] = {}

    async def __aenter__(self) -> SandboxedTools:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_client:
            await self.client.close()

    async def tools(self, client: Client | None = None) -> list[Tool]:
        """The supervisor's tools (the chosen subset) as ``client`` sees them, refreshed on every call."""
        listed = [t for t in await (client or self.client).list_tools() if self.only is None or t.name in self.only]
        self._tools = {t.name: t for t in listed}  # definitions only: the supervisor decides each call
        return listed

    def client_for(self, ctx: ServerRequestContext[Any]) -> Client:
        """The client to call the supervisor with on behalf of the sender of ``ctx``'s message."""
        if self.caller_token is None:
            return self.client
        token = self.caller_token(ctx.request)
        if not token:
            raise MCPError(types.INVALID_REQUEST, "this MCP server requires an authenticated caller")
        return self.client.with_token(token)  # shares the channel; only the bearer token differs

    # -------------------------------------------------------------------------- MCP handlers

    async def list_tools(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
                         ) -> types.ListToolsResult:
        try:
            tools = await self.tools(self.client_for(ctx))
        except ClientError as exc:
            raise MCPError(types.INTERNAL_ERROR, f"toolcell supervisor: {exc}") from exc
        return types.ListToolsResult(tools=[mcp_tool(t) for t in tools])

    async def call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
                        ) -> types.CallToolResult:
        name = params.name
        if self.only is not None and name not in self.only:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {printable(name)}")
        client = self.client_for(ctx)
        tool = self._tools.get(name)
        if tool is None:
            with contextlib.suppress(ClientError):
                tool = next((t for t in await self.tools(client) if t.name == name), None)
        # Chosen here, so a cancellation that arrives before the sandbox started can still name it.
        invocation_id = "mcp_" + secrets.token_hex(16)
        caller = {"mcp.request_id": printable(str(ctx.request_id), 64)} if ctx.request_id is not None else {}
        events = client.execute(name, dict(params.arguments or {}), invocation_id=invocation_id,
                                     caller_metadata=caller)
        relay = ProgressRelay(ctx.session.report_progress)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Started):
                        await relay.started(event)
                    elif isinstance(event, OutputChunk) and event.stream == "stdout" and event.text:
                        await relay.stdout(event.text)
                    elif isinstance(event, Progress):
                        await relay.progress(event)
                    elif isinstance(event, Result):
                        return call_result(tool, event)
        except anyio.get_cancelled_exc_class():
            await self._cancel(client, invocation_id)
            raise
        except NotFoundError as exc:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {printable(name)}") from exc
        except InvalidArgumentError as exc:
            return error_result(f"Invalid arguments for tool {printable(name)}: {exc.details}")
        except ClientError as exc:
            return error_result(f"Tool {printable(name)} could not run: {exc.code}: {exc.details}")
        return error_result(f"Tool {printable(name)}: the supervisor ended the stream without a result")

    async def _cancel(self, client: Client, invocation_id: str) -> None:
        """The MCP request was cancelled: kill the sandbox (shielded: we are inside a cancelled scope)."""
        with anyio.move_on_after(CANCEL_GRACE_S, shield=True):
            try:
                await client.cancel(invocation_id, timeout=CANCEL_GRACE_S)
                log.info("cancelled %s on MCP request cancellation", invocation_id)
            except ClientError as exc:  # NOT_FOUND: not started yet, or already finished
                log.info("cancel %s: %s", invocation_id, exc)

    # -------------------------------------------------------------------------- installing

    def install(self, server: Server[Any]) -> None:
        """Add the sandboxed tools to ``server``, keeping the tools it already serves (they win on a name clash)."""
        own_list = server.get_request_handler("tools/list")
        own_call = server.get_request_handler("tools/call")

        async def own_tools(ctx: ServerRequestContext[Any]) -> list[types.Tool]:
            if own_list is None:
                return []
            return types.ListToolsResult.model_validate(await own_list.handler(ctx, None)).tools

        async def list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
                             ) -> types.ListToolsResult:
            mine = await own_tools(ctx)
            taken = {t.name for t in mine}
            ours = (await self.list_tools(ctx, params)).tools
            return types.ListToolsResult(tools=[*mine, *(t for t in ours if t.name not in taken)])

        async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
                            ) -> types.CallToolResult:
            if own_call is not None and any(t.name == params.name for t in await own_tools(ctx)):
                return types.CallToolResult.model_validate(await own_call.handler(ctx, params))
            return await self.call_tool(ctx, params)

        server.add_request_handler("tools/list", types.PaginatedRequestParams, list_tools)
        server.add_request_handler("tools/call", types.CallToolRequestParams, call_tool)

def server(tools: SandboxedTools, name: str = "toolcell", **kwargs: Any) -> Server[Any]:
    """A low-level MCP ``Server`` serving exactly ``tools``."""
    from toolcell import __version__

    return Server(name, version=__version__, on_list_tools=tools.list_tools, on_call_tool=tools.call_tool,
                  **kwargs)
