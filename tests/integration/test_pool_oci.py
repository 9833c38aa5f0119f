"""Warm pools on the daemonless oci engine: single use, refilled, no secret in a waiting sandbox, a crashed
supervisor's pool swept at the next start with nothing left on the host (processes, cgroups, bundles).

The pool itself is backend-neutral (``pool.py``); these check what only the oci engine can get wrong.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

from tests.integration.test_pool import eventually, run
from tests.security.conftest import oci_ready
from tests.support import CANARY, RUNNER_IMAGE, config_doc, oci_clean, oci_residue, running_supervisor
from toolcell.backends.factory import open_backend
from toolcell.model import Status
from toolcell.secretstore import SecretStore, generate_key
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

PYRUN = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"]
CODE = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def pooled_doc(tmp_path: Path, size: int = 2) -> dict[str, Any]:
    oci_ready()
    doc = config_doc(f"ocipool-{uuid.uuid4().hex[:10]}", str(tmp_path / "s.sock"))
    doc["engine"] = {"kind": "oci"}
    doc["tools"][1]["pool"] = {"size": size}  # python.run
    return doc


def pooled_ids(app: App, tool: str) -> set[str]:
    return {e.sandbox.id for e in app.supervisor.pools._pools[tool].ready}


def sandbox_pids(owner: str) -> list[int]:
    return [int(r.split()[1]) for r in oci_residue(owner) if r.startswith("pid ")]


async def test_pooled_oci_sandboxes_are_single_use_and_refilled(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path, pooled_doc(tmp_path)) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        ready = pooled_ids(app, "python.run")
        first, id1 = await run(client, "python.run", "import os; open('/tmp/left','w').write('x'); "
                                                     "print(os.path.exists('/tmp/left'))")
        second, id2 = await run(client, "python.run", "import os; print(os.path.exists('/tmp/left'))")
        assert (first.status, first.output, second.status, second.output) == (Status.OK, "True\n", Status.OK, "False\n")
        assert {id1, id2} <= ready and id1 != id2, "both served warm, each by its own sandbox"
        owner = app.supervisor.config.server.instance
        await eventually(lambda: not any(id1 in r or id2 in r for r in oci_residue(owner)))
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        assert not pooled_ids(app, "python.run") & {id1, id2}
        assert app.supervisor.pools.stats()["python.run"].hits == 2


async def test_no_secret_in_a_waiting_oci_sandbox_and_the_claim_brings_it(tmp_path: Path) -> None:
    key = generate_key()
    store = tmp_path / "secrets.json"
    SecretStore(store, base64.b64decode(key)).set("canary", CANARY)
    doc = pooled_doc(tmp_path, size=1)
    doc["secrets"] = {"store": str(store)}
    doc["tools"] = [{"name": "leaky", "description": "granted the canary twice", "image": RUNNER_IMAGE,
                     "command": PYRUN, "input_schema": CODE, "pool": {"size": 1},
                     "secrets": [{"name": "canary", "env": "CANARY_TOKEN"},
                                 {"name": "canary", "file": "/run/secrets/canary"}]}]
    async with running_supervisor(tmp_path, doc, environ={"TOOLCELL_SECRETS_KEY": key}) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("leaky") == 1)
        owner = app.supervisor.config.server.instance
        pids = sandbox_pids(owner)
        assert pids, "the waiting sandbox's processes (init, launcher) are visible from the host"
        environs = b"".join(Path(f"/proc/{pid}/environ").read_bytes() for pid in pids)
        assert b"LANG=C.UTF-8" in environs, "the probe must actually read the environments"
        assert CANARY.encode() not in environs
        bundle = next(r for r in oci_residue(owner) if "/bundles/" in r)
        assert CANARY not in (Path(bundle) / "config.json").read_text(), "never in the bundle"
        waiting = pooled_ids(app, "leaky")
        result, sid = await run(client, "leaky", "import os; t = os.environ['CANARY_TOKEN']; "
                                "assert t == open('/run/secrets/canary').read(); "
                                "print(oct(os.stat('/run/secrets/canary').st_mode & 0o777), t)")
        assert result.status is Status.OK and sid in waiting, result.stderr
        assert result.output.startswith("0o400 [REDACTED") and CANARY not in result.output


async def test_a_crashed_supervisors_oci_pool_is_swept_at_the_next_start(tmp_path: Path) -> None:
    config = parse_config(pooled_doc(tmp_path), environ={}, base_dir=tmp_path)
    owner = config.server.instance
    crashed_backend = open_backend(config)
    crashed = Supervisor(config, crashed_backend)
    await crashed.start()
    await eventually(lambda: crashed.pools.ready("python.run") == 2)
    for pool in crashed.pools._pools.values():  # "crash": nothing removed, as a killed process would
        assert pool.task is not None
        pool.task.cancel()
    await crashed_backend.close()
    assert len(sandbox_pids(owner)) >= 2, "the control: the pool outlived its supervisor"
    backend = open_backend(config)
    successor = Supervisor(config, backend)
    try:
        assert await successor.start() >= 2
    finally:
        await successor.shutdown()
        await backend.close()
    assert await oci_clean(owner) == []
