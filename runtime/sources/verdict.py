"""One MCP tool call's request line and its verdict from the driver's frames. Pure.

Status comes first from what the engine and the supervisor saw (``pipeline.decide``: timeout, cancel, OOM,
exit status); the frames can only make it worse: a JSON-RPC error, ``isError``, no result, a result over
the cap, or frames that are not the driver's protocol. Then the same output policy as any tool: every
text scrubbed, prompt-injection markers blocked or wrapped, structured content checked against the
tool's output schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

from toolcell.model import McpBinding, Status
from toolcell.output import Collected
from toolcell.policy.profile import OutputPolicy
from toolcell.policy.scrub import Redactor, detect_injection, wrap_untrusted
from toolcell.sources.frames import FrameReader
from toolcell.sources.result import Scrubbed, call_content, error_message

_ENGINE_STATUSES = (Status.TIMEOUT, Status.KILLED, Status.OOM)


def call_request(source: McpBinding, arguments: Mapping[str, Any], cap: int) -> bytes:
    """The driver's one stdin line for ``tools/call``: the server's tool name, the validated arguments."""
    request = {"op": "call", "name": source.name, "arguments": arguments, "max_line": cap,
               "roots": None if source.roots is None else [dict(r) for r in source.roots]}
    return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def list_request(cap: int) -> bytes:
    """The driver's stdin line for discovery."""
    return json.dumps({"op": "list", "max_line": cap}).encode() + b"\n"


def _frames_status(status: Status, message: str, frames: FrameReader, cap: int) -> tuple[Status, str]:
    if status in _ENGINE_STATUSES:
        return status, message
    if frames.invalid:
        return Status.ERROR, f"the sandbox's MCP output is invalid: {frames.invalid}"
    if frames.final is None:
        if frames.truncated:
            return Status.ERROR, f"the server's result exceeds the output cap (stdout_max_bytes: {cap} bytes)"
        return (Status.ERROR, "the MCP driver ended without a result") if status is Status.OK else (status, message)
    return status, message


def mcp_verdict(status: Status, message: str, frames: FrameReader, collected: Collected, policy: OutputPolicy,
                output_validator: Draft202012Validator | None, redactor: Redactor, *,
                exit_code: int) -> dict[str, Any]:
    """The Result fields of one MCP tool call (``status``/``message`` from ``pipeline.decide``)."""
    s = Scrubbed(redactor)
    status, message = _frames_status(status, message, frames, policy.stdout_max_bytes)
    content: tuple[Mapping[str, Any], ...] = ()
    structured: Mapping[str, Any] | None = None
    is_error = False
    final = frames.final if status not in _ENGINE_STATUSES and not frames.invalid else None
    if final is not None:
        kind, body = ("tools", final) if "tools" in final else next(iter(final.items()))
        if kind == "error":
            status, message = Status.ERROR, f"the MCP server failed: {error_message(body, s)}"
        elif kind == "result":
            call = call_content(body, s)
            content, structured, is_error = call.blocks, call.structured, call.is_error
            if status is Status.OK and is_error:
                message = "the tool reported an error (isError)"
                status = Status.ERROR
            if call.dropped:
                note = f"{call.dropped} content block(s) dropped as invalid"
                message = f"{message}; {note}" if message else note
            if structured is not None and output_validator is not None and \
                    next(output_validator.iter_errors(structured), None) is not None:
                structured = None
                note = "structured content does not match the tool's output schema: dropped"
                message = f"{message}; {note}" if message else note
        else:
            status, message = Status.ERROR, "the MCP driver answered a call with a tool list"
    budget = collected.budget
    if budget.exceeded:
        cut = (f"output cut: scrubbing it took over its budget ({budget.limit_s:g} s CPU); "
               f"{budget.dropped_bytes} bytes withheld")
        message = f"{message}; {cut}" if message else cut
    stderr = collected.stderr.text
    output = "\n".join(str(b["text"]) for b in content if b.get("type") == "text")
    markers = detect_injection("\n".join(s.texts)) + detect_injection(stderr)
    if markers and policy.injection == "block":
        kinds = ", ".join(sorted(markers))
        status, message = Status.DENIED, f"output withheld: prompt-injection markers found ({kinds})"
        output, stderr, content, structured = "", "", (), None
    elif markers and policy.injection == "wrap":
        content = tuple({**b, "text": wrap_untrusted(str(b["text"]), markers)} if b.get("type") == "text" else b
                        for b in content)
        output, structured = wrap_untrusted(output, markers), None
    return {"status": status, "message": message, "output": output, "stderr": stderr,
            "injection_markers": dict(markers), "structured_content": structured, "content": content,
            "is_error": is_error, "redactions": collected.redactions + s.redactions,
            "sanitized": collected.sanitized + s.sanitized}
