"""JSON a caller or a tool can write but a tool or caller can't be given: lone surrogates and out-of-range numbers.

Arguments holding them are INVALID_ARGUMENT naming the field (before any sandbox); a tool printing
them as its JSON result gets its text back with no structured content, never an internal error.
Each probe runs next to its allowed twin.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runtime.client import ClientError
from runtime.model import Status
from runtime.policy.plan import LABEL_OWNER
from tests.support import engine, running_supervisor

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
