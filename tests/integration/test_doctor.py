"""toolcell doctor against this host's real engine, and against a socket where no engine listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, engine

pytestmark = pytest.mark.docker


def doctor(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolcell", "doctor", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_doctor_passes_on_the_test_host() -> None:
    engine()
    proc = doctor("--json")
    findings = {f["check"]: f for f in json.loads(proc.stdout)}
    assert proc.returncode == 0, proc.stdout
    for check in ("engine reachable", "seccomp", "cgroups", "runtimes", "engine socket permissions"):
        assert findings[check]["level"] in ("ok", "warn"), findings[check]
    assert {"io_uring sysctl", "user namespaces sysctl"} <= set(findings)


def test_doctor_fails_naming_the_socket_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "engine.sock"
    proc = doctor(env={"DOCKER_HOST": f"unix://{missing}"})
    assert proc.returncode == 1
    assert f"[FAIL] engine reachable: unix://{missing}" in proc.stdout
    assert "fix: start the engine" in proc.stdout
