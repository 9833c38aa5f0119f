"""Workspace files on the supervisor's side: the caller's inputs checked and encoded, the tool's outputs parsed.

Pure (no engine, no I/O). The in-sandbox half is ``runtime/data/workspace.py``; between the two, inputs
travel as ``[{"path": "rel/path", "data": "<base64>"}]`` in the claim, outputs as one JSON payload::

    {"files": [{"path": str, "size": int, "data": "<base64>", "truncated": bool}],
     "skipped": {"<reason>": count}, "truncated": bool}

A caller's input that breaks a rule is refused with ``InvalidArguments`` naming ``files`` or
``files[i].path`` and the limit, never quoting more than a short escaped part of a name.

The payload comes from the sandbox and is hostile. ``parse_collected`` never raises on it: anything wrong
is skipped and counted by reason in ``skipped`` (a payload over ``payload_cap``, not ASCII, not JSON,
nested too deep or of the wrong shape: no files and ``invalid_payload``), and every cost is linear in a
payload already capped. What it keeps is within the policy's caps, has clean unique names, and is
scrubbed: a text file (UTF-8 without NUL) exactly like stdout (``scrub``: escapes, controls and invisible
characters removed, NFKC, secrets redacted); a binary file is kept as bytes unless a secret shows in it,
then it is withheld (``secret_in_binary``). Supervisor-side reasons: ``invalid`` (an entry of the wrong
shape, bad base64, data longer than its size), ``bad_name`` (unclean, or changed by sanitizing:
bidi/zero-width/compatibility characters), ``secret_in_name``, ``duplicate``, ``over_cap`` (a file over
``max_file_bytes`` or past ``max_output_bytes`` in all), ``too_many`` (past ``max_output_files``).
Scrubbing is CPU-bound (a few MiB of text): call ``parse_collected`` off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import mimetypes
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toolcell.errors import InvalidArguments
from toolcell.model import InputFile, OutputFile, WorkspacePolicy
from toolcell.policy.scrub import Redactor, sanitize, scrub
from toolcell.quoting import quote

MAX_DEPTH = 16  # path components (the in-sandbox walk stops there too)
MAX_NAME_BYTES = 255  # per component
MAX_PATH_CHARS = MAX_DEPTH * (MAX_NAME_BYTES + 1)
QUOTE_CHARS = 40  # of a caller's name in a message
TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
BINARY_MEDIA_TYPE = "application/octet-stream"

# One file's JSON besides its base64: its path (ASCII JSON escapes a non-ASCII character as \uXXXX, one
# or two per character: at most 3 characters per UTF-8 byte), the keys, the size and the flag.
_ENTRY_OVERHEAD = 3 * (MAX_PATH_CHARS - 1) + 128
_PAYLOAD_OVERHEAD = 4096  # braces, keys, the skipped counts
_MAX_SKIPPED_KEYS = 32
_MAX_COUNT = 1 << 31
_REASON = re.compile(r"[a-z][a-z_]{0,31}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
# A binary file is never labelled as text: a client would decode it and show it unscrubbed.
_TEXTUAL_SUBTYPES = ("json", "xml", "javascript", "ecmascript", "script", "mpegurl", "x-sh", "x-csh", "x-tex",
                     "x-latex", "x-texinfo", "x-troff", "rtf", "postscript", "x-python", "x-perl", "x-shar")


@dataclass(frozen=True)
class CollectedFiles:
    """What one call's outputs came to: the files kept (scrubbed) and what was not, counted by reason.

    ``truncated``: something the tool left is missing or cut (the sandbox's caps, or this side's);
    ``redactions``/``sanitized``: counts by kind over the text files (and secrets in withheld binaries).
    """

    files: tuple[OutputFile, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: bool = False
    redactions: dict[str, int] = field(default_factory=dict)
    sanitized: dict[str, int] = field(default_factory=dict)


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a clean relative file path (None: it is). Cost bounded by MAX_PATH_CHARS."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    if len(path) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if path.startswith("/"):
        return "must be relative"
    if _CONTROL.search(path):
        return "has a control character or backslash"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        return f"has more than {MAX_DEPTH} components"
    for part in parts:
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' component"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"has a component longer than {MAX_NAME_BYTES} bytes"
    return None


def check_inputs(files: Sequence[InputFile], policy: WorkspacePolicy) -> None:
    """Refuse input files the policy does not allow (``InvalidArguments``): too many, too large in all,
    an unclean path, a duplicate, or a path that is also a directory of another file."""
    if len(files) > policy.max_input_files:
        raise InvalidArguments(f"at most {policy.max_input_files} files (got {len(files)})", path="files")
    total = sum(len(f.data) for f in files)
    if total > policy.max_input_bytes:
        raise InvalidArguments(f"at most {policy.max_input_bytes} bytes in all (got {total})", path="files")
    seen: dict[str, int] = {}
    for i, f in enumerate(files):
        problem = path_problem(f.path)
        if problem is not None:
            shown = quote(f.path, QUOTE_CHARS) if isinstance(f.path, str) else type(f.path).__name__
            raise InvalidArguments(f"{shown} {problem}", path=f"files[{i}].path")
        if f.path in seen:
            raise InvalidArguments(f"{quote(f.path, QUOTE_CHARS)} is also files[{seen[f.path]}].path",
                                   path=f"files[{i}].path")
        seen[f.path] = i
    for i, f in enumerate(files):
        parts = f.path.split("/")
        for k in range(1, len(parts)):
            other = seen.get("/".join(parts[:k]))
            if other is not None:
                raise InvalidArguments(f"a directory of {quote(f.path, QUOTE_CHARS)} is files[{other}].path",
                                       path=f"files[{i}].path")


def encode_inputs(files: Sequence[InputFile]) -> list[dict[str, str]]:
    """The claim's ``inputs``: each file's path and its bytes in base64."""
    return [{"path": f.path, "data": base64.b64encode(f.data).decode("ascii")} for f in files]


def payload_cap(policy: WorkspacePolicy) -> int:
    """The largest files payload the supervisor accepts: base64 of ``max_output_bytes`` (and of each file's
    padding), each file's JSON around it with the longest path, and the skipped counts."""
    files = max(0, policy.max_output_files)
    return 4 * (max(0, policy.max_output_bytes) // 3 + files + 1) + files * _ENTRY_OVERHEAD + _PAYLOAD_OVERHEAD


def media_type(path: str) -> str:
    """The media type of a binary file by its name; never a textual one (its bytes are not UTF-8)."""
    guessed, encoding = mimetypes.guess_type(path, strict=True)
    if encoding is not None:
        return _COMPRESSED.get(encoding, BINARY_MEDIA_TYPE)
    if not guessed or "/" not in guessed:
        return BINARY_MEDIA_TYPE
    major, subtype = guessed.split("/", 1)
    if major == "text" or major not in ("image", "audio", "video", "font", "application"):
        return BINARY_MEDIA_TYPE
    if any(marker in subtype for marker in _TEXTUAL_SUBTYPES):
        return BINARY_MEDIA_TYPE
    return guessed


def _as_text(data: bytes, truncated: bool) -> str | None:
    """``data`` as text if it is UTF-8 without NUL (a cut file may end in part of a character), else None."""
    try:
        text = codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT


@dataclass
class _Parse:
    """One parse's running state."""

    policy: WorkspacePolicy
    redactor: Redactor
    files: list[OutputFile] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: bool = False
    redactions: Counter[str] = field(default_factory=Counter)
    sanitized: Counter[str] = field(default_factory=Counter)
    paths: set[str] = field(default_factory=set)
    total: int = 0

    def result(self) -> CollectedFiles:
        return CollectedFiles(tuple(self.files), dict(self.skipped), self.truncated, dict(self.redactions),
                              dict(self.sanitized))

    def skip(self, reason: str, truncates: bool = False) -> None:
        self.skipped[reason] += 1
        self.truncated = self.truncated or truncates

    def sandbox_counts(self, skipped: object) -> None:
        """Add the sandbox's own ``skipped`` counts (clean reasons, bounded counts; else ``invalid``)."""
        if not isinstance(skipped, dict) or len(skipped) > _MAX_SKIPPED_KEYS:
            self.skip("invalid")
            return
        for reason, count in skipped.items():
            if not isinstance(reason, str) or not _REASON.fullmatch(reason) or not _is_count(count):
                self.skip("invalid")
                return
        for reason, count in skipped.items():
            self.skipped[reason] += count

    def entry(self, item: object) -> None:
        """Keep one file entry if it is well formed, within the caps and clean; else count why not."""
        if len(self.files) >= self.policy.max_output_files:
            self.skip("too_many", truncates=True)
            return
        if not isinstance(item, dict):
            self.skip("invalid")
            return
        path, size, data, cut = item.get("path"), item.get("size"), item.get("data"), item.get("truncated")
        if not isinstance(data, str) or not isinstance(cut, bool) or not isinstance(size, int) \
                or isinstance(size, bool) or size < 0:
            self.skip("invalid")
            return
        if path_problem(path) is not None or not isinstance(path, str) or sanitize(path)[0] != path:
            self.skip("bad_name")
            return
        if path in self.paths:
            self.skip("duplicate")
            return
        room = min(self.policy.max_file_bytes, self.policy.max_output_bytes - self.total)
        if len(data) > 4 * (room // 3 + 1):  # more than ``room`` bytes: not even decoded
            self.skip("over_cap", truncates=True)
            return
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self.skip("invalid")
            return
        if len(raw) > room:
            self.skip("over_cap", truncates=True)
            return
        if len(raw) > size:
            self.skip("invalid")
            return
        if self.redactor.spans(path):
            self.skip("secret_in_name")
            return
        cut = cut or len(raw) < size
        kept = self.scrubbed(path, size, raw, cut)
        if kept is None:
            return
        self.paths.add(path)
        self.total += len(raw)
        self.truncated = self.truncated or cut
        self.files.append(kept)

    def scrubbed(self, path: str, size: int, raw: bytes, cut: bool) -> OutputFile | None:
        text = _as_text(raw, cut)
        if text is not None:
            clean, redactions, sanitized = scrub(text, self.redactor)
            self.redactions.update(redactions)
            self.sanitized.update(sanitized)
            return OutputFile(path=path, size=size, text=clean, truncated=cut, media_type=TEXT_MEDIA_TYPE)
        found = self.redactor.spans(raw.decode("utf-8", "replace"))
        if found:
            self.redactions.update(kind for _, _, kind in found)
            self.skip("secret_in_binary")
            return None
        return OutputFile(path=path, size=size, data=raw, truncated=cut, media_type=media_type(path))


def parse_collected(payload: bytes, policy: WorkspacePolicy, redactor: Redactor) -> CollectedFiles:
    """The files a sandbox reported, checked against ``policy`` and scrubbed with ``redactor``.

    Never raises on a bad payload: it is reported in ``skipped`` (see the module docstring). Linear in the
    payload, which is refused whole past ``payload_cap(policy)``.
    """
    state = _Parse(policy, redactor)
    document = _load(payload, policy)
    if document is None:
        state.skip("invalid_payload", truncates=True)
        return state.result()
    files, skipped, truncated = document.get("files"), document.get("skipped", {}), document.get("truncated")
    if not isinstance(files, list) or not isinstance(truncated, bool):
        state.skip("invalid_payload", truncates=True)
        return state.result()
    state.truncated = truncated
    state.sandbox_counts(skipped)
    for item in files:
        state.entry(item)
    return state.result()


def _load(payload: bytes, policy: WorkspacePolicy) -> dict[str, Any] | None:
    """The payload's JSON object, or None: over the cap, not ASCII, not JSON (or nested past the
    interpreter's recursion limit), not an object."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > payload_cap(policy):
        return None
    try:
        document = json.loads(payload.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None
