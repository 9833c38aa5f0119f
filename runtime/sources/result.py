"""A server's CallToolResult, as the driver reported it, into scrubbed content blocks. Pure.

Every string the server returns is hostile: texts (text blocks, embedded resources' text, URIs, names,
structured content's keys and values, annotations) are sanitized and secrets redacted like stdout;
binary payloads (images, audio, blobs) must be valid base64 with a media type of the right family. A
block that fails is replaced by a text block saying what was dropped, never passed through and never
silently lost. Every step is linear in the size of the result, which the frame cap already bounds.
"""

from __future__ import annotations

import binascii
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from toolcell.policy.linear import compile_linear
from toolcell.policy.scrub import Redactor, scrub

MAX_BLOCKS = 1000
# Short fields (URIs, names, media types, annotation values): longer is cut, not an error.
SHORT_MAX_CHARS = 2048
_MIME = {"image": compile_linear(r"^image/[A-Za-z0-9.+-]{1,64}$"),
         "audio": compile_linear(r"^audio/[A-Za-z0-9.+-]{1,64}$"),
         "any": compile_linear(r"^[A-Za-z0-9.+-]{1,64}/[A-Za-z0-9.+-]{1,64}(;[ -~]{0,128})?$")}
_AUDIENCE = frozenset({"user", "assistant"})


@dataclass
class Scrubbed:
    """Counts of what scrubbing did over one result (by kind), and the texts it released."""

    redactor: Redactor
    redactions: Counter[str] = field(default_factory=Counter)
    sanitized: Counter[str] = field(default_factory=Counter)
    texts: list[str] = field(default_factory=list)

    def text(self, value: object, *, keep: bool = True, limit: int | None = None) -> str:
        """A server string, sanitized and redacted (non-strings become ""); ``keep``: it is content."""
        if not isinstance(value, str):
            return ""
        out, redactions, sanitized = scrub(value if limit is None else value[:limit], self.redactor)
        self.redactions.update(redactions)
        self.sanitized.update(sanitized)
        if keep:
            self.texts.append(out)
        return out

    def json(self, value: Any) -> Any:
        """Every string of a JSON value (keys too) scrubbed; the value's shape kept."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, dict):
            return {self.text(k, keep=False, limit=SHORT_MAX_CHARS): self.json(v) for k, v in value.items()}
        return value


@dataclass(frozen=True)
class CallContent:
    """What a call returned, ready for ``Result``: blocks in MCP's shapes, all scrubbed."""

    blocks: tuple[Mapping[str, Any], ...]
    structured: Mapping[str, Any] | None
    is_error: bool
    dropped: int  # blocks replaced by a notice


def _base64(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return True


def _mime(value: object, family: str) -> bool:
    return isinstance(value, str) and len(value) <= 256 and _MIME[family].search(value)


def _annotations(raw: object, s: Scrubbed) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    audience = raw.get("audience")
    if isinstance(audience, list):
        out["audience"] = [a for a in audience[:4] if a in _AUDIENCE]
    priority = raw.get("priority")
    if isinstance(priority, int | float) and not isinstance(priority, bool) and 0 <= priority <= 1:
        out["priority"] = priority
    if isinstance(raw.get("lastModified"), str):
        out["lastModified"] = s.text(raw["lastModified"], keep=False, limit=64)
    return out


def _common(raw: Mapping[str, Any], block: dict[str, Any], s: Scrubbed) -> dict[str, Any]:
    annotations = _annotations(raw.get("annotations"), s)
    if annotations:
        block["annotations"] = annotations
    if isinstance(raw.get("_meta"), dict):
        block["_meta"] = s.json(raw["_meta"])
    return block


def _resource(raw: object, s: Scrubbed) -> dict[str, Any] | str:
    if not isinstance(raw, dict) or not isinstance(raw.get("uri"), str):
        return "an embedded resource without a URI"
    out: dict[str, Any] = {"uri": s.text(raw["uri"], keep=False, limit=SHORT_MAX_CHARS)}
    if "mimeType" in raw:
        if not _mime(raw["mimeType"], "any"):
            return "an embedded resource with an invalid media type"
        out["mimeType"] = raw["mimeType"]
    if isinstance(raw.get("text"), str):
        out["text"] = s.text(raw["text"])
    elif _base64(raw.get("blob")):
        out["blob"] = raw["blob"]
    else:
        return "an embedded resource with neither text nor valid base64 blob"
    if isinstance(raw.get("_meta"), dict):
        out["_meta"] = s.json(raw["_meta"])
    return out


def _block(raw: object, s: Scrubbed) -> dict[str, Any] | str:
    """One content block, or why it was dropped."""
    if not isinstance(raw, dict):
        return "a content block that is not an object"
    kind = raw.get("type")
    if kind == "text":
        if not isinstance(raw.get("text"), str):
            return "a text block without text"
        return _common(raw, {"type": "text", "text": s.text(raw["text"])}, s)
    if kind in ("image", "audio"):
        if not _base64(raw.get("data")):
            return f"an {kind} block whose data is not valid base64"
        if not _mime(raw.get("mimeType"), str(kind)):
            return f"an {kind} block with an invalid media type"
        return _common(raw, {"type": kind, "data": raw["data"], "mimeType": raw["mimeType"]}, s)
    if kind == "resource":
        resource = _resource(raw.get("resource"), s)
        if isinstance(resource, str):
            return resource
        return _common(raw, {"type": "resource", "resource": resource}, s)
    if kind == "resource_link":
        if not isinstance(raw.get("uri"), str) or not isinstance(raw.get("name"), str):
            return "a resource link without a URI or a name"
        link: dict[str, Any] = {"type": "resource_link", "uri": s.text(raw["uri"], keep=False, limit=SHORT_MAX_CHARS),
                                "name": s.text(raw["name"], keep=False, limit=SHORT_MAX_CHARS)}
        for key in ("title", "description"):
            if isinstance(raw.get(key), str):
                link[key] = s.text(raw[key])
        if "mimeType" in raw and _mime(raw["mimeType"], "any"):
            link["mimeType"] = raw["mimeType"]
        if isinstance(raw.get("size"), int) and not isinstance(raw.get("size"), bool) and raw["size"] >= 0:
            link["size"] = raw["size"]
        return _common(raw, link, s)
    return "a content block of an unknown type"


def call_content(result: Mapping[str, Any], s: Scrubbed) -> CallContent:
    """The CallToolResult's blocks, structured content and isError, scrubbed through ``s``."""
    raw_blocks = result.get("content", [])
    blocks: list[Mapping[str, Any]] = []
    dropped = 0
    if not isinstance(raw_blocks, list):
        raw_blocks, dropped = [], 1
    for raw in raw_blocks[:MAX_BLOCKS]:
        block = _block(raw, s)
        if isinstance(block, str):
            dropped += 1
            block = {"type": "text", "text": f"[toolcell: {block} was dropped]"}
        blocks.append(block)
    if len(raw_blocks) > MAX_BLOCKS:
        dropped += len(raw_blocks) - MAX_BLOCKS
        blocks.append({"type": "text", "text": f"[toolcell: {len(raw_blocks) - MAX_BLOCKS} more blocks were dropped]"})
    raw_structured = result.get("structuredContent")
    structured = s.json(raw_structured) if isinstance(raw_structured, dict) else None
    return CallContent(blocks=tuple(blocks), structured=structured, is_error=result.get("isError") is True,
                       dropped=dropped)


def error_message(error: object, s: Scrubbed, limit: int = 500) -> str:
    """A JSON-RPC error object (the server's or the driver's) as one short scrubbed line."""
    if not isinstance(error, dict):
        return "the MCP driver reported an error"
    message = s.text(error.get("message"), keep=False, limit=limit) or "no message"
    code = error.get("code")
    code_text = f" ({code})" if isinstance(code, int) and not isinstance(code, bool) else ""
    return " ".join(message.split())[:limit] + code_text
