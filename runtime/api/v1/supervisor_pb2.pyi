from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_ERROR: _ClassVar[Status]
    STATUS_TIMEOUT: _ClassVar[Status]
    STATUS_OOM: _ClassVar[Status]
    STATUS_KILLED: _ClassVar[Status]
    STATUS_DENIED: _ClassVar[Status]
    STATUS_INVALID: _ClassVar[Status]
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_ERROR: Status
STATUS_TIMEOUT: Status
STATUS_OOM: Status
STATUS_KILLED: Status
STATUS_DENIED: Status
STATUS_INVALID: Status

class OpenSessionRequest(_message.Message):
    __slots__ = ("tool",)
    TOOL_FIELD_NUMBER: _ClassVar[int]
    tool: str
    def __init__(self, tool: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "tool", "idle_ttl_seconds", "max_lifetime_seconds", "max_calls", "sandbox_id", "tools")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tool: str
    idle_ttl_seconds: float
    max_lifetime_seconds: float
    max_calls: int
    sandbox_id: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., tool: _Optional[str] = ..., idle_ttl_seconds: _Optional[float] = ..., max_lifetime_seconds: _Optional[float] = ..., max_calls: _Optional[int] = ..., sandbox_id: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: int
    def __init__(self, calls: _Optional[int] = ...) -> None: ...

class File(_message.Message):
    __slots__ = ("path", "content", "text", "is_text", "size", "truncated", "media_type")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    content: bytes
    text: str
    is_text: bool
    size: int
    truncated: bool
    media_type: str
    def __init__(self, path: _Optional[str] = ..., content: _Optional[bytes] = ..., text: _Optional[str] = ..., is_text: _Optional[bool] = ..., size: _Optional[int] = ..., truncated: _Optional[bool] = ..., media_type: _Optional[str] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("tool", "arguments_json", "invocation_id", "caller_metadata", "arguments", "session_id", "files")
    class CallerMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_METADATA_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    tool: str
    arguments_json: str
    invocation_id: str
    caller_metadata: _containers.ScalarMap[str, str]
    arguments: _struct_pb2.Struct
    session_id: str
    files: _containers.RepeatedCompositeFieldContainer[File]
    def __init__(self, tool: _Optional[str] = ..., arguments_json: _Optional[str] = ..., invocation_id: _Optional[str] = ..., caller_metadata: _Optional[_Mapping[str, str]] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., session_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[File, _Mapping]]] = ...) -> None: ...

class ExecuteEvent(_message.Message):
    __slots__ = ("started", "stdout", "stderr", "result", "progress")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    started: Started
    stdout: OutputChunk
    stderr: OutputChunk
    result: Result
    progress: Progress
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., stdout: _Optional[_Union[OutputChunk, _Mapping]] = ..., stderr: _Optional[_Union[OutputChunk, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("progress", "total", "message")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    progress: float
    total: float
    message: str
    def __init__(self, progress: _Optional[float] = ..., total: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("invocation_id", "sandbox_id", "profile", "tool", "trace_id")
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    invocation_id: str
    sandbox_id: str
    profile: str
    tool: str
    trace_id: str
    def __init__(self, invocation_id: _Optional[str] = ..., sandbox_id: _Optional[str] = ..., profile: _Optional[str] = ..., tool: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("peak_memory_bytes", "cpu_time_ns")
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    peak_memory_bytes: int
    cpu_time_ns: int
    def __init__(self, peak_memory_bytes: _Optional[int] = ..., cpu_time_ns: _Optional[int] = ...) -> None: ...

class EgressDestination(_message.Message):
    __slots__ = ("host", "port", "allowed", "reason", "connections", "bytes_up", "bytes_down")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    allowed: bool
    reason: str
    connections: int
    bytes_up: int
    bytes_down: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., connections: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("status", "exit_code", "output", "stderr", "truncated", "duration_ms", "usage", "trace_id", "invocation_id", "message", "stdout_bytes", "stderr_bytes", "sandbox_id", "redactions", "sanitized", "injection_markers", "structured_content_json", "egress", "content_json", "is_error", "files", "session_id")
    class RedactionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SanitizedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class InjectionMarkersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    SANITIZED_FIELD_NUMBER: _ClassVar[int]
    INJECTION_MARKERS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_CONTENT_JSON_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_JSON_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    status: Status
    exit_code: int
    output: str
    stderr: str
    truncated: bool
    duration_ms: int
    usage: Usage
    trace_id: str
    invocation_id: str
    message: str
    stdout_bytes: int
    stderr_bytes: int
    sandbox_id: str
    redactions: _containers.ScalarMap[str, int]
    sanitized: _containers.ScalarMap[str, int]
    injection_markers: _containers.ScalarMap[str, int]
    structured_content_json: str
    egress: _containers.RepeatedCompositeFieldContainer[EgressDestination]
    content_json: str
    is_error: bool
    files: _containers.RepeatedCompositeFieldContainer[File]
    session_id: str
    def __init__(self, status: _Optional[_Union[Status, str]] = ..., exit_code: _Optional[int] = ..., output: _Optional[str] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., duration_ms: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., trace_id: _Optional[str] = ..., invocation_id: _Optional[str] = ..., message: _Optional[str] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., sandbox_id: _Optional[str] = ..., redactions: _Optional[_Mapping[str, int]] = ..., sanitized: _Optional[_Mapping[str, int]] = ..., injection_markers: _Optional[_Mapping[str, int]] = ..., structured_content_json: _Optional[str] = ..., egress: _Optional[_Iterable[_Union[EgressDestination, _Mapping]]] = ..., content_json: _Optional[str] = ..., is_error: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[File, _Mapping]]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ListToolsRequest(_message.Message):
    __slots__ = ("cursor",)
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    def __init__(self, cursor: _Optional[str] = ...) -> None: ...

class ToolAnnotations(_message.Message):
    __slots__ = ("title", "read_only_hint", "destructive_hint", "idempotent_hint", "open_world_hint")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_HINT_FIELD_NUMBER: _ClassVar[int]
    DESTRUCTIVE_HINT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_HINT_FIELD_NUMBER: _ClassVar[int]
    OPEN_WORLD_HINT_FIELD_NUMBER: _ClassVar[int]
    title: str
    read_only_hint: bool
    destructive_hint: bool
    idempotent_hint: bool
    open_world_hint: bool
    def __init__(self, title: _Optional[str] = ..., read_only_hint: _Optional[bool] = ..., destructive_hint: _Optional[bool] = ..., idempotent_hint: _Optional[bool] = ..., open_world_hint: _Optional[bool] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "title", "description", "input_schema_json", "output_schema_json", "annotations", "allows_sessions", "session_idle_ttl_seconds", "session_max_calls", "takes_files", "max_input_files", "max_input_bytes", "returns_files", "session_scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOWS_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    TAKES_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FILES_FIELD_NUMBER: _ClassVar[int]
    SESSION_SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    description: str
    input_schema_json: str
    output_schema_json: str
    annotations: ToolAnnotations
    allows_sessions: bool
    session_idle_ttl_seconds: float
    session_max_calls: int
    takes_files: bool
    max_input_files: int
    max_input_bytes: int
    returns_files: bool
    session_scope: str
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., input_schema_json: _Optional[str] = ..., output_schema_json: _Optional[str] = ..., annotations: _Optional[_Union[ToolAnnotations, _Mapping]] = ..., allows_sessions: _Optional[bool] = ..., session_idle_ttl_seconds: _Optional[float] = ..., session_max_calls: _Optional[int] = ..., takes_files: _Optional[bool] = ..., max_input_files: _Optional[int] = ..., max_input_bytes: _Optional[int] = ..., returns_files: _Optional[bool] = ..., session_scope: _Optional[str] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "next_cursor")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    next_cursor: str
    def __init__(self, tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("invocation_id",)
    INVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    invocation_id: str
    def __init__(self, invocation_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...
