"""Supervisor values -> MCP values: tools (schemas, annotations) and results (content, isError, _meta)."""

from __future__ import annotations

from toolcell.mcp import call_result, mcp_tool
from toolcell.model import Result, Status, Tool, Usage

SCHEMA = {"type": "object", "properties": {"words": {"type": "integer"}}}


def result(status: Status = Status.OK, output: str = "", **kw: object) -> Result:
    base: dict[str, object] = dict(status=status, exit_code=0, output=output, stderr="", truncated=False,
                                   duration_ms=5, usage=Usage(), trace_id="t" * 32, invocation_id="mcp_1")
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def tool(output_schema: dict[str, object] | None = None) -> Tool:
    return Tool(name="t", description="d", image="", command=(), title="T", output_schema=output_schema,
                input_schema={"type": "object", "properties": {"x": {"type": "string"}}},
                annotations={"readOnlyHint": True, "openWorldHint": False, "title": "Admin title"})


def test_tool_maps_name_schemas_and_annotations() -> None:
    t = mcp_tool(tool(SCHEMA))
    assert (t.name, t.title, t.description) == ("t", "T", "d")
    assert t.input_schema == {"type": "object", "properties": {"x": {"type": "string"}}}
    assert t.output_schema == SCHEMA
    assert t.annotations is not None and t.annotations.title == "Admin title"
    assert (t.annotations.read_only_hint, t.annotations.open_world_hint, t.annotations.destructive_hint) == (
        True, False, None)  # unknown hints stay unset: the client applies MCP's conservative defaults


def test_ok_result_text_structured_and_meta() -> None:
    r = call_result(tool(SCHEMA), result(output='{"words": 2}', structured_content={"words": 2},
                                         redactions={"aws_key": 1}))
    assert r.is_error is False and r.structured_content == {"words": 2}
    assert r.content[0].text == '{"words": 2}'  # type: ignore[union-attr]
    assert r.meta is not None and r.meta["io.toolcell/trace_id"] == "t" * 32
    assert r.meta["io.toolcell/redactions"] == {"aws_key": 1}
    plain = call_result(tool(), result(output="hello\n", truncated=True))
    assert plain.structured_content is None and plain.content[0].text == "hello\n\n[output truncated]"  # type: ignore[union-attr]


def test_declared_schema_without_structured_content_is_an_error() -> None:
    r = call_result(tool(SCHEMA), result(output="not json"))
    assert r.is_error is True and "declares an output schema" in r.content[0].text  # type: ignore[union-attr]


def test_non_ok_status_is_error_with_status_message_and_output() -> None:
    r = call_result(tool(), result(Status.TIMEOUT, output="before\n", exit_code=137, stderr="warn\n",
                                   message="exceeded the 3s timeout"))
    assert r.is_error is True and r.meta is not None and r.meta["io.toolcell/status"] == "timeout"
    assert r.content[0].text == (  # type: ignore[union-attr]
        "Tool t ended with status timeout (exit code 137): exceeded the 3s timeout\nstdout:\nbefore\n\nstderr:\nwarn\n")
