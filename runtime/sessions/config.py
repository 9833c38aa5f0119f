"""A tool's ``session:`` and ``workspace:`` config sections, as frozen policy values (pure)."""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping
from typing import Any

from toolcell.errors import ConfigError
from toolcell.model import SessionPolicy, Tool, WorkspacePolicy
from toolcell.policy.spec import LEASE_MARGIN_S, HostSpec, SandboxSpec
from toolcell.units import parse_duration, parse_size

# The most a call can make the supervisor hold of one tool's output files (the collected payload is
# base64: 4/3 of this), and of one request's input files.
MAX_OUTPUT_BYTES = 32 * 1024 * 1024
MAX_INPUT_BYTES = 32 * 1024 * 1024
# The sandbox's writable scratch: a workspace lives inside it, never on a host path.
SCRATCH_ROOT = "/tmp"  # noqa: S108 # nosec B108 - inside the sandbox: its private, capped tmpfs


def build_session(raw: Mapping[str, Any], key: str) -> SessionPolicy:
    base = SessionPolicy()
    policy = SessionPolicy(
        idle_ttl_s=parse_duration(raw.get("idle_ttl", base.idle_ttl_s), f"{key}.idle_ttl"),
        max_lifetime_s=parse_duration(raw.get("max_lifetime", base.max_lifetime_s), f"{key}.max_lifetime"),
        max_calls=int(raw.get("max_calls", base.max_calls)),
        per_principal=int(raw.get("per_principal", base.per_principal)),
        command=tuple(raw.get("command", ())),
    )
    if not (policy.idle_ttl_s > 0 and policy.max_lifetime_s > 0):  # NaN (YAML .nan) too: it would never expire
        raise ConfigError("idle_ttl and max_lifetime must be positive", key=key)
    if policy.idle_ttl_s > policy.max_lifetime_s:
        raise ConfigError("idle_ttl is longer than max_lifetime", key=f"{key}.idle_ttl")
    if policy.max_lifetime_s > 24 * 3600:
        raise ConfigError("max_lifetime is over 24h: a long-lived sandbox keeps whatever a compromised tool "
                          "planted in it", key=f"{key}.max_lifetime")
    return policy


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def build_workspace(raw: Mapping[str, Any], key: str) -> WorkspacePolicy:
    base = WorkspacePolicy()
    directory = posixpath.normpath(raw.get("dir", base.dir))
    outputs = posixpath.normpath(raw["outputs"]) if raw.get("outputs") else ""
    policy = WorkspacePolicy(
        dir=directory,
        outputs=outputs,
        max_input_files=int(raw.get("max_input_files", base.max_input_files)),
        max_input_bytes=parse_size(raw.get("max_input_bytes", base.max_input_bytes), f"{key}.max_input_bytes"),
        max_output_files=int(raw.get("max_output_files", base.max_output_files)),
        max_output_bytes=parse_size(raw.get("max_output_bytes", base.max_output_bytes), f"{key}.max_output_bytes"),
        max_file_bytes=parse_size(raw.get("max_file_bytes", base.max_file_bytes), f"{key}.max_file_bytes"),
    )
    # A workspace is the sandbox's own scratch: never a host path, never the whole scratch (its root).
    if not _inside(directory, SCRATCH_ROOT) or directory == SCRATCH_ROOT:
        raise ConfigError(f"must be a directory under {SCRATCH_ROOT} (the sandbox's scratch)", key=f"{key}.dir")
    if outputs and (not _inside(outputs, SCRATCH_ROOT) or outputs == SCRATCH_ROOT):
        raise ConfigError(f"must be a directory under {SCRATCH_ROOT} (the sandbox's scratch)", key=f"{key}.outputs")
    if not 0 < policy.max_output_bytes <= MAX_OUTPUT_BYTES:
        raise ConfigError(f"must be 1..{MAX_OUTPUT_BYTES} bytes", key=f"{key}.max_output_bytes")
    if not 0 < policy.max_input_bytes <= MAX_INPUT_BYTES:
        raise ConfigError(f"must be 1..{MAX_INPUT_BYTES} bytes", key=f"{key}.max_input_bytes")
    if not 0 < policy.max_file_bytes <= policy.max_output_bytes:
        raise ConfigError("must be positive and at most max_output_bytes", key=f"{key}.max_file_bytes")
    return policy


def hosted(tool: Tool) -> bool:
    """Every call of a tool with sessions or a workspace runs under the session host (a one-shot call is a
    session of one call), so one warm pool serves both and a session's first call can be warm."""
    return tool.session is not None or tool.workspace is not None


def hosted_spec(tool: Tool, spec: SandboxSpec, lifetime_s: float) -> SandboxSpec:
    """``spec`` as a session's sandbox: the session host in front of the tool (or its resident command),
    leased for ``lifetime_s`` more than one call needs (its owner may keep it that long)."""
    policy, workspace = tool.session, tool.workspace
    resident = bool(policy is not None and policy.command)
    host = HostSpec(resident=resident,
                    workspace=workspace.dir if workspace is not None else "",
                    outputs=workspace.outputs if workspace is not None else "",
                    caps=(workspace.max_output_files, workspace.max_output_bytes, workspace.max_file_bytes)
                    if workspace is not None else HostSpec().caps)
    command = policy.command if policy is not None and policy.command else spec.command
    return dataclasses.replace(spec, command=command, host=host, ready_signal=False,
                               lease_s=lifetime_s + spec.timeout_s + spec.kill_grace_s + LEASE_MARGIN_S)


# The session host's limit on one claim line (``runtime/data/session_host.py`` SH_MAX_CLAIM).
HOST_MAX_CLAIM_BYTES = 64 << 20
# Room for everything else in a request or a result message (ids, metadata, usage, counts, framing).
MESSAGE_OVERHEAD_BYTES = 64 * 1024


def check_message_room(tool: Tool, *, result_bytes: int, argument_bytes: int, max_message_bytes: int,
                       key: str) -> None:
    """A workspace's files travel in one gRPC message (inputs with the request, outputs with the result):
    a config whose caps cannot fit is refused at load, not failed at a call (RESOURCE_EXHAUSTED, the
    call's output lost)."""
    workspace = tool.workspace
    if workspace is None:
        return
    # The host reads one claim line of at most HOST_MAX_CLAIM_BYTES: the inputs as base64 (4/3) and the
    # arguments as ASCII-escaped JSON (a control character is 6 bytes, \u001f).
    if workspace.max_input_bytes * 4 // 3 + 6 * argument_bytes + MESSAGE_OVERHEAD_BYTES > HOST_MAX_CLAIM_BYTES:
        raise ConfigError(f"max_input_bytes ({workspace.max_input_bytes}) with the arguments' cap ({argument_bytes}) "
                          f"makes a claim larger than the session host reads ({HOST_MAX_CLAIM_BYTES} bytes)",
                          key=f"{key}.max_input_bytes")
    if workspace.max_input_bytes + argument_bytes + MESSAGE_OVERHEAD_BYTES > max_message_bytes:
        raise ConfigError(f"max_input_bytes ({workspace.max_input_bytes}) with the arguments' cap ({argument_bytes}) "
                          f"does not fit server.max_message_bytes ({max_message_bytes}): lower it or raise that",
                          key=f"{key}.max_input_bytes")
    if workspace.outputs and workspace.max_output_bytes + result_bytes + MESSAGE_OVERHEAD_BYTES > max_message_bytes:
        raise ConfigError(f"max_output_bytes ({workspace.max_output_bytes}) with the profile's output caps "
                          f"({result_bytes}) does not fit server.max_message_bytes ({max_message_bytes}): lower it "
                          "or raise that", key=f"{key}.max_output_bytes")


def session_scope(tool: Tool) -> str:
    """Which tools one session serves: a stock MCP server's tools under one profile share it (one server
    process, so what one tool stores another reads), any other tool has its own."""
    if tool.source is not None:
        return f"{tool.source.server}.*@{tool.profile}"
    return tool.name
