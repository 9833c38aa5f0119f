"""Values that flow through one invocation. Frozen, no I/O imports."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


class Status(enum.Enum):
    """Final status of an invocation. Decided from what the engine reports, never from tool output."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    OOM = "oom"
    KILLED = "killed"
    DENIED = "denied"
    INVALID = "invalid"


@dataclass(frozen=True)
class SecretGrant:
    """One secret a tool may have, delivered as an environment variable or a read-only file."""

    name: str
    env: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class McpBinding:
    """A tool that lives in a stock MCP server (a tool source): which server, and its name there.

    ``roots`` answers the server's ``roots/list`` requests; None refuses them (the default: a server
    learns nothing of the caller's files unless the admin says so).
    """

    server: str
    name: str
    roots: tuple[Mapping[str, str], ...] | None = None


@dataclass(frozen=True)
class SessionPolicy:
    """The admin's terms for sessions of one tool: one sandbox leased to one principal across its calls.

    Off unless the tool's config has ``session:``. Every bound ends the session and removes its sandbox:
    ``idle_ttl_s`` (an abandoned session does not hold memory and a concurrency slot), ``max_lifetime_s``
    (a long-lived sandbox accumulates whatever a compromised tool planted in it), ``max_calls``.
    ``per_principal``: open sessions one principal may hold for this tool (one caller cannot pin the host).
    ``command``: a resident command for sessions (a REPL): it stays up across calls and says when each call
    is done (``TOOLCELL_CALL_FD``); empty: the tool's own command runs once per call in the same sandbox.
    """

    idle_ttl_s: float = 300.0
    max_lifetime_s: float = 3600.0
    max_calls: int = 100
    per_principal: int = 4
    command: tuple[str, ...] = ()
    # As a client sees it (``ListTools``): tools with the same scope share one session (a stock MCP server's
    # tools under one profile); "" in the admin's config (the supervisor derives it).
    scope: str = ""

    def with_idle_ttl(self, seconds: float) -> SessionPolicy:
        return dataclasses.replace(self, idle_ttl_s=seconds)

    def with_max_lifetime(self, seconds: float) -> SessionPolicy:
        return dataclasses.replace(self, max_lifetime_s=seconds)

    def with_max_calls(self, calls: int) -> SessionPolicy:
        return dataclasses.replace(self, max_calls=calls)


@dataclass(frozen=True)
class WorkspacePolicy:
    """Files in and out of one tool's sandbox. Off unless the tool's config has ``workspace:``.

    Inputs are written under ``dir`` (inside the sandbox's scratch tmpfs, never a host path: a workspace
    implies no writable host mount). Outputs are what the tool leaves under ``outputs`` ("" collects
    nothing), read inside the sandbox before it goes (a tmpfs vanishes with it): regular files only, never
    through a symlink, within the caps below, text scrubbed like stdout. Each cap bounds what one call can
    make the supervisor hold (a 1 TiB sparse file, 5,000 files).
    """

    dir: str = "/tmp/workspace"  # noqa: S108 # nosec B108 - inside the sandbox: its private, capped tmpfs
    outputs: str = ""
    max_input_files: int = 32
    # Inputs and outputs travel in one gRPC message each (``server.max_message_bytes``, 4 MiB by default,
    # with the arguments or the output streams beside them): the config check keeps them inside it.
    max_input_bytes: int = 2 * 1024 * 1024
    max_output_files: int = 64
    max_output_bytes: int = 2 * 1024 * 1024
    max_file_bytes: int = 1024 * 1024

    def with_outputs(self, path: str) -> WorkspacePolicy:
        return dataclasses.replace(self, outputs=path)

    def with_output_caps(self, files: int, total_bytes: int, file_bytes: int) -> WorkspacePolicy:
        return dataclasses.replace(self, max_output_files=files, max_output_bytes=total_bytes,
                                   max_file_bytes=file_bytes)


@dataclass(frozen=True)
class InputFile:
    """A file the caller brings into the sandbox's workspace: a relative path (checked) and its bytes."""

    path: str
    data: bytes


@dataclass(frozen=True)
class OutputFile:
    """A file the tool left in its workspace's output directory, as collected.

    Text (UTF-8 without NUL) is scrubbed like stdout and carried in ``text``; anything else is ``data``.
    ``size`` is the file's size in the sandbox; ``truncated``: only the first bytes (the caps) were read.
    """

    path: str
    size: int
    data: bytes = b""
    text: str | None = None
    truncated: bool = False
    media_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Tool:
    """A tool as the admin declared it. Callers can only name it; everything else is fixed here."""

    name: str
    description: str
    image: str
    command: tuple[str, ...]
    profile: str = "default"
    title: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    output_schema: Mapping[str, Any] | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    secrets: tuple[SecretGrant, ...] = ()
    # Added to the profile's environment (a tool source's ``env``).
    env: Mapping[str, str] = field(default_factory=dict)
    # Set for a tool discovered in an MCP server: the command is the in-sandbox driver in front of it.
    source: McpBinding | None = None
    # Sessions (one sandbox across a principal's calls) and workspace files: both off unless configured.
    session: SessionPolicy | None = None
    workspace: WorkspacePolicy | None = None


@dataclass(frozen=True)
class ToolOverride:
    """The admin's word on one tool of a tool source; unset fields keep what the server declared."""

    profile: str | None = None
    title: str | None = None
    description: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    # Neither listed nor callable.
    hidden: bool = False


@dataclass(frozen=True)
class ToolSource:
    """A stock MCP server (stdio) whose tools are discovered by running it in a sandbox.

    Each call of one of its tools gets a fresh sandbox under ``profile`` holding a fresh server process:
    nothing a server keeps in memory or on disk outlives the call. ``command`` is the server's own argv
    inside ``image``; the supervisor puts its in-sandbox driver in front of it.
    """

    name: str
    image: str
    command: tuple[str, ...]
    profile: str = "default"
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[SecretGrant, ...] = ()
    # None: the server's roots/list requests are refused.
    roots: tuple[Mapping[str, str], ...] | None = None
    discovery_timeout_s: float = 60.0
    overrides: Mapping[str, ToolOverride] = field(default_factory=dict)
    # Sessions of this server's tools: one sandbox (one server process) across a principal's calls.
    session: SessionPolicy | None = None


@dataclass(frozen=True)
class InvocationRequest:
    tool: str
    arguments_json: str
    invocation_id: str = ""
    caller_metadata: Mapping[str, str] = field(default_factory=dict)
    # Absolute monotonic deadline from the transport (gRPC deadline), if any.
    deadline_s: float | None = None
    # The caller's open session to run in ("": a fresh sandbox for this call alone).
    session_id: str = ""
    # Files for the tool's workspace (the tool must have one).
    files: tuple[InputFile, ...] = ()


@dataclass(frozen=True)
class Started:
    invocation_id: str
    sandbox_id: str
    profile: str
    tool: str
    trace_id: str


@dataclass(frozen=True)
class OutputChunk:
    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class Progress:
    """A progress notification from an MCP server's tool, its message scrubbed."""

    progress: float
    total: float | None = None
    message: str = ""


@dataclass(frozen=True)
class Usage:
    """What the engine could report; 0 means unknown."""

    peak_memory_bytes: int = 0
    cpu_time_ns: int = 0


@dataclass(frozen=True)
class EgressDestination:
    """One destination a granted sandbox asked its proxy for, as the proxy accounted it.

    ``bytes_up`` flowed from the sandbox to the destination, ``bytes_down`` back. ``reason`` says why a
    refused request was refused (``not-granted``, ``ip-literal``, ``private-address`` ...).
    """

    host: str
    port: int
    allowed: bool
    reason: str = ""
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class Result:
    status: Status
    exit_code: int
    output: str
    stderr: str
    truncated: bool
    duration_ms: int
    usage: Usage
    trace_id: str
    invocation_id: str
    message: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    sandbox_id: str = ""
    # What scrubbing did, by kind (counts only, never the values).
    redactions: Mapping[str, int] = field(default_factory=dict)
    sanitized: Mapping[str, int] = field(default_factory=dict)
    injection_markers: Mapping[str, int] = field(default_factory=dict)
    # The tool's stdout parsed as JSON, when it is an object valid against the tool's output schema.
    structured_content: Mapping[str, Any] | None = None
    # Network grants: every destination the sandbox asked for (empty when the tool has no grant).
    egress: tuple[EgressDestination, ...] = ()
    # A tool from an MCP server: its CallToolResult's content blocks (MCP shapes: text, image, audio,
    # resource, resource_link), every text scrubbed; ``output`` holds their texts joined.
    content: tuple[Mapping[str, Any], ...] = ()
    # The server's ``isError``: the tool ran and reported a failure (status is ERROR then).
    is_error: bool = False
    # Files the tool left in its workspace's output directory (text scrubbed).
    files: tuple[OutputFile, ...] = ()
    # The session the call ran in, if any.
    session_id: str = ""


Event = Started | OutputChunk | Progress | Result
