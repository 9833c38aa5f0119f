"""A tool's ``session:`` and ``workspace:`` sections (sessions.config): defaults, every bad value refused
with its key named, and the session sandbox's spec (hosted_spec) and host command derived from them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from toolcell.errors import ConfigError
from toolcell.model import SessionPolicy, Tool, WorkspacePolicy
from toolcell.policy.spec import LEASE_MARGIN_S, HostSpec, Identity, SandboxSpec, Scratch
from toolcell.sessions.config import (
    HOST_MAX_CLAIM_BYTES,
    MAX_INPUT_BYTES,
    MAX_OUTPUT_BYTES,
    build_session,
    build_workspace,
    check_message_room,
    hosted,
    hosted_spec,
)
from toolcell.sessions.host import host_command, host_source

KEY = "tools[0]"
DAY = 24 * 3600.0
MI = 1024 * 1024
DEFAULT = WorkspacePolicy()

# -- session: ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({}, SessionPolicy()),
    ({"idle_ttl": "30s", "max_lifetime": "2h", "max_calls": 5, "per_principal": 2, "command": ["python3", "r.py"]},
     SessionPolicy(idle_ttl_s=30.0, max_lifetime_s=7200.0, max_calls=5, per_principal=2, command=("python3", "r.py"))),
    ({"idle_ttl": 90, "max_lifetime": 90}, SessionPolicy(idle_ttl_s=90.0, max_lifetime_s=90.0)),  # equal: fine
    ({"idle_ttl": "500ms", "max_lifetime": "24h"}, SessionPolicy(idle_ttl_s=0.5, max_lifetime_s=DAY)),  # at the cap
    ({"max_lifetime": 300}, SessionPolicy(max_lifetime_s=300.0)),  # the default idle_ttl (300 s) fits exactly
])
def test_build_session(raw: dict[str, Any], expected: SessionPolicy) -> None:
    assert build_session(raw, f"{KEY}.session") == expected


@pytest.mark.parametrize(("raw", "key"), [
    ({"idle_ttl": "2h", "max_lifetime": "1h"}, "idle_ttl"),
    ({"max_lifetime": "299s"}, "idle_ttl"),  # under the default idle_ttl
    ({"max_lifetime": "25h", "idle_ttl": "1s"}, "max_lifetime"),
    ({"max_lifetime": DAY + 0.001, "idle_ttl": 1}, "max_lifetime"),
    ({"max_lifetime": math.inf, "idle_ttl": 1}, "max_lifetime"),
    ({"idle_ttl": 0}, ""),
    ({"idle_ttl": -1}, ""),
    ({"max_lifetime": 0, "idle_ttl": 0}, ""),
    ({"idle_ttl": math.nan}, ""),  # YAML .nan: it would never expire
    ({"max_lifetime": math.nan}, ""),
    ({"idle_ttl": "soon"}, "idle_ttl"),
    ({"max_lifetime": "1 day"}, "max_lifetime"),
    ({"idle_ttl": "-5s"}, "idle_ttl"),
])
def test_build_session_refuses(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_session(raw, f"{KEY}.session")
    assert caught.value.key == (f"{KEY}.session.{key}" if key else f"{KEY}.session")
    assert str(caught.value).startswith(f"{caught.value.key}: ")


# -- workspace: --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({}, WorkspacePolicy()),
    ({"dir": "/tmp/ws/", "outputs": "/tmp/ws/out/"}, WorkspacePolicy(dir="/tmp/ws", outputs="/tmp/ws/out")),
    ({"dir": "/tmp/a/../b", "outputs": "/tmp/./o"}, WorkspacePolicy(dir="/tmp/b", outputs="/tmp/o")),
    ({"outputs": "/tmp/elsewhere"}, WorkspacePolicy(outputs="/tmp/elsewhere")),  # not under dir: fine
    ({"outputs": ""}, WorkspacePolicy()),
    ({"max_input_files": 0, "max_output_files": 5000}, WorkspacePolicy(max_input_files=0, max_output_files=5000)),
    ({"max_input_bytes": "32Mi", "max_output_bytes": "32Mi", "max_file_bytes": "32Mi"},
     WorkspacePolicy(max_input_bytes=MAX_INPUT_BYTES, max_output_bytes=MAX_OUTPUT_BYTES, max_file_bytes=32 * MI)),
    ({"max_input_bytes": 1, "max_output_bytes": 1, "max_file_bytes": 1},
     WorkspacePolicy(max_input_bytes=1, max_output_bytes=1, max_file_bytes=1)),
    ({"max_output_bytes": "1Mi", "max_file_bytes": "1Mi"}, WorkspacePolicy(max_output_bytes=MI, max_file_bytes=MI)),
])
def test_build_workspace(raw: dict[str, Any], expected: WorkspacePolicy) -> None:
    assert build_workspace(raw, f"{KEY}.workspace") == expected


@pytest.mark.parametrize(("raw", "key"), [
    ({"dir": "/tmp"}, "dir"),  # the whole scratch
    ({"dir": "/tmp/"}, "dir"),
    ({"dir": "/tmp/x/.."}, "dir"),
    ({"dir": "/tmp/.."}, "dir"),
    ({"dir": "/tmp/../etc"}, "dir"),
    ({"dir": "/tmpfoo"}, "dir"),
    ({"dir": "/var/tmp/ws"}, "dir"),
    ({"dir": "/"}, "dir"),
    ({"dir": "//tmp/ws"}, "dir"),  # POSIX keeps a leading "//": not under /tmp
    ({"dir": "tmp/ws"}, "dir"),
    ({"dir": "/home/user/project"}, "dir"),
    ({"outputs": "/tmp"}, "outputs"),
    ({"outputs": "/etc/out"}, "outputs"),
    ({"outputs": "/tmp/../out"}, "outputs"),
    ({"outputs": "/tmpout"}, "outputs"),
    ({"outputs": "out"}, "outputs"),
    ({"max_output_bytes": 0}, "max_output_bytes"),
    ({"max_output_bytes": -1}, "max_output_bytes"),
    ({"max_output_bytes": MAX_OUTPUT_BYTES + 1}, "max_output_bytes"),
    ({"max_output_bytes": "1Gi"}, "max_output_bytes"),
    ({"max_output_bytes": "lots"}, "max_output_bytes"),
    ({"max_input_bytes": 0}, "max_input_bytes"),
    ({"max_input_bytes": MAX_INPUT_BYTES + 1}, "max_input_bytes"),
    ({"max_input_bytes": "33Mi"}, "max_input_bytes"),
    ({"max_input_bytes": "12 parsecs"}, "max_input_bytes"),
    ({"max_file_bytes": 0}, "max_file_bytes"),
    ({"max_file_bytes": DEFAULT.max_output_bytes + 1}, "max_file_bytes"),  # over the default max_output_bytes
    ({"max_output_bytes": "1Mi", "max_file_bytes": MI + 1}, "max_file_bytes"),
    ({"max_file_bytes": "x"}, "max_file_bytes"),
])
def test_build_workspace_refuses(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_workspace(raw, f"{KEY}.workspace")
    assert caught.value.key == f"{KEY}.workspace.{key}"


# -- hosted tools ------------------------------------------------------------------------------------------

SPEC = SandboxSpec(
    image="toolcell/python:bookworm", command=("python3", "/opt/tools/pyrun.py"), user="10001:10001",
    env={"A": "1"}, identity=Identity(owner="o", invocation_id="i", tool="python.run", profile="p"),
    isolation="runc", seccomp_json="{}", memory_bytes=128 << 20, cpus=1.0, pids=64, nofile=256,
    scratch=(Scratch("/tmp", 64 << 20),), mounts=(), timeout_s=30.0, kill_grace_s=2.0, ready_signal=True,
    lease_s=152.0)
REPL = ("python3", "/opt/tools/pyrepl.py")
WORKSPACE = WorkspacePolicy(dir="/tmp/ws", outputs="/tmp/ws/out", max_output_files=7,
                            max_output_bytes=3 * MI, max_file_bytes=MI)


def tool(session: SessionPolicy | None = None, workspace: WorkspacePolicy | None = None) -> Tool:
    return Tool(name="python.run", description="d", image=SPEC.image, command=SPEC.command, session=session,
                workspace=workspace)


@pytest.mark.parametrize(("session", "workspace", "expected"), [
    (None, None, False),
    (SessionPolicy(), None, True),
    (None, WorkspacePolicy(), True),
    (SessionPolicy(command=REPL), WORKSPACE, True),
])
def test_hosted(session: SessionPolicy | None, workspace: WorkspacePolicy | None, expected: bool) -> None:
    assert hosted(tool(session, workspace)) is expected


@pytest.mark.parametrize(("session", "workspace", "command", "host"), [
    (SessionPolicy(command=REPL), None, REPL, HostSpec(resident=True)),
    (SessionPolicy(), None, SPEC.command, HostSpec(resident=False)),  # exec: the tool's command, once per call
    (None, WORKSPACE, SPEC.command,
     HostSpec(resident=False, workspace="/tmp/ws", outputs="/tmp/ws/out", caps=(7, 3 * MI, MI))),
    (SessionPolicy(command=REPL), WorkspacePolicy(), REPL,
     HostSpec(resident=True, workspace="/tmp/workspace", outputs="", caps=(DEFAULT.max_output_files,
              DEFAULT.max_output_bytes, DEFAULT.max_file_bytes))),  # the workspace's caps, not the host's defaults
])
@pytest.mark.parametrize("lifetime", [0.0, 3600.0, DAY])
def test_hosted_spec(session: SessionPolicy | None, workspace: WorkspacePolicy | None, command: tuple[str, ...],
                     host: HostSpec, lifetime: float) -> None:
    got = hosted_spec(tool(session, workspace), SPEC, lifetime)
    assert got.command == command
    assert got.host == host
    assert got.ready_signal is False  # the host, not the tool, is what waits for a claim
    # Leased for the whole session plus the last call's timeout and grace, never less.
    assert got.lease_s == lifetime + SPEC.timeout_s + SPEC.kill_grace_s + LEASE_MARGIN_S
    assert got.lease_s >= lifetime + SPEC.timeout_s
    # Everything else is the tool's sandbox as compiled.
    unchanged = dataclasses.replace(got, command=SPEC.command, host=None, ready_signal=True, lease_s=SPEC.lease_s)
    assert unchanged == SPEC


@pytest.mark.parametrize(("host", "relay", "ready_fd", "flags"), [
    (HostSpec(), False, 0, ("--caps=64,8388608,4194304",)),
    (HostSpec(resident=True, workspace="/tmp/ws", outputs="/tmp/ws/out", caps=(7, 3, 2)), True, 5,
     ("--resident", "--relay", "--workspace=/tmp/ws", "--outputs=/tmp/ws/out", "--caps=7,3,2", "--ready-fd=5")),
])
def test_host_command(host: HostSpec, relay: bool, ready_fd: int, flags: tuple[str, ...]) -> None:
    argv = host_command(("tool", "--flag"), host, relay=relay, ready_fd=ready_fd)
    assert argv == ("python3", "-I", "-S", "-c", host_source(), *flags, "--", "tool", "--flag")
    # The source: the workspace functions, then the host; one program, compiled as such.
    source = host_source()
    assert source.index("def ws_write_inputs") < source.index("def sh_main")
    compile(source, "<host>", "exec")


@pytest.mark.parametrize(("workspace", "argument_bytes", "message_bytes", "problem"), [
    ({}, 1 << 20, 4 << 20, None),  # the defaults fit the default message
    ({"max_output_bytes": "3Mi"}, 1 << 20, 4 << 20, "max_output_bytes"),
    ({"max_output_bytes": "3Mi"}, 1 << 20, 8 << 20, None),
    ({"max_input_bytes": "3Mi"}, 1 << 20, 4 << 20, "max_input_bytes"),
    ({"max_input_bytes": "32Mi"}, 16 << 20, 64 << 20, "max_input_bytes"),  # the host's claim line
    ({"max_output_bytes": "3Mi", "outputs": ""}, 1 << 20, 4 << 20, None),  # nothing comes back
])
def test_workspace_files_must_fit_their_messages(workspace: dict[str, object], argument_bytes: int,
                                                 message_bytes: int, problem: str | None) -> None:
    policy = build_workspace({"outputs": "/tmp/w/out", **workspace}, "tools[0].workspace")
    tool = Tool(name="t", description="", image="i", command=("x",), workspace=policy)
    output_caps = 1024 * 1024 + 256 * 1024 + 256 * 1024
    if problem is None:
        check_message_room(tool, result_bytes=output_caps, argument_bytes=argument_bytes,
                           max_message_bytes=message_bytes, key="tools[0].workspace")
        return
    with pytest.raises(ConfigError) as err:
        check_message_room(tool, result_bytes=output_caps, argument_bytes=argument_bytes,
                           max_message_bytes=message_bytes, key="tools[0].workspace")
    assert err.value.key == f"tools[0].workspace.{problem}"


def test_the_host_claim_limit_is_the_hosts_own() -> None:
    source = (Path(__file__).resolve().parents[2] / "runtime" / "data" / "session_host.py").read_text()
    assert f"SH_MAX_CLAIM = {HOST_MAX_CLAIM_BYTES >> 20} << 20" in source
