"""The one error hierarchy of toolcell.

Every failure the supervisor can report is one of these; foreign errors (docker, grpc, yaml,
jsonschema, OS) are translated at the seam where they occur (``raise XError(...) from exc``).
``server/status.py`` maps each class to exactly one gRPC status code, the CLI maps them to exit codes.

    ToolcellError
    ├── ConfigError              the admin's config is invalid (refuse to start / reload)
    ├── ToolNotFound             the caller named a tool that does not exist      -> NOT_FOUND
    ├── InvalidArguments         arguments are not JSON or break the schema       -> INVALID_ARGUMENT
    ├── InvocationConflict       invocation id already in use                     -> ALREADY_EXISTS
    ├── InvocationNotFound       cancel/lookup of an id that is not running       -> NOT_FOUND
    ├── PermissionDenied         caller may not do this                           -> PERMISSION_DENIED
    ├── SecretError              a granted secret is missing or can't be opened   -> FAILED_PRECONDITION
    ├── BackendError             the sandbox engine failed                        -> INTERNAL
    │   ├── EngineUnavailable    engine unreachable or restarted mid-call         -> UNAVAILABLE
    │   ├── ImageMissing         the tool's image is not present on the engine    -> FAILED_PRECONDITION
    │   └── RuntimeMissing       the profile's OCI runtime is not installed       -> FAILED_PRECONDITION
    └── ShuttingDown             the supervisor is draining                       -> UNAVAILABLE
"""

from __future__ import annotations


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
        super().__init__(f"unknown tool {tool!r}")


class InvalidArguments(ToolcellError):
    """Arguments rejected before any sandbox exists; ``path`` is a JSON pointer-ish field path."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class InvocationConflict(ToolcellError):
    pass


class InvocationNotFound(ToolcellError):
    pass


class PermissionDenied(ToolcellError):
    pass


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
