"""Who may do what: principals, authorisation rules, deny by default. Pure: no I/O, no grpc.

A ``Principal`` carries every identity the transport and the caller proved: the Unix peer
(SO_PEERCRED), the client certificate's names (mTLS), the subject/scopes/groups of a verified JWT.
An ``AccessPolicy`` is a list of rules; a rule grants actions (``list``, ``call``) on tools (glob
patterns) to principals that match any of its ``Match`` entries. Nothing matches -> denied.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["list", "call"]
IDENTITY_KINDS = ("peer", "cert", "token")


@dataclass(frozen=True)
class PeerCred:
    """What the kernel says about the process at the other end of a Unix socket."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class Principal:
    """A caller as proved by the transport and its credentials. Nothing here is self-declared."""

    peer: PeerCred | None = None
    cert_names: tuple[str, ...] = ()  # subject CN first, then SANs
    subject: str | None = None  # JWT "sub"
    issuer: str | None = None
    scopes: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def anonymous(self) -> bool:
        return self.peer is None and not self.cert_names and self.subject is None

    @property
    def id(self) -> str:
        """Stable key for ownership, rate limits and the audit trail (the pid is not part of it)."""
        parts = []
        if self.subject is not None:
            parts.append(f"sub:{self.issuer or ''}#{self.subject}" if self.issuer else f"sub:{self.subject}")
        if self.cert_names:
            parts.append(f"cert:{self.cert_names[0]}")
        if self.peer is not None:
            parts.append(f"uid:{self.peer.uid}")
        return ",".join(parts) or "anonymous"

    def kinds(self) -> frozenset[str]:
        present = set()
        if self.peer is not None:
            present.add("peer")
        if self.cert_names:
            present.add("cert")
        if self.subject is not None:
            present.add("token")
        return frozenset(present)

    def describe(self) -> dict[str, Any]:
        """For the audit trail: identities, never credentials."""
        d: dict[str, Any] = {"id": self.id}
        if self.peer is not None:
            d["uid"], d["gid"], d["pid"] = self.peer.uid, self.peer.gid, self.peer.pid
        if self.cert_names:
            d["cert"] = list(self.cert_names)
        if self.subject is not None:
            d["sub"] = self.subject
            d["iss"] = self.issuer
        return d


@dataclass(frozen=True)
class Match:
    """All given conditions must hold; an empty Match is any authenticated (non-anonymous) caller."""

    uid: int | None = None
    gid: int | None = None
    cert: str | None = None
    subject: str | None = None
    issuer: str | None = None
    scope: str | None = None
    group: str | None = None

    def matches(self, p: Principal) -> bool:
        if p.anonymous:
            return False
        checks = (
            self.uid is None or (p.peer is not None and p.peer.uid == self.uid),
            self.gid is None or (p.peer is not None and p.peer.gid == self.gid),
            self.cert is None or self.cert in p.cert_names,
            self.subject is None or p.subject == self.subject,
            self.issuer is None or p.issuer == self.issuer,
            self.scope is None or self.scope in p.scopes,
            self.group is None or self.group in p.groups,
        )
        return all(checks)


@dataclass(frozen=True)
class Rule:
    match: tuple[Match, ...]
    tools: tuple[str, ...] = ("*",)
    actions: frozenset[str] = frozenset({"list", "call"})

    def grants(self, p: Principal, action: Action, tool: str) -> bool:
        return (action in self.actions and any(fnmatch.fnmatchcase(tool, pat) for pat in self.tools)
                and any(m.matches(p) for m in self.match))


@dataclass(frozen=True)
class AccessPolicy:
    """Deny by default: an action on a tool is allowed only when some rule grants it."""

    rules: tuple[Rule, ...] = ()
    require: frozenset[str] = field(default_factory=frozenset)  # identities every caller must present

    def allows(self, p: Principal, action: Action, tool: str) -> bool:
        return any(rule.grants(p, action, tool) for rule in self.rules)

    def visible(self, p: Principal, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.allows(p, "list", n)]

    def missing(self, p: Principal) -> list[str]:
        """Required identity kinds the caller did not present, in a fixed order."""
        have = p.kinds()
        return [k for k in IDENTITY_KINDS if k in self.require and k not in have]

    @staticmethod
    def owner_only(uid: int) -> AccessPolicy:
        """The default with no ``auth`` section: the supervisor's own uid, over the Unix socket, may do all."""
        return AccessPolicy(rules=(Rule(match=(Match(uid=uid),)),), require=frozenset({"peer"}))


def parse_match(raw: Mapping[str, Any]) -> Match:
    return Match(uid=raw.get("uid"), gid=raw.get("gid"), cert=raw.get("cert"), subject=raw.get("subject"),
                 issuer=raw.get("issuer"), scope=raw.get("scope"), group=raw.get("group"))


def parse_rules(raw: Iterable[Mapping[str, Any]]) -> tuple[Rule, ...]:
    rules = []
    for r in raw:
        m = r["match"]
        matches = tuple(parse_match(x) for x in (m if isinstance(m, list) else [m]))
        rules.append(Rule(match=matches, tools=tuple(r.get("tools", ["*"])),
                          actions=frozenset(r.get("actions", ["list", "call"]))))
    return tuple(rules)
