"""The hostile suite's harness: a real grpc.aio supervisor, the real engine, probes mounted read-only.

Every test runs once per backend and runtime: ``runc`` and ``runsc`` on the Docker engine (runsc where
gVisor is registered), and ``oci``: the daemonless backend (``engine.kind: oci``, the host kernel's
namespaces through runc), whose allow/deny outcomes must be identical to Docker's runc. Each check is
recorded (attack, the layer that should stop it, what was observed, whether it held) and written at the
end of the session to ``$TOOLCELL_SECURITY_OBSERVATIONS`` (default ``build/security-observations.json``);
``scripts/gen_security_table.py`` renders docs/security.md's table from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, RUNNER_IMAGE, engine, serving
from toolcell.backends.oci.rootfs import RootfsStore
from toolcell.client import Client
from toolcell.model import Result
from toolcell.server.app import App
from toolcell.settings import parse_config

TOOLS_DIR = Path(__file__).resolve().parent / "tools"
PERMISSIVE_SECCOMP = TOOLS_DIR / "seccomp-permissive.json"
# Set in the supervisor's own environment; no profile passes it through, so no tool may ever see it.
CANARY_NAME = "TOOLCELL_TEST_CANARY_SECRET"
CANARY_VALUE = "canary-" + uuid.uuid4().hex
# Passed through by the `relaxed` profile only: proves the env check can see a passed variable.
PASSED_NAME = "TOOLCELL_TEST_PASSED"
ROOTFS_DIR = os.environ.get("TOOLCELL_ROOTFS_DIR", "/var/lib/toolcell/rootfs")
OBSERVATIONS = Path(os.environ.get("TOOLCELL_SECURITY_OBSERVATIONS", REPO / "build" / "security-observations.json"))

_records: list[dict[str, Any]] = []


# The targets whose tools run on the host kernel's namespaces (docker + runc, and the oci backend over runc).
HOST_KERNEL = frozenset({"runc", "oci"})


def engine_runtimes() -> list[str]:
    return sorted(engine().info().get("Runtimes", {}))


def oci_ready() -> None:
    """The oci backend's prerequisites; missing ones FAIL (never skip): containment is never assumed."""
    if shutil.which("runc") is None:
        pytest.fail("the oci backend needs runc (scripts/setup.sh installs it)")
    if RUNNER_IMAGE not in RootfsStore(ROOTFS_DIR).references():
        pytest.fail(f"{RUNNER_IMAGE} is not unpacked in {ROOTFS_DIR} (scripts/setup.sh runs images/build.sh)")


@pytest.fixture(params=["runc", "runsc", "oci"])
def runtime(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "oci":
        oci_ready()
    elif name not in engine_runtimes():
        pytest.skip(f"the engine has no {name!r} runtime (scripts/setup.sh registers runsc where it is installed)")
    return name


@dataclass
class Checks:
    """Observations of one test: each is recorded for the table, then all are asserted together."""

    runtime: str
    test: str
    failures: list[str] = field(default_factory=list)

    def expect(self, attack: str, layer: str, observed: Any, held: bool, category: str = "") -> None:
        shown = observed if isinstance(observed, str) else json.dumps(observed, sort_keys=True)
        _records.append({"category": category or self.test, "attack": attack, "layer": layer,
                         "runtime": self.runtime, "observed": shown, "held": bool(held), "test": self.test})
        if not held:
            self.failures.append(f"{attack}: observed {shown}")

    def done(self) -> None:
        assert not self.failures, "containment did not hold:\n  " + "\n  ".join(self.failures)


@pytest.fixture
def checks(request: pytest.FixtureRequest) -> Iterator[Checks]:
    runtime = request.getfixturevalue("runtime") if "runtime" in request.fixturenames else "runc"
    c = Checks(runtime=runtime, test=request.node.originalname)
    yield c


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _records:
        return
    OBSERVATIONS.parent.mkdir(parents=True, exist_ok=True)
    OBSERVATIONS.write_text(json.dumps(_records, indent=1, sort_keys=True) + "\n")


def probe_tool(name: str, profile: str) -> dict[str, Any]:
    """A python.run-style tool: the probe's source arrives as the ``code`` argument."""
    return {"name": name, "description": f"hostile probe ({profile})", "image": RUNNER_IMAGE,
            "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"], "profile": profile,
            "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}


def hostile_config(owner: str, socket_path: str, runtime: str) -> dict[str, Any]:
    mount = {"source": str(TOOLS_DIR), "target": "/opt/probes"}
    oci = runtime == "oci"
    return {
        "version": 1,
        "server": {"listen": f"unix://{socket_path}", "instance": owner, "shutdown_grace": "2s"},
        **({"engine": {"kind": "oci", "oci": {"rootfs_dir": ROOTFS_DIR}}} if oci else {}),
        "profiles": {
            "default": {"memory": "128Mi", "timeout": "20s", "kill_grace": "1s", "pids": 64, "nofile": 256,
                        "tmpfs_size": "16Mi", "runtime": "runc" if oci else runtime,
                        # A read-only host mount (the probes' own directory); unusable under runsc here.
                        **({"mounts": [mount]} if runtime in HOST_KERNEL else {})},
            # The same sandbox with seccomp relaxed to allow-all, and one variable passed through.
            "relaxed": {"extends": "default", "seccomp": str(PERMISSIVE_SECCOMP),
                        "env_passthrough": [PASSED_NAME]},
            "tight": {"extends": "default", "timeout": "3s", "kill_grace": "500ms", "cpus": 0.5,
                      "output": {"stdout_max_bytes": "64Ki", "stderr_max_bytes": "16Ki"}},
            # The same sandbox with a POSIX shared memory tmpfs: the allowed side of the /dev/shm pair.
            "shm": {"extends": "default", "shm": "16Mi"},
            # Room in memory for 64 tasks under gVisor (~5 MiB of host memory each), so the pids limit, not
            # the memory cgroup, is what stops a bomb there too.
            "bombs": {"extends": "default", "memory": "512Mi"},
        },
        "tools": [probe_tool("probe", "default"), probe_tool("probe.relaxed", "relaxed"),
                  probe_tool("probe.tight", "tight"), probe_tool("probe.shm", "shm"),
                  probe_tool("probe.bombs", "bombs")],
    }


@contextlib.asynccontextmanager
async def hostile_supervisor(tmp_path: Path, runtime: str) -> AsyncIterator[tuple[App, Client]]:
    """Like tests.support.running_supervisor, with the probes and the supervisor's real environment."""
    owner = f"sec-{uuid.uuid4().hex[:10]}"
    environ = {**os.environ, CANARY_NAME: CANARY_VALUE, PASSED_NAME: "passed-through"}
    config = parse_config(hostile_config(owner, str(tmp_path / "toolcell.sock"), runtime), environ=environ)
    async with serving(config) as running:
        yield running


@pytest.fixture
async def sup(tmp_path: Path, runtime: str) -> AsyncIterator[tuple[App, Client]]:
    async with hostile_supervisor(tmp_path, runtime) as pair:
        yield pair


PROBE_SOURCE = (TOOLS_DIR / "probe.py").read_text()


def args(probe: str, **params: Any) -> str:
    """Arguments for a probe tool: the probe's source with its own arguments prepended."""
    preamble = f"import json as _json\nPROBE_ARGS = _json.loads({json.dumps({'probe': probe, 'params': params})!r})\n"
    return json.dumps({"code": preamble + PROBE_SOURCE})


def observations(result: Result) -> dict[str, Any]:
    """The probe's JSON report: the last line of its stdout."""
    lines = result.output.strip().splitlines()
    assert lines, f"probe reported nothing (status {result.status.value}): {result.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report
