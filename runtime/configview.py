"""``toolcell config show``: the effective configuration (defaults filled in, inheritance resolved).

The view is itself a config: the file's own keys and units (``shutdown_grace: 20s``, ``memory: 256Mi``),
every profile written out whole (no ``extends``: inherited values are filled in), each tool's pool as
resolved, the default access rules written as the rules they are. ``parse_config`` accepts it and
builds the same configuration, masked values aside. Paths the config held only as contents (the TLS
files) come from the ``document`` the config was read from, when given.

Secrets are masked: environment values whose name looks like a credential, credentials inside URLs,
and anything the output redactor recognises as a token or key are shown as ``***``. Secret values
themselves are never loaded here: the store is not opened, only its paths are shown.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from toolcell.policy.scrub import Redactor
from toolcell.settings import Config
from toolcell.units import format_duration, format_size

MASK = "***"
_SECRET_NAME = re.compile(r"(?i)(pass(word|wd)?|secret|token|api[_-]?key|private|credential|auth|cookie|session)")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def _mask_text(value: str, redactor: Redactor) -> str:
    value = _URL_CREDENTIALS.sub(rf"\1{MASK}@", value)
    clean, counts = redactor.redact(value)
    return MASK if counts else clean


def _mask_env(env: dict[str, str], redactor: Redactor) -> dict[str, str]:
    return {k: MASK if _SECRET_NAME.search(k) else _mask_text(v, redactor) for k, v in sorted(env.items())}


def _present(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without its None values (the config's way of saying: not set)."""
    return {k: v for k, v in d.items() if v is not None}


def _grants(grants: Any) -> list[dict[str, Any]]:
    return [{"name": g.name, **({"env": g.env} if g.env else {"file": g.file})} for g in grants]


def _pool(spec: Any) -> dict[str, Any] | None:
    return None if spec is None else {"size": spec.size, "ttl": format_duration(spec.ttl_s)}


def _session(policy: Any) -> dict[str, Any] | None:
    if policy is None:
        return None
    return _present({"command": list(policy.command) or None, "idle_ttl": format_duration(policy.idle_ttl_s),
                     "max_lifetime": format_duration(policy.max_lifetime_s), "max_calls": policy.max_calls,
                     "per_principal": policy.per_principal})


def _workspace(w: Any) -> dict[str, Any] | None:
    if w is None:
        return None
    return _present({"dir": w.dir, "outputs": w.outputs or None, "max_input_files": w.max_input_files,
                     "max_input_bytes": format_size(w.max_input_bytes), "max_output_files": w.max_output_files,
                     "max_output_bytes": format_size(w.max_output_bytes),
                     "max_file_bytes": format_size(w.max_file_bytes)})


def _profile(p: Any, redactor: Redactor) -> dict[str, Any]:
    o = p.output
    return {
        "memory": format_size(p.memory_bytes), "cpus": p.cpus, "pids": p.pids_limit, "shm": format_size(p.shm_bytes),
        "nofile": p.nofile, "timeout": format_duration(p.timeout_s), "kill_grace": format_duration(p.kill_grace_s),
        "runtime": p.runtime, "seccomp": p.seccomp, "tmpfs_size": format_size(p.tmpfs_bytes), "user": p.user,
        "env": _mask_env(dict(p.env), redactor), "env_passthrough": list(p.env_passthrough),
        "mounts": [{"source": m.source, "target": m.target, "read_only": True} for m in p.mounts],
        "network": [g.to_json() for g in p.network] or "none",
        "output": {
            "stdout_max_bytes": format_size(o.stdout_max_bytes), "stderr_max_bytes": format_size(o.stderr_max_bytes),
            "max_total_bytes": format_size(o.max_total_bytes), "injection": o.injection,
            "structured_max_bytes": format_size(o.structured_max_bytes),
            "structured_max_depth": o.structured_max_depth, "scrub_budget": format_duration(o.scrub_budget_s),
        },
    }


def _server(config: Config, document: Mapping[str, Any]) -> dict[str, Any]:
    s, sec = config.server, config.security
    raw_tls = document.get("server", {}).get("tls") if isinstance(document.get("server"), Mapping) else None
    return _present({
        "listen": s.listen, "socket_mode": f"{s.socket_mode:04o}", "instance": s.instance or None,
        "shutdown_grace": format_duration(s.shutdown_grace_s), "max_message_bytes": s.max_message_bytes,
        "health_interval": format_duration(s.health_interval_s), "state_file": s.state_file,
        "max_connections_per_uid": s.max_connections_per_uid,
        "handshake_timeout": format_duration(s.handshake_timeout_s),
        "sweep_interval": format_duration(s.sweep_interval_s),
        "max_concurrent_streams": sec.max_concurrent_streams,
        "max_connection_idle": format_duration(sec.max_connection_idle_s), "max_connections": sec.max_connections,
        "insecure": True if sec.insecure else None,
        # Held as PEM contents: the file names come from the document (paths, never the key itself).
        "tls": {k: str(v) for k, v in raw_tls.items()} if sec.tls is not None and isinstance(raw_tls, Mapping)
        else None,
    })


def _bucket(b: Any) -> dict[str, Any] | None:
    return None if b is None else {"rate": b.rate, "burst": b.burst}


def _security(config: Config, redactor: Redactor) -> dict[str, Any]:
    sec = config.security
    rules = [{"match": [_present(dataclasses.asdict(m)) for m in r.match], "tools": list(r.tools),
              "actions": sorted(r.actions)} for r in sec.policy.rules]
    auth: dict[str, Any] = {"require": sorted(sec.policy.require), "rules": rules}
    if sec.jwt is not None:
        j = sec.jwt
        auth["jwt"] = {"jwks": _mask_text(j.jwks, redactor), "issuer": j.issuer, "audience": j.audience,
                       "algorithms": list(j.algorithms), "leeway": format_duration(j.leeway_s),
                       "refresh": format_duration(j.refresh_s), "min_refetch": format_duration(j.min_refetch_s)}
    c, a = sec.concurrency, sec.admission
    view: dict[str, Any] = {
        "auth": auth,
        "rate_limits": _present({
            "per_principal": _bucket(sec.per_principal), "per_tool": _bucket(sec.per_tool),
            "tools": {name: _bucket(b) for name, b in sorted(sec.tool_buckets.items())} or None,
            "concurrency": _present({"global": c.global_max, "per_principal": c.per_principal,
                                     "per_tool": c.per_tool}),
            "refusals_per_peer": _bucket(sec.refusals_per_peer) or "off"}),
        "admission": _present({"min_available_memory": format_size(a.min_available_memory_bytes),
                               "max_cpu_percent": a.max_cpu_percent, "queue": a.queue,
                               "max_wait": format_duration(a.max_wait_s)}),
    }
    if sec.audit is not None:
        view["audit"] = {"file": sec.audit.file, "max_bytes": format_size(sec.audit.max_bytes),
                         "keep": sec.audit.keep, "protect": format_duration(sec.audit.protect_s)}
    return view


def effective(config: Config, document: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A plain, JSON/YAML-ready view of ``config`` with secrets masked: itself a valid config.

    ``document``: the parsed file ``config`` was built from, for what the config keeps only as contents.
    """
    redactor = Redactor()
    t, e = config.telemetry, config.egress
    tool_names = sorted(config.tools)
    return {
        "version": 1,
        "server": _server(config, document or {}),
        "engine": _engine(config, redactor),
        "limits": {k: getattr(config.limits, k) for k in
                   ("max_argument_bytes", "max_depth", "max_string_length", "max_array_length")},
        "telemetry": {"service_name": t.service_name,
                      "otlp_endpoint": _mask_text(t.otlp_endpoint, redactor) if t.otlp_endpoint else None,
                      "span_file": t.span_file, "span_file_max_bytes": format_size(t.span_file_max_bytes),
                      "span_file_keep": t.span_file_keep, "console": t.console, "log_format": t.log_format,
                      "metrics_interval": format_duration(t.metrics_interval_s),
                      "prometheus_listen": t.prometheus_listen},
        **_security(config, redactor),
        "egress": _present({"network": e.network or None, "image": e.image, "subnet_pool": e.subnet_pool,
                            "proxy_memory": format_size(e.proxy_memory_bytes),
                            "ready_timeout": format_duration(e.ready_timeout_s)}),
        **({} if config.secrets is None else {"secrets": _present({
            "store": config.secrets.store.store, "key_file": config.secrets.store.key_file,
            "key_env": config.secrets.store.key_env})}),
        "profiles": {name: _profile(p, redactor) for name, p in sorted(config.profiles.items())},
        "tools": [_present({
            "name": tool.name, "title": tool.title or None, "description": tool.description, "image": tool.image,
            "command": list(tool.command), "profile": tool.profile, "input_schema": dict(tool.input_schema),
            "output_schema": None if tool.output_schema is None else dict(tool.output_schema),
            "annotations": dict(tool.annotations) or None, "secrets": _grants(tool.secrets) or None,
            "pool": _pool(config.pools.get(tool.name)), "session": _session(tool.session),
            "workspace": _workspace(tool.workspace)})
            for tool in (config.tools[n] for n in tool_names)],
        # Tool sources: their tools are found at start-up (``toolcell tools`` lists them).
        "servers": [_present({
            "name": src.name, "image": src.image, "command": list(src.command), "profile": src.profile,
            "env": _mask_env(dict(src.env), redactor), "secrets": _grants(src.secrets) or None,
            "pool": _pool(config.source_pools.get(src.name)),
            "roots": None if src.roots is None else [dict(r) for r in src.roots],
            "discovery_timeout": format_duration(src.discovery_timeout_s),
            "session": _session(src.session),
            "tools": {n: _present({"profile": o.profile, "title": o.title, "description": o.description,
                                   "annotations": dict(o.annotations) or None, "hidden": o.hidden or None})
                      for n, o in sorted(src.overrides.items())}})
            for src in sorted(config.sources.values(), key=lambda x: x.name)],
    }


def _engine(config: Config, redactor: Redactor) -> dict[str, Any]:
    engine = config.engine
    view: dict[str, Any] = {"kind": engine.kind, "pool_channel": engine.pool_channel_dir,
                            "wait_at_start": engine.wait_at_start}
    if engine.kind == "oci":
        view["oci"] = {"runtime": engine.oci_runtime, "rootfs_dir": engine.oci_rootfs_dir,
                       "state_dir": engine.oci_state_dir}
    else:
        view["docker_host"] = _mask_text(engine.docker_host or "unix:///var/run/docker.sock", redactor)
    return view
