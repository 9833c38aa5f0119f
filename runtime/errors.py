"""The one error hierarchy of toolcell.

Every failure the supervisor can report is one of these; foreign errors (docker, grpc, yaml,
jsonschema, OS) are translated at the seam where they occur (``raise XError(...) from exc``).
``server/status.py`` maps each class to exactly one gRPC status code, the CLI maps them to exit codes.

    ToolcellError
    ├── ConfigError              the admin's config is invalid (refuse to start / reload)
    │   └── UnsafePath           a directory/file/socket we would trust is not ours alone (safepath.py)
    ├── ToolNotFound             the caller named a tool that does not exist      -> NOT_FOUND
    ├── InvalidArguments         arguments are not JSON or break the schema       -> INVALID_ARGUMENT
    ├── InvocationConflict       invocation id already in use                     -> ALREADY_EXISTS
    ├── InvocationNotFound       cancel/lookup of an id that is not running       -> NOT_FOUND
    ├── SessionNotFound          no open session of this caller has the id        -> NOT_FOUND
    ├── SessionRefused           the tool allows no session / no files            -> FAILED_PRECONDITION
    ├── Unauthenticated          no or bad credentials (reason safe to show)      -> UNAUTHENTICATED
    ├── PermissionDenied         caller may not do this                           -> PERMISSION_DENIED
    ├── ResourceExhausted        over a limit; ``retry_after_ms`` is the hint      -> RESOURCE_EXHAUSTED
    │   ├── RateLimited          token bucket or concurrency cap
    │   └── HostOverloaded       admission control: host short of memory or CPU
    ├── AuditUnavailable         the audit record could not be written (fail closed) -> UNAVAILABLE
    ├── SourceUnavailable        a tool source (MCP server) failed its discovery  -> UNAVAILABLE
    ├── SecretError              a granted secret is missing or can't be opened   -> FAILED_PRECONDITION
    ├── BackendError             the sandbox engine failed                        -> INTERNAL
    │   ├── EngineUnavailable    engine unreachable or restarted mid-call         -> UNAVAILABLE
    │   ├── ImageMissing         the tool's image is not present on the engine    -> FAILED_PRECONDITION
    │   └── RuntimeMissing       the profile's OCI runtime is not installed       -> FAILED_PRECONDITION
    └── ShuttingDown             the supervisor is draining                       -> UNAVAILABLE
"""

from __future__ import annotations

from toolcell.quoting import quote


class ToolcellError(Exception):
    """Base of every error toolcell raises on purpose."""


class ConfigError(ToolcellError):
    """The configuration is invalid; ``key`` names the offending setting when known."""

    def __init__(self, message: str, key: str = "") -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class ToolNotFound(ToolcellError):
    def __init__(self, tool: str) -> None:
        self.tool = tool
        super().__init__(f"unknown tool {quote(tool)}")


class InvalidArguments(ToolcellError):
    """Arguments rejected before any sandbox exists; ``path`` is a JSON pointer-ish field path.

    Raisers quote caller values in ``message`` and ``path`` only through ``toolcell.quoting``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class InvocationConflict(ToolcellError):
    @classmethod
    def running(cls, invocation_id: str) -> InvocationConflict:
        """The caller's id names a run in progress (the id is quoted short and escaped)."""
        return cls(f"invocation {quote(invocation_id)} is already running")


class InvocationNotFound(ToolcellError):
    @classmethod
    def running(cls, invocation_id: str) -> InvocationNotFound:
        """No run of this caller has the id (the id is quoted short and escaped)."""
        return cls(f"no running invocation {quote(invocation_id)}")


class SessionNotFound(ToolcellError):
    """No open session of this caller has the id: another principal's session looks exactly like none."""


class SessionRefused(ToolcellError):
    """The tool does not allow what the call asks: a session, or workspace files (the admin's config)."""


class Unauthenticated(ToolcellError):
    """The caller did not prove who it is. The message helps the caller and names no secret."""


class PermissionDenied(ToolcellError):
    @classmethod
    def to(cls, action: str, tool: str) -> PermissionDenied:
        """The caller may not ``action`` the tool it named (the name is quoted short and escaped)."""
        return cls(f"not permitted to {action} tool {quote(tool)}")


class ResourceExhausted(ToolcellError):
    """Over a limit; the caller may retry after ``retry_after_ms`` (sent as trailing metadata)."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        self.retry_after_ms = retry_after_ms
        super().__init__(message)


class RateLimited(ResourceExhausted):
    pass


class HostOverloaded(ResourceExhausted):
    pass


class AuditUnavailable(ToolcellError):
    pass
class SourceUnavailable(ToolcellError):
    """A tool source's server could not be discovered: its tools are not served (the message names it)."""


class SecretError(ToolcellError):
    """A secret is missing, malformed or can't be decrypted. Messages never carry secret values."""


class BackendError(ToolcellError):
    """The sandbox engine failed in a way that is not the tool's fault."""


class EngineUnavailable(BackendError):
    pass


class ImageMissing(BackendError):
    def __init__(self, image: str) -> None:
        self.image = image
        super().__init__(f"image {image!r} is not present on the engine; build it with `toolcell images build`")


class RuntimeMissing(BackendError):
    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        super().__init__(
            f"OCI runtime {runtime!r} is not configured on the engine; install it (e.g. Debian's `runsc`) "
            "and register it in /etc/docker/daemon.json"
        )


class ShuttingDown(ToolcellError):
    def __init__(self) -> None:
        super().__init__("supervisor is shutting down")
