"""JSON a caller or a tool can write but a tool or caller can't be given: lone surrogates and out-of-range numbers.

Arguments holding them are INVALID_ARGUMENT naming the field (before any sandbox); a tool printing
them as its JSON result gets its text back with no structured content, never an internal error.
Each probe runs next to its allowed twin.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import LABEL_OWNER, engine, running_supervisor
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.client import ClientError
from toolcell.model import Status

pytestmark = pytest.mark.docker

# (allowed argument text, denied argument text, path named by the refusal)
ARGUMENTS = [
    ('{"code": "print(1)", "x": "\\ud83d\\ude00"}', '{"code": "print(1)", "x": "\\ud800"}', "x"),
    ('{"code": "print(1)", "ok": 1}', '{"code": "print(1)", "\\udc00": 1}', "['\\udc00']"),
    ('{"code": "print(1)", "x": [1e308]}', '{"code": "print(1)", "x": [1e400]}', "x[0]"),
    ('{"code": "print(1)", "x": {"y": -1e308}}', '{"code": "print(1)", "x": {"y": -1e309}}', "x.y"),
]
# Tool output that parses as JSON but can't be sent on as structured content, and its allowed twin.
OUTPUTS = [
    ('{"a": "\\ud83d\\ude00"}', '{"a": "\\ud800"}'),
    ('{"a": 1e308}', '{"a": 1e400}'),
]


async def test_arguments_and_tool_output_with_unrepresentable_json(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path) as (app, client):
        owner = app.supervisor.config.server.instance
        since = int(time.time()) - 1
        for _, denied, path in ARGUMENTS:
            with pytest.raises(ClientError) as info:
                await client.call("python.run", denied)
            assert info.value.code == "INVALID_ARGUMENT", denied
            assert info.value.details.startswith(f"{path}: "), info.value.details
        created = list(docker_client.events(since=since, until=int(time.time()) + 1, decode=True,
                                            filters={"type": "container", "event": "create",
                                                     "label": f"{LABEL_OWNER}={owner}"}))
        assert created == []  # refused before any sandbox
        for allowed, _, _ in ARGUMENTS:
            result = await client.call("python.run", allowed)
            assert result.status is Status.OK and result.output.strip() == "1", allowed
        for allowed, denied in OUTPUTS:
            good = await client.call("python.run", {"code": f"print({allowed!r})"})
            assert good.status is Status.OK and good.structured_content == json.loads(allowed)
            bad = await client.call("python.run", {"code": f"print({denied!r})"})
            assert bad.status is Status.OK and bad.structured_content is None
            assert bad.output.strip() == denied


# Every method, fed bytes that are not its request message, next to the same method fed a valid one.
UNDECODABLE = b"\xff\xff\xff\xff\x0f"
METHODS = [("Call", pb.ExecuteRequest(tool="text.wordcount", arguments_json='{"text": "a"}')),
           ("Execute", pb.ExecuteRequest(tool="text.wordcount", arguments_json='{"text": "a"}')),
           ("ListTools", pb.ListToolsRequest()),
           ("Cancel", pb.CancelRequest(invocation_id="inv_not_running_1")),
           ("OpenSession", pb.OpenSessionRequest(tool="text.wordcount")),
           ("CloseSession", pb.CloseSessionRequest(session_id="ses_" + "0" * 32))]


@pytest.mark.parametrize(("method", "valid"), METHODS, ids=[m for m, _ in METHODS])
async def test_an_undecodable_request_is_invalid_argument_not_unknown(tmp_path: Path, method: str,
                                                                      valid: Any) -> None:
    async with running_supervisor(tmp_path) as (app, client), grpc.aio.insecure_channel(app.address) as channel:
        path = f"/toolcell.v1.Supervisor/{method}"
        rpc = channel.unary_stream(path) if method == "Execute" else channel.unary_unary(path)

        async def send(payload: bytes) -> grpc.StatusCode:
            try:
                result = rpc(payload, timeout=30)
                if method == "Execute":
                    async for _ in result:
                        pass
                else:
                    await result
            except grpc.aio.AioRpcError as exc:
                assert len(exc.details() or "") < 200
                return exc.code()
            return grpc.StatusCode.OK

        denied = await send(UNDECODABLE)
        allowed = await send(valid.SerializeToString())
        assert denied is grpc.StatusCode.INVALID_ARGUMENT
        # Cancel of an id not running, CloseSession of no session; OpenSession of a tool without sessions.
        assert allowed in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
        assert (await client.call("text.wordcount", json.dumps({"text": "still"}))).status is Status.OK
