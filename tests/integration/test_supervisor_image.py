"""The supervisor image: builds offline, serves a call through a socket shared with the host, reports
healthy through its HEALTHCHECK, reloads on SIGHUP, and stops cleanly (exit 0, no sandbox left) on SIGTERM.

The container runs as the deployment files run it: uid 10002, read-only root, no capabilities,
no-new-privileges, no network, the engine socket through its group.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, RUNNER_IMAGE, engine, leftovers
from toolcell import __version__
from toolcell.client import Client
from toolcell.model import Status

pytestmark = pytest.mark.docker
IMAGE = f"toolcell/supervisor:{__version__}"


def test_image_builds_offline() -> None:
    engine()
    out = subprocess.run(["bash", str(REPO / "images" / "build.sh")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert IMAGE in out.stdout
    image = engine().images.get(IMAGE)
    cfg = image.attrs["Config"]
    assert cfg["User"] == "10002:10002" and cfg["Entrypoint"] == ["toolcell"] and cfg["Cmd"] == ["serve"]
    assert cfg["Healthcheck"]["Test"] == ["CMD", "toolcell", "health"]
    assert image.labels["io.toolcell.inputs-hash"]


async def test_image_serves_a_call_through_a_host_shared_socket(tmp_path: Path) -> None:
    client = engine()
    client.images.get(IMAGE)
    owner = f"test-{uuid.uuid4().hex[:10]}"
    run_dir = tmp_path / "run"
    conf_dir = tmp_path / "conf"
    run_dir.mkdir()
    conf_dir.mkdir()
    os.chown(run_dir, 10002, 10002)
    doc = yaml.safe_load((REPO / "images" / "supervisor" / "toolcell.yaml").read_text())
    doc["server"].update({"instance": owner, "shutdown_grace": "2s", "health_interval": "1s"})
    # This test calls from the host as root, a uid other than the supervisor's: grant it explicitly.
    doc["auth"]["rules"].append({"match": {"uid": os.getuid()}, "tools": ["*"]})
    for tool in doc["tools"]:
        tool["image"] = RUNNER_IMAGE
    (conf_dir / "toolcell.yaml").write_text(yaml.safe_dump(doc))
    os.chmod(conf_dir / "toolcell.yaml", 0o644)
    gid = os.stat("/var/run/docker.sock").st_gid
    container = client.containers.run(
        IMAGE, detach=True, name=f"toolcell-{owner}", labels={"io.toolcell.test": owner},
        user="10002:10002", group_add=[str(gid)], read_only=True, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], network_mode="none",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(run_dir): {"bind": "/run/toolcell", "mode": "rw"},
                 str(conf_dir): {"bind": "/etc/toolcell", "mode": "ro"}},
        healthcheck={"test": ["CMD", "toolcell", "health"], "interval": 1_000_000_000, "timeout": 6_000_000_000,
                     "retries": 3, "start_period": 10_000_000_000})
    try:
        sock = run_dir / "toolcell.sock"
        deadline = time.monotonic() + 60
        while not (run_dir / "toolcell.sock.state").exists():
            container.reload()
            assert container.status in {"created", "running"}, container.logs().decode()[-3000:]
            assert time.monotonic() < deadline, container.logs().decode()[-3000:]
            time.sleep(0.1)
        assert oct(sock.stat().st_mode & 0o777) == "0o660" and sock.stat().st_uid == 10002

        async with Client(f"unix://{sock}") as caller:
            tools = {t.name for t in await caller.list_tools()}
            result = await caller.call("text.wordcount", json.dumps({"text": "through the shared socket"}))
        assert tools == {"text.wordcount", "python.run"}
        assert result.status is Status.OK and json.loads(result.output) == {"lines": 1, "words": 4, "chars": 25}
        # The supervisor sees its own /sys/fs/cgroup, not the sandboxes' (no host cgroup mount here): usage comes
        # from the engine's stats instead of reading 0.
        assert result.usage.peak_memory_bytes > 0 and result.usage.cpu_time_ns > 0, result.usage

        deadline = time.monotonic() + 60
        while True:
            container.reload()
            health = container.attrs["State"].get("Health", {}).get("Status")
            if health == "healthy":
                break
            assert time.monotonic() < deadline, f"health {health}: {container.attrs['State'].get('Health')}"
            time.sleep(0.5)

        reload = container.exec_run(["toolcell", "reload"])
        assert reload.exit_code == 0 and b"reload #1" in reload.output, reload.output

        container.stop(timeout=30)  # SIGTERM
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, container.logs().decode()[-3000:]
        logs = container.logs().decode()
        assert '"message": "stopped"' in logs and "through the shared socket" not in logs
        assert not sock.exists() and leftovers(client, owner) == []
    finally:
        container.remove(force=True)
