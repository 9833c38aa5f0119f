"""The security sections of the config: transport (TLS/mTLS/insecure), ``auth``, ``rate_limits``,
``admission`` and ``audit``. Called by ``settings.parse_config``; frozen values out.

With no ``auth`` section the default is safe and keeps the sidecar working: on the Unix socket,
the supervisor's own uid (read with SO_PEERCRED) may list and call every tool, nobody else anything.
Over TCP with no ``auth`` section nobody is allowed anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolcell.errors import ConfigError
from toolcell.policy.access import AccessPolicy, parse_rules
from toolcell.policy.limits import AdmissionSpec, BucketSpec, ConcurrencySpec
from toolcell.units import parse_duration, parse_size


@dataclass(frozen=True)
class JwtSettings:
    jwks: str  # a file path or an http(s) URL
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 30.0
    refresh_s: float = 300.0
    min_refetch_s: float = 30.0


@dataclass(frozen=True)
class TlsSettings:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    client_ca_pem: bytes | None = None  # set: mTLS, a client certificate signed by this CA is required


@dataclass(frozen=True)
class AuditSettings:
    file: str
    max_bytes: int = 64 * 2**20
    keep: int = 10
    # Rotation never deletes a file holding invocation records younger than this (it keeps more than
    # ``keep`` files instead, with a warning): a flood of refusals cannot flush recent real records.
    protect_s: float = 24 * 3600.0


@dataclass(frozen=True)
class SecuritySettings:
    policy: AccessPolicy = field(default_factory=lambda: AccessPolicy.owner_only(os.geteuid()))
    jwt: JwtSettings | None = None
    tls: TlsSettings | None = None
    insecure: bool = False
    max_concurrent_streams: int = 64
    max_connection_idle_s: float = 300.0
    max_connections: int = 256
    per_principal: BucketSpec | None = None
    per_tool: BucketSpec | None = None
    tool_buckets: Mapping[str, BucketSpec] = field(default_factory=dict)
    # Refused requests per peer (uid, address or certificate): over budget, the peer is refused at once,
    # before authentication or validation. None (``refusals_per_peer: off``) is unsafe: refusals cost
    # the supervisor work and audit records without limit.
    refusals_per_peer: BucketSpec | None = field(default_factory=lambda: BucketSpec(rate=5.0, burst=20))
    concurrency: ConcurrencySpec = field(default_factory=lambda: ConcurrencySpec(global_max=32))
    admission: AdmissionSpec = field(default_factory=lambda: AdmissionSpec(min_available_memory_bytes=64 * 2**20))
    audit: AuditSettings | None = None


def _read(path: str, base_dir: Path, key: str) -> bytes:
    p = Path(path) if Path(path).is_absolute() else base_dir / path
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {str(p)!r}: {exc.strerror}", key=key) from exc


def _bucket(raw: Mapping[str, Any] | None) -> BucketSpec | None:
    return None if raw is None else BucketSpec(rate=float(raw["rate"]), burst=int(raw.get("burst", 1)))


def _refusal_bucket(rl: Mapping[str, Any]) -> BucketSpec | None:
    raw = rl.get("refusals_per_peer", {})
    if raw is False or raw == "off":
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("expected {rate, burst} or off", key="rate_limits.refusals_per_peer")
    try:
        return BucketSpec(rate=float(raw.get("rate", 5.0)), burst=int(raw.get("burst", 20)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid bucket: {exc}", key="rate_limits.refusals_per_peer") from exc


def parse_security(doc: Mapping[str, Any], *, listen: str, base_dir: Path, runtime_dir: str) -> SecuritySettings:
    server = doc.get("server", {})
    unix = listen.startswith("unix:")
    tls = None
    if "tls" in server:
        t = server["tls"]
        if unix:
            raise ConfigError("TLS is for TCP listeners; a Unix socket is protected by its file mode", key="server.tls")
        tls = TlsSettings(cert_pem=_read(t["cert"], base_dir, "server.tls.cert"),
                          key_pem=_read(t["key"], base_dir, "server.tls.key"),
                          client_ca_pem=_read(t["client_ca"], base_dir, "server.tls.client_ca")
                          if "client_ca" in t else None)
    insecure = bool(server.get("insecure", False))
    if not unix and tls is None and not insecure:
        raise ConfigError(f"{listen} is plain TCP: configure server.tls (TLS/mTLS), or set server.insecure: true "
                          "to accept unencrypted, unauthenticated connections", key="server.listen")
    if unix and insecure:
        raise ConfigError("insecure applies to TCP listeners only", key="server.insecure")

    auth = doc.get("auth")
    jwt_settings = None
    if auth is None:
        policy = AccessPolicy.owner_only(os.geteuid()) if unix else AccessPolicy()
    else:
        require = frozenset(auth.get("require", []))
        if "peer" in require and not unix:
            raise ConfigError("peer credentials exist only on a Unix socket listener", key="auth.require")
        if "cert" in require and (tls is None or tls.client_ca_pem is None):
            raise ConfigError("a client certificate can only be required with server.tls.client_ca (mTLS)",
                              key="auth.require")
        policy = AccessPolicy(rules=parse_rules(auth.get("rules", [])), require=require)
        if "jwt" in auth:
            j = auth["jwt"]
            source = j["jwks"]
            if not source.startswith(("http://", "https://")) and not Path(source).is_absolute():
                source = str(base_dir / source)
            jwt_settings = JwtSettings(
                jwks=source, issuer=j["issuer"], audience=j["audience"],
                algorithms=tuple(j.get("algorithms", ["RS256", "ES256"])),
                leeway_s=parse_duration(j.get("leeway", "30s"), "auth.jwt.leeway"),
                refresh_s=parse_duration(j.get("refresh", "5m"), "auth.jwt.refresh"),
                min_refetch_s=parse_duration(j.get("min_refetch", "30s"), "auth.jwt.min_refetch"))
        elif "token" in require:
            raise ConfigError("a bearer token can only be required with auth.jwt", key="auth.require")

    rl = doc.get("rate_limits", {})
    conc = rl.get("concurrency", {})
    adm = doc.get("admission", {})
    aud = doc.get("audit")
    return SecuritySettings(
        policy=policy,
        jwt=jwt_settings,
        tls=tls,
        insecure=insecure,
        max_concurrent_streams=int(server.get("max_concurrent_streams", 64)),
        max_connection_idle_s=parse_duration(server.get("max_connection_idle", "5m"), "server.max_connection_idle"),
        max_connections=int(server.get("max_connections", 256)),
        per_principal=_bucket(rl.get("per_principal")),
        per_tool=_bucket(rl.get("per_tool")),
        tool_buckets={name: b for name, raw in rl.get("tools", {}).items() if (b := _bucket(raw)) is not None},
        refusals_per_peer=_refusal_bucket(rl),
        concurrency=ConcurrencySpec(global_max=conc.get("global", 32), per_principal=conc.get("per_principal"),
                                    per_tool=conc.get("per_tool")),
        admission=AdmissionSpec(
            min_available_memory_bytes=parse_size(adm.get("min_available_memory", "64Mi"),
                                                  "admission.min_available_memory"),
            max_cpu_percent=adm.get("max_cpu_percent"),
            queue=int(adm.get("queue", 0)),
            max_wait_s=parse_duration(adm.get("max_wait", "2s"), "admission.max_wait")),
        audit=None if aud is None else AuditSettings(
            file=str(base_dir / aud["file"].replace("{runtime_dir}", runtime_dir)),
            max_bytes=parse_size(aud.get("max_bytes", "64Mi"), "audit.max_bytes"),
            keep=int(aud.get("keep", 10)),
            protect_s=parse_duration(aud["protect"], "audit.protect") if "protect" in aud
            else AuditSettings.protect_s),
    )
