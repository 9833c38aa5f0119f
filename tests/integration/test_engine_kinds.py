"""engine.kind as a whole: one factory builds the configured backend, and what a backend cannot run as
written is a configuration error naming the tool, at start-up and on reload, never a weaker sandbox."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import config_doc, oci_residue, running_supervisor
from toolcell.backends.docker import DockerBackend
from toolcell.backends.factory import open_backend
from toolcell.backends.oci import OciBackend
from toolcell.errors import ConfigError
from toolcell.model import Status
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor


def doc(kind: str, tmp_path: Path, **profiles: dict[str, Any]) -> dict[str, Any]:
    d = config_doc(f"kinds-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"), **profiles)
    d["engine"] = {"kind": kind}
    return d


@pytest.mark.parametrize(("kind", "cls"), [("docker", DockerBackend), ("oci", OciBackend)])
async def test_the_factory_builds_the_configured_backend(tmp_path: Path, kind: str, cls: type) -> None:
    backend = open_backend(parse_config(doc(kind, tmp_path)))
    try:
        assert isinstance(backend, cls) and backend.name == kind
        await backend.ping()
    finally:
        await backend.close()


def granted(tmp_path: Path, kind: str) -> dict[str, Any]:
    d = doc(kind, tmp_path, egress={"network": ["api.example.test"]})
    d["tools"].append({"name": "fetcher", "description": "granted egress", "image": "toolcell/python:bookworm",
                       "command": ["python3", "-I", "/opt/toolcell/tools/pyrun.py"], "profile": "egress"})
    return d


@pytest.mark.parametrize(("change", "key", "words"), [
    ("egress", "profiles.egress.network", "network grants need the docker engine"),
    ("runsc", "profiles.gvisor.runtime", "runsc (gVisor) needs the docker engine"),
])
async def test_what_oci_cannot_run_is_refused_at_start_naming_the_tool(tmp_path: Path, change: str, key: str,
                                                                      words: str) -> None:
    if change == "egress":
        d = granted(tmp_path, "oci")
    else:
        d = doc("oci", tmp_path, gvisor={"runtime": "runsc"})
        d["tools"].append({"name": "isolated", "description": "gVisor", "image": "toolcell/python:bookworm",
                           "command": ["cat"], "profile": "gvisor"})
    config = parse_config(d)
    backend = open_backend(config)
    supervisor = Supervisor(config, backend)
    try:
        with pytest.raises(ConfigError) as err:
            await supervisor.start()
        tool = "fetcher" if change == "egress" else "isolated"
        assert f"tool {tool!r}" in str(err.value) and words in str(err.value) and "engine.kind oci" in str(err.value)
        assert err.value.key == key
        assert oci_residue(config.server.instance) == [], "refused before any sandbox existed"
    finally:
        await supervisor.shutdown()
        await backend.close()


async def test_a_reload_oci_cannot_run_is_refused_and_the_running_config_stays(tmp_path: Path) -> None:
    d = doc("oci", tmp_path)
    async with running_supervisor(tmp_path, d) as (app, client):
        bad = granted(tmp_path, "oci")
        bad["server"] = d["server"]
        with pytest.raises(ConfigError, match=r"'fetcher'.*network grants"):
            await app.supervisor.reload(parse_config(bad))
        assert "fetcher" not in app.supervisor.config.tools
        result = await client.call("text.wordcount", json.dumps({"text": "still the old config"}))
        assert result.status is Status.OK


async def test_the_same_grant_is_accepted_by_the_docker_engine(tmp_path: Path) -> None:
    """The pair of the refusal above: the grant itself is valid; only the oci engine cannot honour it."""
    config = parse_config(granted(tmp_path, "docker"))
    backend = open_backend(config)
    try:
        for name in sorted(config.tools):
            backend.check(config.compile(config.resolve(name), "check"))
    finally:
        await backend.close()
