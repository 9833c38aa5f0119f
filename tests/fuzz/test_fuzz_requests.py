"""Fuzz request handling through a real grpc.aio supervisor on the real engine.

A bounded batch of malformed Execute/Call/Cancel requests (bad tool names, huge or odd ids and
metadata, argument texts with lone surrogates and 1e400): each gets a clean, expected gRPC status
with a short printable message (never UNKNOWN or INTERNAL), no sandbox is left, and a normal call
still succeeds afterwards. Hypothesis drives the requests from a worker thread over a blocking
channel while the supervisor serves on the test's event loop.

200 requests in the normal run; ``TOOLCELL_FUZZ_EXAMPLES`` for a long pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    BAD_NUMBERS,
    BAD_STRINGS,
    MIB,
    any_text,
    argument_texts,
    decoded_bytes,
    fuzz_settings,
    huge_text,
    metadata_like,
    name_like,
)
from tests.support import config_doc, engine, serving
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.quoting import quote
from toolcell.settings import parse_config

pytestmark = pytest.mark.docker

# Well under the supervisor's 4 MiB receive limit, over its 1 MiB argument limit.
MAX_FIELD = MIB + 64 * 1024
# A refusal is quick; a request that is not refused in time shows a stall (or a sandbox that should
# not have started). Generous: a loaded 2-core machine.
CALL_TIMEOUT_S = 20.0
DETAILS_MAX = 512
VALID_TOOLS = ["text.wordcount", "python.run"]
CLEAN = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})
INVALID = frozenset({grpc.StatusCode.INVALID_ARGUMENT})

good_id = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_.:-]{8,128}", fullmatch=True))
good_metadata = st.dictionaries(st.from_regex(r"[a-z./_-]{1,20}", fullmatch=True), st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40), max_size=4)
_VALID_TOOL = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_VALID_ID = re.compile(r"[A-Za-z0-9_.:-]{8,128}")
bad_tool = st.one_of(st.just(""), st.just("t" * 129), huge_text, name_like).filter(
    lambda s: not _VALID_TOOL.fullmatch(s))
unknown_tool = st.from_regex(r"[a-z]{1,20}\.[a-z0-9_:-]{1,40}", fullmatch=True).filter(
    lambda s: s not in [*VALID_TOOLS, "ghost"])
bad_id = st.one_of(st.just("a" * 7), st.just("a" * 129), st.just("x" * MIB), huge_text, any_text).filter(
    lambda s: s != "" and not _VALID_ID.fullmatch(s))
bad_metadata = st.one_of(
    st.just({f"k{i}": "v" for i in range(33)}), st.just({"k" * 65: "v"}), st.just({"a": "x" * 1025}),
    st.just({"a b": "v"}), st.just({"a": "x\x1b[2Jy"}), st.just({f"k{i}": "x" * 1000 for i in range(9)}),
    st.builds(lambda v: {"a": v}, huge_text.filter(lambda s: len(s.encode("utf-8", "surrogatepass")) > 1024)),
    metadata_like.filter(lambda m: len(m) > 32 or any(
        not k or len(k) > 64 or len(v.encode("utf-8", "surrogatepass")) > 1024 for k, v in m.items())),
)


def _bad_value_in(tool: str, token: str) -> str:
    field = "text" if tool == "text.wordcount" else "code"
    return '{"' + field + '": ' + token + "}"


bad_arguments = st.one_of(
    st.builds(_bad_value_in, st.sampled_from(VALID_TOOLS), st.sampled_from(BAD_NUMBERS + BAD_STRINGS)),
    st.sampled_from(['{"text": "a", "text": "b"}', "[1]", "nope", '{"\\ud800": 1}', '{"code": ["\\udc00"]}',
                     '{"text": "' + "x" * MIB + '"}', "[" * MIB]),
    st.builds(lambda t: '{"text": {"x": ' + t + "}}", argument_texts),
    decoded_bytes.filter(lambda s: not s.strip(" \t\r\n").startswith("{")),
)
valid_arguments = st.sampled_from(['{"text": "one two"}', '{"code": "print(1)"}'])


class Case:
    """One malformed request; its repr (what hypothesis prints for a failure) quotes every field short."""

    def __init__(self, defect: str, request: pb.ExecuteRequest, expected: frozenset[grpc.StatusCode]) -> None:
        self.defect = defect
        self.request = request
        self.expected = expected

    def __repr__(self) -> str:
        r = self.request
        meta = ", ".join(f"{quote(k, 24)}: {quote(v, 24)}" for k, v in list(r.caller_metadata.items())[:4])
        return (f"Case({self.defect}, tool={quote(r.tool, 48)}, invocation_id={quote(r.invocation_id, 48)}, "
                f"caller_metadata={{{meta}}} ({len(r.caller_metadata)} entries), "
                f"arguments_json={quote(r.arguments_json, 80)}, expected={sorted(c.name for c in self.expected)})")


@st.composite
def malformed(draw: st.DrawFn) -> Case:
    """A request with one defect (or all fields random), and the statuses it may get."""
    defect = draw(st.sampled_from(["tool", "unknown_tool", "invocation_id", "caller_metadata", "arguments",
                                   "size", "chaos"]))
    tool = draw(st.sampled_from(VALID_TOOLS))
    fields = {"tool": tool, "invocation_id": draw(good_id), "caller_metadata": draw(good_metadata),
              "arguments_json": _bad_value_in(tool, '"ok"') if defect != "arguments" else ""}
    expected = INVALID
    if defect == "tool":
        fields["tool"] = draw(bad_tool)
    elif defect == "unknown_tool":
        fields["tool"] = draw(unknown_tool)
        expected = frozenset({grpc.StatusCode.NOT_FOUND})
    elif defect == "invocation_id":
        fields["invocation_id"] = draw(bad_id)
    elif defect == "caller_metadata":
        fields["caller_metadata"] = draw(bad_metadata)
    elif defect == "arguments":
        fields["arguments_json"] = draw(bad_arguments)
    elif defect == "size":
        fields["tool"] = draw(st.one_of(st.sampled_from(VALID_TOOLS), unknown_tool))
        fields["arguments_json"] = '{"text": "' + "y" * (MIB + draw(st.integers(0, 1000))) + '"}'
    else:
        fields = {"tool": draw(name_like), "invocation_id": draw(name_like), "caller_metadata": draw(metadata_like),
                  "arguments_json": draw(argument_texts)}
        expected = CLEAN
    for key in ("tool", "invocation_id", "arguments_json"):
        fields[key] = fields[key][:MAX_FIELD]
    # Protobuf strings are UTF-8: a caller cannot send a lone surrogate raw, only as a JSON escape.
    encoded = {k: v.encode("utf-8", "replace").decode("utf-8") for k, v in fields.items() if isinstance(v, str)}
    metadata = {k.encode("utf-8", "replace").decode()[:MAX_FIELD]: v.encode("utf-8", "replace").decode()[:MAX_FIELD]
                for k, v in fields["caller_metadata"].items()}
    return Case(defect, pb.ExecuteRequest(caller_metadata=metadata, **encoded), expected)


def check_status(invoke: Callable[[], object], expected: frozenset[grpc.StatusCode], what: str) -> None:
    try:
        response = invoke()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in expected, f"{what}: {code.name} {details[:300]!a}"
        assert len(details) <= DETAILS_MAX, f"{what}: {len(details)}-character message {details[:300]!a}"
        assert details.isprintable(), f"{what}: unprintable message {details[:300]!a}"
        return
    raise AssertionError(f"{what}: accepted ({type(response).__name__}), expected {sorted(c.name for c in expected)}")


def fuzz_against(address: str) -> None:
    """Runs in a worker thread: blocking channel, hypothesis examples one after another."""
    options = [("grpc.max_send_message_length", 8 * MIB)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.SupervisorStub(channel)  # type: ignore[no-untyped-call]

        @fuzz_settings(200)
        @given(malformed(), st.sampled_from(["Call", "Execute"]))
        @example(Case("arguments", pb.ExecuteRequest(tool="text.wordcount", arguments_json='{"text": "\\ud800"}'),
                      INVALID), "Call")
        @example(Case("arguments", pb.ExecuteRequest(tool="python.run", arguments_json='{"code": "", "x": 1e400}'),
                      INVALID), "Call")
        @example(Case("tool", pb.ExecuteRequest(tool="a." * (MIB // 2), arguments_json="{}"), INVALID), "Call")
        @example(Case("invocation_id", pb.ExecuteRequest(tool="text.wordcount", invocation_id="a." * (MIB // 2),
                                                         arguments_json='{"text": "x"}'), INVALID), "Call")
        @example(Case("caller_metadata", pb.ExecuteRequest(tool="text.wordcount", arguments_json='{"text": "x"}',
                                                           caller_metadata={"k" * 100_000: "v" * 100_000}), INVALID),
                 "Call")
        def one_request(case: Case, method: str) -> None:
            request, expected = case.request, case.expected
            what = f"{method}: {case!r}"
            if method == "Execute":
                check_status(lambda: list(stub.Execute(request, timeout=CALL_TIMEOUT_S)), expected, what)
            else:
                check_status(lambda: stub.Call(request, timeout=CALL_TIMEOUT_S), expected, what)

        @fuzz_settings(50)
        @given(st.one_of(any_text, huge_text.map(lambda s: s[:MAX_FIELD]), st.just(""), st.just("a" * 7),
                         st.from_regex(r"[A-Za-z0-9_.:-]{8,128}", fullmatch=True)))
        def one_cancel(invocation_id: str) -> None:
            request = pb.CancelRequest(invocation_id=invocation_id.encode("utf-8", "replace").decode())
            check_status(lambda: stub.Cancel(request, timeout=CALL_TIMEOUT_S), CLEAN,
                         f"Cancel of a {len(invocation_id)}-character id")

        one_request()
        one_cancel()


async def test_malformed_requests_get_clean_statuses_and_leave_nothing(tmp_path: Path) -> None:
    engine()
    owner = f"test-{uuid.uuid4().hex[:10]}"
    config = parse_config(config_doc(owner, str(tmp_path / "toolcell.sock")), environ={}, base_dir=tmp_path)
    # Every request here is refused, on purpose and fast: no per-peer refusal budget in this test.
    config = dataclasses.replace(config, security=dataclasses.replace(config.security, refusals_per_peer=None))
    async with serving(config) as (app, client):
        await asyncio.to_thread(fuzz_against, app.address)
        # The supervisor still serves an ordinary call; ``serving`` then asserts no sandbox is left.
        result = await client.call("text.wordcount", {"text": "still serving"})
        assert result.status.value == "ok" and json.loads(result.output)["words"] == 2
