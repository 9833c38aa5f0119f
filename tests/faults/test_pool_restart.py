"""A warm pool across a real engine restart: rebuilt, and serving warm again, without a supervisor restart.

Restarts the shared Docker engine, so it is marked ``engine_restart`` and runs where the engine-restart
fault test runs (CI, or TOOLCELL_ALLOW_ENGINE_RESTART=1); tests/integration/test_pool.py covers the
same path on a shared engine by killing the pool's containers instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.test_faults import restart_engine, wait_engine
from tests.support import config_doc, running_supervisor
from toolcell.model import Result, Started, Status

pytestmark = [pytest.mark.docker, pytest.mark.engine_restart]


async def test_a_pool_is_rebuilt_after_an_engine_restart(tmp_path: Path) -> None:
    if os.environ.get("CI") != "true" and os.environ.get("TOOLCELL_ALLOW_ENGINE_RESTART") != "1":
        pytest.skip("restarts the shared Docker engine: set TOOLCELL_ALLOW_ENGINE_RESTART=1 (always runs in CI)")
    doc = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(tmp_path / "s.sock"))
    doc["tools"][0]["pool"] = {"size": 2}  # text.wordcount
    async with running_supervisor(tmp_path, doc) as (app, client):
        pools = app.supervisor.pools

        async def full(timeout: float) -> set[str]:
            deadline = time.monotonic() + timeout
            while pools.ready("text.wordcount") < 2:
                assert time.monotonic() < deadline, f"the pool was not (re)built: {pools.stats()}"
                await asyncio.sleep(0.2)
            return {e.sandbox.id for e in pools._pools["text.wordcount"].ready}

        before = await full(60)
        await asyncio.to_thread(restart_engine)
        await asyncio.to_thread(wait_engine)
        after = await full(90)
        assert not before & after, "every pooled container was replaced"
        assert pools.stats()["text.wordcount"].recycled >= 2
        sandbox, result = "", None
        async for event in client.execute("text.wordcount", json.dumps({"text": "warm again"}), timeout=60):
            if isinstance(event, Started):
                sandbox = event.sandbox_id
            elif isinstance(event, Result):
                result = event
        assert result is not None and result.status is Status.OK and sandbox in after
