"""Caller strings checked at the API edge, before anything else (limiter, audit, logs, spans) uses them.

A request's tool name, invocation id and metadata are the caller's choice and hostile: bounded
lengths and small character sets here mean every later step sees short, printable values. Each check
is a length test first (constant time) and then one linear scan; a rejection names the field in
``path`` and quotes at most a short escaped prefix of the value (``toolcell.quoting.quote``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from toolcell.errors import InvalidArguments
from toolcell.model import InvocationRequest
from toolcell.policy.arguments import ArgumentLimits
from toolcell.quoting import quote

__all__ = ["RequestLimits", "check_cancel", "check_invocation_id", "check_request", "check_session_id",
           "check_tool_name", "quote"]

# Names and ids: the characters a label, a log field or a file name can carry unchanged.
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
# Metadata keys may also carry "/" (e.g. "mcp/request_id", "x.example/trace").
_SESSION_ID = re.compile(r"ses_[0-9a-f]{32}")
_META_KEY = re.compile(r"[A-Za-z0-9_.:/-]+")
# Metadata values: any text but control characters (C0, DEL, C1), lone surrogates and the
# invisible/bidi format characters that make a log line read differently from what it holds.
_META_VALUE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a request's caller strings. Defaults are the supervisor's; nothing in config changes them."""

    max_tool_name: int = 128
    min_invocation_id: int = 8
    max_invocation_id: int = 128
    max_metadata_entries: int = 32
    max_metadata_key: int = 64
    max_metadata_value_bytes: int = 1024
    max_metadata_total_bytes: int = 8 * 1024
    # Input files of one request, whatever the tool: each tool's workspace caps are smaller or equal.
    max_files: int = 256
    max_files_bytes: int = 64 * 1024 * 1024


DEFAULT_REQUEST_LIMITS = RequestLimits()


def check_tool_name(tool: str, limits: RequestLimits = DEFAULT_REQUEST_LIMITS) -> None:
    """Non-empty, at most ``max_tool_name`` characters of ``[A-Za-z0-9_.:-]``."""
    if not tool:
        raise InvalidArguments("a tool name is required", path="tool")
    if len(tool) > limits.max_tool_name:
        raise InvalidArguments(f"longer than {limits.max_tool_name} characters: {quote(tool)}", path="tool")
    if not _NAME.fullmatch(tool):
        raise InvalidArguments(f"must be characters of [A-Za-z0-9_.:-]: {quote(tool)}", path="tool")


def check_invocation_id(invocation_id: str, limits: RequestLimits = DEFAULT_REQUEST_LIMITS, *,
                        required: bool = False) -> None:
    """Empty (the supervisor picks one) unless ``required``, else 8-128 characters of ``[A-Za-z0-9_.:-]``."""
    if not invocation_id and not required:
        return
    lo, hi = limits.min_invocation_id, limits.max_invocation_id
    if not lo <= len(invocation_id) <= hi or not _NAME.fullmatch(invocation_id):
        raise InvalidArguments(f"must be {lo}-{hi} characters of [A-Za-z0-9_.:-]: {quote(invocation_id)}",
                               path="invocation_id")


def check_caller_metadata(metadata: Mapping[str, str], limits: RequestLimits = DEFAULT_REQUEST_LIMITS) -> None:
    """At most 32 entries; keys of a safe set up to 64 characters; values up to 1 KiB; 8 KiB in all."""
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArguments(f"more than {limits.max_metadata_entries} entries ({len(metadata)})",
                               path="caller_metadata")
    total = 0
    for key, value in metadata.items():
        if not key or len(key) > limits.max_metadata_key or not _META_KEY.fullmatch(key):
            raise InvalidArguments(f"key must be 1-{limits.max_metadata_key} characters of [A-Za-z0-9_.:/-]: "
                                   f"{quote(key)}", path="caller_metadata")
        where = f"caller_metadata[{key}]"  # the key is checked: short and printable
        # Characters first (a constant-time bound on the encoding below), then UTF-8 bytes.
        if len(value) > limits.max_metadata_value_bytes:
            raise InvalidArguments(f"value longer than {limits.max_metadata_value_bytes} bytes", path=where)
        bad = _META_VALUE_BAD.search(value)
        if bad is not None:
            raise InvalidArguments(f"value holds a control, surrogate or invisible character "
                                   f"{quote(bad.group())} at {bad.start()}", path=where)
        size = len(value.encode("utf-8"))
        if size > limits.max_metadata_value_bytes:
            raise InvalidArguments(f"value longer than {limits.max_metadata_value_bytes} bytes", path=where)
        total += len(key) + size
        if total > limits.max_metadata_total_bytes:
            raise InvalidArguments(f"more than {limits.max_metadata_total_bytes} bytes in all",
                                   path="caller_metadata")


def check_arguments_size(arguments_json: str, limits: ArgumentLimits) -> None:
    """The arguments text within ``max_argument_bytes`` (UTF-8), before anything parses it."""
    cap = limits.max_argument_bytes
    # A character is at least one byte: a text longer in characters than the cap is over it in bytes.
    if len(arguments_json) > cap or len(arguments_json.encode("utf-8", "surrogatepass")) > cap:
        raise InvalidArguments(f"arguments exceed {cap} bytes", path="arguments_json")


def check_request(req: InvocationRequest, limits: ArgumentLimits,
                  strings: RequestLimits = DEFAULT_REQUEST_LIMITS) -> None:
    """Every caller string of an Execute/Call request within bounds; raise InvalidArguments naming the field.

    Run first, before authentication records, rate limiting, audit, logs or spans use the request.
    """
    check_tool_name(req.tool, strings)
    check_invocation_id(req.invocation_id, strings)
    check_caller_metadata(req.caller_metadata, strings)
    check_arguments_size(req.arguments_json, limits)
    check_session_id(req.session_id)
    # Input files: their count and total size here, before anything copies them; names and the tool's own
    # caps are the workspace's checks (``toolcell.workspace.check_inputs``), once the tool is known.
    if len(req.files) > strings.max_files:
        raise InvalidArguments(f"more than {strings.max_files} files ({len(req.files)})", path="files")
    if sum(len(f.data) + len(f.path) for f in req.files) > strings.max_files_bytes:
        raise InvalidArguments(f"files exceed {strings.max_files_bytes} bytes in all", path="files")


def check_session_id(session_id: str, *, required: bool = False) -> None:
    """Empty (no session) unless ``required``, else a session id's shape: "ses_" and 32 hex digits."""
    if not session_id and not required:
        return
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidArguments(f"not a session id: {quote(session_id)}", path="session_id")


def check_cancel(invocation_id: str, strings: RequestLimits = DEFAULT_REQUEST_LIMITS) -> None:
    """A Cancel request's invocation id: required, same format as in Execute."""
    check_invocation_id(invocation_id, strings, required=True)
