"""Proto <-> model mapping. The only place generated message types meet model values."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.errors import InvalidArguments
from toolcell.model import (
    Event,
    InputFile,
    InvocationRequest,
    OutputChunk,
    OutputFile,
    Progress,
    Result,
    SessionPolicy,
    Started,
    Status,
    Tool,
    WorkspacePolicy,
)
from toolcell.sessions.config import session_scope

# The most content_json a client parses: gRPC's default receive limit, which bounds the whole message
# anyway (the client does not raise it); checked again here so the parse never depends on that default.
CONTENT_JSON_MAX_CHARS = 4 * 1024 * 1024

STATUS_TO_PB = {
    Status.OK: pb.STATUS_OK,
    Status.ERROR: pb.STATUS_ERROR,
    Status.TIMEOUT: pb.STATUS_TIMEOUT,
    Status.OOM: pb.STATUS_OOM,
    Status.KILLED: pb.STATUS_KILLED,
    Status.DENIED: pb.STATUS_DENIED,
    Status.INVALID: pb.STATUS_INVALID,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}


# Whole doubles up to this magnitude are exact: they become JSON integers (a Struct has only doubles).
_EXACT_INT = 2 ** 53
# A Struct this large (serialized) is converted off the event loop.
STRUCT_INLINE_BYTES = 64 * 1024


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT:
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def arguments_text(msg: pb.ExecuteRequest) -> str:
    """The call's arguments as JSON text: ``arguments_json``, or the ``arguments`` Struct written as JSON.
    ``InvalidArguments`` for a Struct JSON cannot hold (NaN, infinities). Both given: ``check_arguments_fields``
    refuses the request."""
    if not msg.HasField("arguments"):
        return msg.arguments_json
    try:
        value = _whole(json_format.MessageToDict(msg.arguments))
    except (ValueError, RecursionError) as exc:
        raise InvalidArguments("arguments: a number is NaN or infinite, or the value nests too deep "
                               "(JSON can hold neither)") from exc
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def check_arguments_fields(msg: pb.ExecuteRequest) -> None:
    """INVALID_ARGUMENT when a request gives its arguments twice."""
    if msg.arguments_json and msg.HasField("arguments"):
        raise InvalidArguments("give arguments_json or arguments (a Struct), not both")


def request_from_pb(msg: pb.ExecuteRequest, deadline_s: float | None,
                    arguments_json: str | None = None) -> InvocationRequest:
    return InvocationRequest(
        tool=msg.tool,
        arguments_json=msg.arguments_json if arguments_json is None else arguments_json,
        invocation_id=msg.invocation_id,
        caller_metadata=dict(msg.caller_metadata),
        deadline_s=deadline_s,
        session_id=msg.session_id,
        files=tuple(InputFile(path=f.path, data=bytes(f.content)) for f in msg.files),
    )


def file_to_pb(f: OutputFile) -> pb.File:
    return pb.File(path=f.path, content=f.data, text=f.text or "", is_text=f.text is not None, size=f.size,
                   truncated=f.truncated, media_type=f.media_type)


def file_from_pb(f: pb.File) -> OutputFile:
    return OutputFile(path=f.path, size=f.size, data=bytes(f.content), text=f.text if f.is_text else None,
                      truncated=f.truncated, media_type=f.media_type)


def result_to_pb(result: Result) -> pb.Result:
    return pb.Result(
        status=STATUS_TO_PB[result.status],
        exit_code=result.exit_code,
        output=result.output,
        stderr=result.stderr,
        truncated=result.truncated,
        duration_ms=result.duration_ms,
        usage=pb.Usage(peak_memory_bytes=result.usage.peak_memory_bytes, cpu_time_ns=result.usage.cpu_time_ns),
        trace_id=result.trace_id,
        invocation_id=result.invocation_id,
        message=result.message,
        stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes,
        sandbox_id=result.sandbox_id,
        redactions=dict(result.redactions),
        sanitized=dict(result.sanitized),
        injection_markers=dict(result.injection_markers),
        structured_content_json=(json.dumps(result.structured_content, ensure_ascii=False)
                                 if result.structured_content is not None else ""),
        egress=[pb.EgressDestination(host=d.host, port=d.port, allowed=d.allowed, reason=d.reason,
                                     connections=d.connections, bytes_up=d.bytes_up, bytes_down=d.bytes_down)
                for d in result.egress],
        content_json=content_to_json(result.content),
        is_error=result.is_error,
        files=[file_to_pb(f) for f in result.files],
        session_id=result.session_id,
    )


def _notice(text: str) -> dict[str, Any]:
    return {"type": "text", "text": f"[toolcell: {text}]"}


def content_to_json(content: Sequence[Mapping[str, Any]]) -> str:
    """MCP content blocks as compact JSON text ("" for none: a plain tool).

    The blocks are already sanitized; a value JSON can't carry (NaN, a non-JSON type) is a bug upstream,
    reported in a text block instead of failing the whole result. A lone surrogate becomes "?", so the
    string always encodes as the UTF-8 protobuf requires.
    """
    if not content:
        return ""
    try:
        text = json.dumps([dict(block) for block in content], ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps([_notice("the tool's content could not be encoded as JSON")], separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def content_from_json(text: str) -> tuple[dict[str, Any], ...]:
    """content_json as content blocks, parsed with bounds (the client trusts the server less than fully).

    Never raises and never drops silently: an unreadable array becomes one text block saying so, an
    element that is not a JSON object with a string ``type`` becomes a text block saying so.
    """
    if not text:
        return ()
    if len(text) > CONTENT_JSON_MAX_CHARS:
        return (_notice(f"the supervisor sent content_json over {CONTENT_JSON_MAX_CHARS} characters"),)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return (_notice("the supervisor sent content_json that is not JSON"),)
    if not isinstance(value, list):
        return (_notice("the supervisor sent content_json that is not a JSON array"),)
    return tuple(block if isinstance(block, dict) and isinstance(block.get("type"), str)
                 else _notice("the supervisor sent a content block that is not an object with a type")
                 for block in value)


def event_to_pb(event: Event) -> pb.ExecuteEvent:
    if isinstance(event, Started):
        return pb.ExecuteEvent(started=pb.Started(
            invocation_id=event.invocation_id, sandbox_id=event.sandbox_id, profile=event.profile,
            tool=event.tool, trace_id=event.trace_id))
    if isinstance(event, OutputChunk):
        chunk = pb.OutputChunk(text=event.text)
        return pb.ExecuteEvent(stdout=chunk) if event.stream == "stdout" else pb.ExecuteEvent(stderr=chunk)
    if isinstance(event, Progress):
        return pb.ExecuteEvent(progress=pb.Progress(progress=event.progress, total=event.total,
                                                    message=event.message))
    return pb.ExecuteEvent(result=result_to_pb(event))


def tool_to_pb(tool: Tool) -> pb.Tool:
    ann = tool.annotations
    annotations = pb.ToolAnnotations(title=str(ann.get("title", tool.title)))
    for key, field in (("readOnlyHint", "read_only_hint"), ("destructiveHint", "destructive_hint"),
                       ("idempotentHint", "idempotent_hint"), ("openWorldHint", "open_world_hint")):
        if key in ann:
            setattr(annotations, field, bool(ann[key]))
    return pb.Tool(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        input_schema_json=json.dumps(dict(tool.input_schema), sort_keys=True),
        output_schema_json=json.dumps(dict(tool.output_schema), sort_keys=True) if tool.output_schema else "",
        annotations=annotations,
        allows_sessions=tool.session is not None,
        session_idle_ttl_seconds=tool.session.idle_ttl_s if tool.session is not None else 0.0,
        session_max_calls=tool.session.max_calls if tool.session is not None else 0,
        takes_files=tool.workspace is not None,
        max_input_files=tool.workspace.max_input_files if tool.workspace is not None else 0,
        max_input_bytes=tool.workspace.max_input_bytes if tool.workspace is not None else 0,
        returns_files=bool(tool.workspace is not None and tool.workspace.outputs),
        session_scope=session_scope(tool) if tool.session is not None else "",
    )


def result_from_pb(msg: pb.Result) -> Result:
    from toolcell.model import EgressDestination, Usage

    return Result(
        status=PB_TO_STATUS.get(msg.status, Status.ERROR),
        exit_code=msg.exit_code,
        output=msg.output,
        stderr=msg.stderr,
        truncated=msg.truncated,
        duration_ms=msg.duration_ms,
        usage=Usage(peak_memory_bytes=msg.usage.peak_memory_bytes, cpu_time_ns=msg.usage.cpu_time_ns),
        trace_id=msg.trace_id,
        invocation_id=msg.invocation_id,
        message=msg.message,
        stdout_bytes=msg.stdout_bytes,
        stderr_bytes=msg.stderr_bytes,
        sandbox_id=msg.sandbox_id,
        redactions=dict(msg.redactions),
        sanitized=dict(msg.sanitized),
        injection_markers=dict(msg.injection_markers),
        structured_content=json.loads(msg.structured_content_json) if msg.structured_content_json else None,
        egress=tuple(EgressDestination(host=d.host, port=d.port, allowed=d.allowed, reason=d.reason,
                                       connections=d.connections, bytes_up=d.bytes_up, bytes_down=d.bytes_down)
                     for d in msg.egress),
        content=content_from_json(msg.content_json),
        is_error=msg.is_error,
        files=tuple(file_from_pb(f) for f in msg.files),
        session_id=msg.session_id,
    )


def event_from_pb(msg: pb.ExecuteEvent) -> Event:
    kind = msg.WhichOneof("event")
    if kind == "started":
        s = msg.started
        return Started(invocation_id=s.invocation_id, sandbox_id=s.sandbox_id, profile=s.profile, tool=s.tool,
                       trace_id=s.trace_id)
    if kind == "stdout":
        return OutputChunk(stream="stdout", text=msg.stdout.text)
    if kind == "stderr":
        return OutputChunk(stream="stderr", text=msg.stderr.text)
    if kind == "progress":
        p = msg.progress
        return Progress(progress=p.progress, total=p.total if p.HasField("total") else None, message=p.message)
    return result_from_pb(msg.result)


def tool_from_pb(msg: pb.Tool) -> Tool:
    annotations: dict[str, object] = {}
    a = msg.annotations
    if a.title:
        annotations["title"] = a.title
    for key, field in (("readOnlyHint", "read_only_hint"), ("destructiveHint", "destructive_hint"),
                       ("idempotentHint", "idempotent_hint"), ("openWorldHint", "open_world_hint")):
        if a.HasField(field):
            annotations[key] = getattr(a, field)
    return Tool(
        name=msg.name, title=msg.title, description=msg.description, image="", command=(),
        input_schema=json.loads(msg.input_schema_json or '{"type": "object"}'),
        output_schema=json.loads(msg.output_schema_json) if msg.output_schema_json else None,
        annotations=annotations,
        # What a client needs to know of the admin's terms (the rest stays with the supervisor).
        session=SessionPolicy(idle_ttl_s=msg.session_idle_ttl_seconds, max_calls=msg.session_max_calls,
                              scope=msg.session_scope or msg.name)
        if msg.allows_sessions else None,
        workspace=WorkspacePolicy(dir="", outputs="returned" if msg.returns_files else "",
                                  max_input_files=msg.max_input_files, max_input_bytes=msg.max_input_bytes)
        if msg.takes_files else None,
    )
