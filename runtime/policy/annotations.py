"""MCP tool annotations derived from what the isolation profile actually enforces.

Pure. An annotation is only derived when the profile makes it true; everything else is left unset,
so an MCP client falls back to the spec's conservative defaults (not read-only, destructive, not
idempotent, open world). The admin's ``annotations`` on the tool override the derived values key by key.

What the profile guarantees when it grants no network: the root filesystem is read-only, host mounts
are read-only, the only writable path is a tmpfs that disappears with the container, and nothing
can be reached outside it. Such a tool cannot change anything that outlives its sandbox, so:

    openWorldHint   false   no network: it cannot interact with external entities
    readOnlyHint    true    it cannot modify its environment
    destructiveHint false   ... so it cannot destroy anything either
    idempotentHint  true    repeating a call has no additional effect on the environment
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toolcell.policy.profile import IsolationProfile

HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


def derived_annotations(profile: IsolationProfile) -> dict[str, bool]:
    """The hints ``profile`` makes true; empty when the profile grants network access."""
    if profile.network:
        return {}
    return {"openWorldHint": False, "readOnlyHint": True, "destructiveHint": False, "idempotentHint": True}


def tool_annotations(admin: Mapping[str, Any], profile: IsolationProfile) -> dict[str, Any]:
    """Derived hints with the admin's ``annotations`` applied on top (the admin wins per key)."""
    return {**derived_annotations(profile), **dict(admin)}


def safe_to_retry(annotations: Mapping[str, Any]) -> bool:
    """A tool may be re-run after a transport failure only when it says re-running changes nothing."""
    if annotations.get("idempotentHint") is False:
        return False
    return annotations.get("idempotentHint") is True or annotations.get("readOnlyHint") is True
