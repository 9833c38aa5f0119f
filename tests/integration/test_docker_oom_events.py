"""Docker on cgroup v1: a sandbox's OOM is seen when it happens (an eventfd on its memcg), not up to a sampling
interval later, when a killed container's cgroup may already be gone (64 hogs dying at once on 2 cores: the
engine's own OOMKilled flag landed seconds late and one call ended 'error' instead of 'oom')."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.support import config_doc, engine
from toolcell.backends.docker import DockerBackend
from toolcell.settings import parse_config

pytestmark = pytest.mark.docker
# A child hogs memory and is OOM-killed; the tool itself lives on a moment and exits 0: only the kernel's
# OOM event can tell (the engine's OOMKilled flag is about the main process).
HOG = ("import subprocess, sys, time\n"
       "subprocess.run([sys.executable, '-c', 'x = []\\nwhile True:\\n    x.append(bytearray(8 << 20))'])\n"
       "time.sleep(1.0)\n")


async def test_an_oom_is_counted_from_the_kernels_event(tmp_path: Path) -> None:
    engine()
    config = parse_config(config_doc(f"test-oom-{uuid.uuid4().hex[:8]}", str(tmp_path / "s.sock"),
                                     small={"memory": "32Mi", "timeout": "20s"}), environ={})
    # Periodic sampling every 10 minutes: within this test only the OOM event can wake the sampler.
    backend = DockerBackend(config.engine.docker_host, sample_interval_s=600.0)
    if backend._cgroups is None or backend._cgroups.v2:
        pytest.fail("this check is for a host whose Docker cgroups are visible and v1 (as CI's)")
    tool = config.tools["python.run"]
    resolved = config.resolve_tool(type(tool)(**{**tool.__dict__, "profile": "small"}))
    sandbox = await backend.create(config.compile(resolved, "inv_oom"))
    try:
        await sandbox.start(json.dumps({"code": HOG}).encode() + b"\n")
        assert sandbox._probe.oom_fd >= 0, "watching the memcg's OOM events from the start"
        exit_info = await sandbox.wait()
        assert exit_info.exit_code == 0
        assert sandbox._probe.seen_oom_kills >= 1, "the kernel's count, read when its OOM event fired"
        assert exit_info.oom_killed, "an OOM kill in the sandbox counts, whichever process it hit"
    finally:
        await sandbox.remove()
        await backend.close()
    assert sandbox._probe.oom_fd == -1
