"""Shared test support: a real engine (or a loud failure), a real grpc.aio server on a temp socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import docker
import pytest

from toolcell.backends.factory import open_backend
from toolcell.client import Client
from toolcell.server.app import App
from toolcell.settings import Config, parse_config
from toolcell.supervisor import Supervisor

RUNNER_IMAGE = os.environ.get("TOOLCELL_TEST_IMAGE", "toolcell/python:bookworm")
# Granted to test tools that print it; must never appear in any output, span or log of the run.
CANARY = "tc-canary-" + uuid.uuid4().hex
REPO = Path(__file__).resolve().parent.parent
# The Docker backend records a sandbox's owner in this label (what the engine-side leak checks filter on).
LABEL_OWNER = "io.toolcell.owner"


def engine() -> docker.DockerClient:
    """The real engine. Tests that need it FAIL when it is missing: containment is never mocked."""
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(RUNNER_IMAGE)
    except Exception as exc:
        pytest.fail(f"a real Docker engine with image {RUNNER_IMAGE} is required (run scripts/setup.sh): {exc}")
    return client


async def left_behind(config: Config) -> list[str]:
    """Sandboxes of ``config``'s owner still present, asked of a fresh backend of the configured kind."""
    backend = open_backend(config)
    try:
        return await backend.list_sandboxes(config.server.instance)
    finally:
        await backend.close()


OCI_STATE = "/run/toolcell/oci"  # engine.oci.state_dir's default for root
CGROUP_ROOT = Path("/sys/fs/cgroup")


def oci_residue(owner: str, state_dir: str = OCI_STATE) -> list[str]:
    """Everything of ``owner``'s on the host that the oci backend made: bundles, runc state, per-call cgroups
    (any controller) and processes in them. Read straight from the host, not through the backend."""
    from toolcell.backends.oci.backend import owner_tag
    from toolcell.backends.oci.cgroups import TOP, safe_component

    prefix = f"tc-{owner_tag(owner)}-"
    found = [str(p) for sub in ("bundles", "runc") if (Path(state_dir) / sub).is_dir()
             for p in (Path(state_dir) / sub).iterdir() if p.name.startswith(prefix)]
    owned = safe_component(owner)
    for parent in [*CGROUP_ROOT.glob(f"*/{TOP}/{owned}"), CGROUP_ROOT / TOP / owned]:
        if parent.is_dir():
            found += [str(d) for d in parent.iterdir() if d.is_dir()]
    marker = f"/{TOP}/{owned}/"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cgroups = (proc / "cgroup").read_text()
            except OSError:
                continue
            described = _describe(proc) if marker in cgroups else None
            if described is not None:  # None: it exited while we looked, nothing left of it
                found.append(f"pid {proc.name} {described}")
    return found


async def oci_clean(owner: str, state_dir: str = OCI_STATE, zombie_grace_s: float = 5.0) -> list[str]:
    """``oci_residue``, allowing a killed process's zombie a moment to be reaped by its parent (it holds
    no memory, files or cgroup). After a supervisor crash the sandbox's processes are orphans of the
    host's pid 1, which reaps them on its own time (this machine's is no prompt reaper). Anything else,
    or a zombie that stays, is returned."""
    deadline = asyncio.get_running_loop().time() + zombie_grace_s
    while True:
        residue = oci_residue(owner, state_dir)
        if not residue or any("[Z" not in r for r in residue) or asyncio.get_running_loop().time() > deadline:
            return residue
        await asyncio.sleep(0.05)


def _describe(proc: Path) -> str | None:
    """A process's state and command line, for a leak report; None once it is gone."""
    try:
        state = next((line.split(":", 1)[1].strip() for line in (proc / "status").read_text().splitlines()
                      if line.startswith("State:")), "?")
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return f"[{state}] {cmdline[:120]}"


def leftovers(client: docker.DockerClient, owner: str) -> list[str]:
    # The low-level list: containers.list() inspects each one, which races a removal in progress (404).
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL_OWNER}={owner}"})]


def config_doc(owner: str, socket_path: str, **profiles: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "server": {"listen": f"unix://{socket_path}", "instance": owner, "shutdown_grace": "2s"},
        "profiles": {
            "default": {"memory": "128Mi", "timeout": "10s", "kill_grace": "1s", "pids": 64},
            "tight": {"memory": "64Mi", "timeout": "3s", "kill_grace": "500ms",
                      "output": {"stdout_max_bytes": "64Ki", "stderr_max_bytes": "16Ki"}},
            **profiles,
        },
        "tools": [
            {"name": "text.wordcount", "description": "count", "image": RUNNER_IMAGE,
             "command": ["python3", "-I", "/opt/toolcell/tools/wordcount.py"],
             "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                              "additionalProperties": False}},
            {"name": "python.run", "description": "run python", "image": RUNNER_IMAGE,
             "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"],
             "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}},
            {"name": "python.tight", "description": "run python, tight limits", "image": RUNNER_IMAGE,
             "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"], "profile": "tight",
             "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}},
            {"name": "ghost", "description": "image that does not exist", "image": "toolcell-test/missing:never",
             "command": ["true"]},
        ],
    }


@contextlib.asynccontextmanager
async def running_supervisor(tmp_path: Path, doc: dict[str, Any] | None = None,
                             environ: dict[str, str] | None = None) -> AsyncIterator[tuple[App, Client]]:
    owner = f"test-{uuid.uuid4().hex[:10]}"
    sock = tmp_path / "toolcell.sock"
    config = parse_config(doc or config_doc(owner, str(sock)), environ=environ or {}, base_dir=tmp_path)
    async with serving(config) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[App, Client]]:
    """A supervisor for ``config`` on the real engine, with a client; nothing of its owner may be left after."""
    app = App(Supervisor(config, open_backend(config)))
    address = await app.start()
    client = Client(address)
    try:
        yield app, client
    finally:
        await client.close()
        await app.stop(grace_s=1.0)
        left = await left_behind(config)
        assert left == [], f"sandboxes left behind: {left}"
        if config.engine.kind == "oci":
            assert await oci_clean(config.server.instance, config.engine.oci_state_dir) == []


@contextlib.contextmanager
def upstream_container(program: str, aliases: Sequence[str], prefix: str) -> Iterator[tuple[str, Any]]:
    """A test network with one server container (``program``, run by the runner image's Python as root with
    only NET_BIND_SERVICE) answering to every name in ``aliases``; yields (network name, container) once the
    program printed "ready"; both are removed afterwards. The only upstream tests send traffic to."""
    client = engine()
    owner = f"{prefix}-{uuid.uuid4().hex[:10]}"
    labels = {LABEL_OWNER: owner}
    network = client.networks.create(f"tc-test-{owner}", driver="bridge", labels=labels)
    container = None
    try:
        container = client.containers.create(
            RUNNER_IMAGE, ["python3", "-I", "-u", "-c", program], user="0:0", labels=labels,
            network=network.name, read_only=True, cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"],
            mem_limit="64m", pids_limit=64, detach=True)
        network.disconnect(container)
        network.connect(container, aliases=list(aliases))
        container.start()
        deadline = time.monotonic() + 15
        while b"ready" not in container.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield network.name, container
    finally:
        if container is not None:
            container.remove(force=True)
        network.remove()
