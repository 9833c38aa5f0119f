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

Sessions: a tool that allows sessions (``Tool.session``) keeps one toolcell session per MCP session, so
its state (a REPL's variables) carries from one ``tools/call`` to the next. The MCP session is the SDK's
per-client ``Connection`` (one per stdio connection, one per Streamable HTTP ``Mcp-Session-Id``; the
SDK's ``ServerSession`` is built anew for every request); stdio served by ``one_client`` is one MCP
session whatever the protocol era. The first call of the tool opens the toolcell session with the
caller's own client; a session the supervisor has ended (idle, its last call, its lifetime) is replaced
by a fresh one and the call says so; the MCP session's end closes its toolcell sessions (the
connection's exit stack), and so does the bridge's own (``close``). A stateless request (a 2026-era
envelope, stateless HTTP) has no MCP session: its call is a one-shot call.

Files: a tool with a workspace (``Tool.workspace``) takes input files in an extra ``_files`` argument
(path with UTF-8 ``text`` or base64 ``blob``), and the files it leaves come back as embedded resources
(``toolcell://files/<path>``) after the text.

Use it as the handlers of a new server (``Server(name, on_list_tools=t.list_tools, on_call_tool=t.call_tool)``)
or ``install`` it on a server that has tools of its own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import math
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote as url_quote

import anyio
import mcp_types as types
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from toolcell.client import Client, ClientError, InvalidArgumentError, NotFoundError, SessionInfo
from toolcell.model import OutputChunk, OutputFile, Progress, Result, Started, Status, Tool, WorkspacePolicy
from toolcell.quoting import printable
from toolcell.workspace import MAX_PATH_CHARS, QUOTE_CHARS, path_problem

log = logging.getLogger("toolcell.mcp")

META_PREFIX = "io.toolcell/"
PROGRESS_MESSAGE_MAX = 2000  # characters of a stdout chunk carried in one progress notification
CANCEL_GRACE_S = 5.0
FILES_ARGUMENT = "_files"  # the extra argument of a tool with a workspace: its input files
FILES_URI = "toolcell://files/"  # + the output file's path, percent-encoded
OPEN_SESSION_TIMEOUT_S = 60.0  # opening a session creates its sandbox
CLOSE_SESSION_TIMEOUT_S = 5.0
REOPENED_NOTE = "[toolcell: a new session was started: earlier state is gone]"
# The supervisor's NOT_FOUND for a session id (as opposed to an unknown tool).
SESSION_GONE = ("the session has ended", "no open session with this id")


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
    input_schema = dict(tool.input_schema)
    if tool.workspace is not None and takes_files(tool):
        input_schema["properties"] = {**(input_schema.get("properties") or {}),
                                      FILES_ARGUMENT: files_schema(tool.workspace)}
    return types.Tool(
        name=tool.name,
        title=tool.title or None,
        description=tool.description,
        input_schema=input_schema,
        output_schema=dict(tool.output_schema) if tool.output_schema else None,
        annotations=annotations,
    )


def takes_files(tool: Tool) -> bool:
    """Whether the bridge adds ``_files`` to ``tool``'s arguments: it has a workspace, and its own schema
    has no property of that name (then the argument is the tool's, passed on as it is)."""
    props = tool.input_schema.get("properties")
    return tool.workspace is not None and (props is None or (isinstance(props, Mapping)
                                                             and FILES_ARGUMENT not in props))


def files_schema(policy: WorkspacePolicy) -> dict[str, Any]:
    """The JSON Schema of ``_files`` for a tool with ``policy``."""
    back = (f" Files the tool leaves in {policy.outputs} come back after its output as embedded resources "
            f"({FILES_URI}<path>)." if policy.outputs else "")
    return {
        "type": "array",
        "maxItems": policy.max_input_files,
        "description": (f"Files written into the tool's workspace ({policy.dir}) before it runs: each a relative "
                        "path and either its UTF-8 text (text) or its bytes in base64 (blob); at most "
                        f"{policy.max_input_files} files and {policy.max_input_bytes} bytes in all.{back}"),
        "items": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS,
                         "description": "relative to the workspace, '/' between components, no '..'"},
                "text": {"type": "string"},
                "blob": {"type": "string", "contentEncoding": "base64"},
            },
            "required": ["path"],
            "oneOf": [{"required": ["text"]}, {"required": ["blob"]}],
            "additionalProperties": False,
        },
    }


def input_files(value: object, policy: WorkspacePolicy) -> dict[str, bytes]:
    """The caller's ``_files`` as ``Client.execute``'s ``files``; ``ValueError`` (a short, bounded message
    naming the entry) when its shape is wrong or it is over the policy's caps. Linear in the value: sizes
    are checked before anything is encoded or decoded. The supervisor checks the paths again, and more."""
    if not isinstance(value, list):
        raise ValueError(f"{FILES_ARGUMENT} must be an array of {{path, text}} or {{path, blob}} objects")
    if len(value) > policy.max_input_files:
        raise ValueError(f"{FILES_ARGUMENT}: at most {policy.max_input_files} files (got {len(value)})")
    files: dict[str, bytes] = {}
    room = policy.max_input_bytes
    too_big = f"{FILES_ARGUMENT}: at most {policy.max_input_bytes} bytes in all"
    for i, entry in enumerate(value):
        where = f"{FILES_ARGUMENT}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        unknown = next((k for k in entry if k not in ("path", "text", "blob")), None)
        if unknown is not None:
            raise ValueError(f"{where} has an unknown property {printable(str(unknown), QUOTE_CHARS)}")
        path = entry.get("path")
        problem = path_problem(path)
        if problem is not None or not isinstance(path, str):  # path_problem refuses a non-string: typed here
            shown = printable(path, QUOTE_CHARS) if isinstance(path, str) else ""
            raise ValueError(f"{where}.path {shown + ' ' if shown else ''}{problem or 'must be a string'}")
        if ("text" in entry) == ("blob" in entry):
            raise ValueError(f"{where} needs exactly one of text and blob")
        if "text" in entry:
            text = entry["text"]
            if not isinstance(text, str):
                raise ValueError(f"{where}.text must be a string")
            if len(text) > room:  # UTF-8 has at least a byte per character
                raise ValueError(too_big)
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}.text is not valid Unicode (lone surrogate)") from None
        else:
            blob = entry["blob"]
            if not isinstance(blob, str):
                raise ValueError(f"{where}.blob must be a base64 string")
            if len(blob) // 4 * 3 - 2 > room:  # its decoded size, less at most two padding bytes
                raise ValueError(too_big)
            try:
                data = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{where}.blob is not valid base64") from None
        if len(data) > room:
            raise ValueError(too_big)
        room -= len(data)
        if path in files:
            raise ValueError(f"{where}.path repeats an earlier path")
        files[path] = data
    return files


def file_block(file: OutputFile) -> types.EmbeddedResource:
    """An output file as an embedded resource: text as text, anything else as a base64 blob."""
    uri = FILES_URI + url_quote(file.path, safe="/")
    meta = {f"{META_PREFIX}size": file.size, f"{META_PREFIX}truncated": file.truncated}
    resource: types.TextResourceContents | types.BlobResourceContents
    if file.text is not None:
        resource = types.TextResourceContents(uri=uri, mime_type=file.media_type, text=file.text, _meta=meta)
    else:
        resource = types.BlobResourceContents(uri=uri, mime_type=file.media_type, _meta=meta,
                                              blob=base64.b64encode(file.data).decode("ascii"))
    return types.EmbeddedResource(type="resource", resource=resource)


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


def call_result(tool: Tool | None, result: Result, notes: Sequence[str] = ()) -> types.CallToolResult:
    """The supervisor's final ``Result`` as an MCP ``CallToolResult``.

    Structured content is the supervisor's (stdout parsed and validated against the tool's output
    schema); a tool that declares an output schema but produced none is an error, as MCP requires.
    ``notes`` (the bridge's own, such as a replaced session) follow as text blocks, then the output
    files as embedded resources.
    """
    mapped = _call_result(tool, result)
    mapped.content.extend(_text(note) for note in notes)
    mapped.content.extend(file_block(f) for f in result.files)
    return mapped


def _call_result(tool: Tool | None, result: Result) -> types.CallToolResult:
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


@dataclass(eq=False)
class _Opened:
    """A toolcell session the bridge opened for one MCP session's calls of one tool. ``client``: the
    caller's client that used it last (closing it uses that caller's token, the freshest one)."""

    session_id: str
    tool: str
    client: Client


@dataclass(eq=False)
class _McpSession:
    """One MCP session's toolcell sessions (one per tool), and a lock per tool so one is opened at a time."""

    open: dict[str, _Opened] = field(default_factory=dict)
    locks: dict[str, anyio.Lock] = field(default_factory=dict)
    ended: bool = False


def lasting_connection(ctx: ServerRequestContext[Any]) -> Connection | None:
    """The connection behind ``ctx`` when it outlives the request: a handshake-era connection with a
    channel of its own (stdio, stateful Streamable HTTP, in-memory). None for a request that is its own
    connection (a 2026-era envelope, stateless HTTP): it has no MCP session to keep anything for.

    The SDK builds a ``ServerSession`` per request; the connection it proxies is its ``_connection``.
    """
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        return None
    if connection.protocol_version in MODERN_PROTOCOL_VERSIONS or not connection.has_standalone_channel:
        return None
    return connection


def session_gone(exc: NotFoundError) -> bool:
    """Whether the supervisor's NOT_FOUND is about the session named (ended, or not this caller's)."""
    return exc.details.startswith(SESSION_GONE)


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
        # MCP session (the SDK's connection) -> its toolcell sessions; gone with the connection.
        self._mcp_sessions: weakref.WeakKeyDictionary[Connection, _McpSession] = weakref.WeakKeyDictionary()
        self._whole: _McpSession | None = None  # ``one_client``: every call is of this one MCP session
        self._opened: dict[str, _Opened] = {}  # every toolcell session opened and not yet closed
        self._closing = False

    async def __aenter__(self) -> SandboxedTools:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every toolcell session the bridge opened, then the client (when this made it)."""
        await self.close_sessions()
        if self._owns_client:
            await self.client.close()

    async def close_sessions(self) -> None:
        """Close every toolcell session the bridge opened (errors ignored: the idle TTL is the backstop);
        sessions opened later, by calls still running, are closed as soon as they are opened."""
        self._closing = True
        for state in [*self._mcp_sessions.values(), *([self._whole] if self._whole else [])]:
            state.ended = True
            state.open.clear()
        await self._close_all(list(self._opened.values()))

    @contextlib.asynccontextmanager
    async def one_client(self) -> AsyncIterator[None]:
        """While inside, every call is of one MCP session (stdio: one process serves one client, whichever
        protocol era it speaks); its toolcell sessions are closed on the way out."""
        state = self._whole = _McpSession()
        try:
            yield
        finally:
            self._whole = None
            await self._end_mcp_session(state)

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

    # -------------------------------------------------------------------------- sessions

    def mcp_session(self, ctx: ServerRequestContext[Any]) -> _McpSession | None:
        """The toolcell sessions of ``ctx``'s MCP session (made on first use), or None: no MCP session."""
        if self._whole is not None:
            return self._whole
        connection = lasting_connection(ctx)
        if connection is None:
            return None
        state = self._mcp_sessions.get(connection)
        if state is None:
            state = self._mcp_sessions[connection] = _McpSession()
            connection.exit_stack.push_async_callback(self._end_mcp_session, state)
        return state

    async def _session(self, state: _McpSession, client: Client, name: str, stale: str = "", key: str = ""
                       ) -> tuple[str, str | None]:
        """The toolcell session of ``state`` for tool ``name``, opened with ``client`` if it has none (or
        only ``stale``, which the supervisor has ended); also a note for the result, or None. ``key``: the
        tool's session scope (a stock MCP server's tools share one session: one server process).

        ("", note): no session could be opened (the per-principal cap ...), the call runs on its own.
        Raises ``NotFoundError``: the supervisor knows no such tool.
        """
        key = key or name
        lock = state.locks.setdefault(key, anyio.Lock())
        async with lock:
            current = state.open.get(key)
            if current is not None and current.session_id != stale:
                return current.session_id, None  # opened by an earlier call (or reopened by a concurrent one)
            if current is not None:
                del state.open[key]
                self._opened.pop(current.session_id, None)
            if state.ended or self._closing:
                return "", None
            info: SessionInfo | None = None
            failed = "DEADLINE_EXCEEDED"
            try:
                # Shielded: a cancelled request must not leave a session open that nobody knows of.
                with anyio.move_on_after(OPEN_SESSION_TIMEOUT_S + 1, shield=True):
                    info = await client.open_session(name, timeout=OPEN_SESSION_TIMEOUT_S)
            except NotFoundError:
                raise
            except ClientError as exc:
                log.info("no session of %s could be opened: %s", name, exc)
                failed = exc.code
            if info is None:
                return "", (f"[toolcell: no session could be opened ({failed}): this call ran on its own, "
                            "and nothing it leaves is kept for the next call]")
            opened = _Opened(info.session_id, name, client)
            if state.ended or self._closing:  # the MCP session (or the bridge) ended meanwhile
                await self._close_all([opened])
                return "", None
            state.open[key] = opened
            self._opened[opened.session_id] = opened
            return opened.session_id, REOPENED_NOTE if stale else None

    def _used(self, state: _McpSession, name: str, session_id: str, client: Client) -> None:
        """A call in ``session_id`` went through with ``client``: close the session with its token."""
        opened = state.open.get(name)
        if opened is not None and opened.session_id == session_id:
            opened.client = client

    async def _end_mcp_session(self, state: _McpSession) -> None:
        """The MCP session is over: close its toolcell sessions."""
        state.ended = True
        opened = list(state.open.values())
        state.open.clear()
        await self._close_all(opened)

    async def _close_all(self, sessions: Sequence[_Opened]) -> None:
        for opened in sessions:
            self._opened.pop(opened.session_id, None)
        if not sessions:
            return
        with anyio.move_on_after(CLOSE_SESSION_TIMEOUT_S + 1, shield=True):
            async with anyio.create_task_group() as tg:
                for opened in sessions:
                    tg.start_soon(self._close_one, opened)

    @staticmethod
    async def _close_one(opened: _Opened) -> None:
        try:
            calls = await opened.client.close_session(opened.session_id, timeout=CLOSE_SESSION_TIMEOUT_S)
            log.info("closed session %s of %s after %d call(s)", opened.session_id, opened.tool, calls)
        except Exception as exc:  # best effort, whatever went wrong: the supervisor's idle TTL ends it anyway
            log.info("close session %s of %s: %s", opened.session_id, opened.tool, exc)

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
        arguments = dict(params.arguments or {})
        files: dict[str, bytes] | None = None
        if tool is not None and tool.workspace is not None and takes_files(tool) and FILES_ARGUMENT in arguments:
            try:
                files = input_files(arguments.pop(FILES_ARGUMENT), tool.workspace)
            except ValueError as exc:
                return error_result(f"Invalid arguments for tool {printable(name)}: {exc}")
        state = self.mcp_session(ctx) if tool is not None and tool.session is not None else None
        key = (tool.session.scope if tool is not None and tool.session is not None else "") or name
        relay = ProgressRelay(ctx.session.report_progress)
        notes: list[str] = []
        session = ""
        try:
            if state is not None:
                session, note = await self._session(state, client, name, key=key)
                notes += [note] if note else []
            try:
                result = await self._execute(ctx, client, relay, name, arguments, files, session)
            except NotFoundError as exc:
                if not (state is not None and session and session_gone(exc)):
                    raise
                log.info("session %s of %s: %s; opening another", session, name, exc.details)
                session, note = await self._session(state, client, name, stale=session, key=key)
                notes += [note] if note else []
                result = await self._execute(ctx, client, relay, name, arguments, files, session)
        except NotFoundError as exc:
            if session and session_gone(exc):
                return error_result(f"Tool {printable(name)} could not run: its session ended: {exc.details}")
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {printable(name)}") from exc
        except InvalidArgumentError as exc:
            return error_result(f"Invalid arguments for tool {printable(name)}: {exc.details}")
        except ClientError as exc:
            return error_result(f"Tool {printable(name)} could not run: {exc.code}: {exc.details}")
        if result is None:
            return error_result(f"Tool {printable(name)}: the supervisor ended the stream without a result")
        if state is not None and session:
            self._used(state, key, session, client)
        return call_result(tool, result, notes)

    async def _execute(self, ctx: ServerRequestContext[Any], client: Client, relay: ProgressRelay, name: str,
                       arguments: dict[str, Any], files: dict[str, bytes] | None, session: str) -> Result | None:
        """Run one call, relaying its progress; its final ``Result`` (None: the stream ended without one)."""
        # Chosen here, so a cancellation that arrives before the sandbox started can still name it.
        invocation_id = "mcp_" + secrets.token_hex(16)
        caller = {"mcp.request_id": printable(str(ctx.request_id), 64)} if ctx.request_id is not None else {}
        events = client.execute(name, arguments, invocation_id=invocation_id, caller_metadata=caller,
                                session=session, files=files)
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
                        return event
        except anyio.get_cancelled_exc_class():
            await self._cancel(client, invocation_id)
            raise
        return None

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
