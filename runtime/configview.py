"""``toolcell config show``: the effective configuration (defaults filled in, inheritance resolved).

Secrets are masked: environment values whose name looks like a credential, credentials inside URLs,
and anything the output redactor recognises as a token or key are shown as ``***``. Secret values
themselves are never loaded here: the store is not opened, only its paths are shown.
"""

from __future__ import annotations

import re
from typing import Any

from toolcell.policy.scrub import Redactor
from toolcell.settings import Config

MASK = "***"
_SECRET_NAME = re.compile(r"(?i)(pass(word|wd)?|secret|token|api[_-]?key|private|credential|auth|cookie|session)")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def _mask_text(value: str, redactor: Redactor) -> str:
    value = _URL_CREDENTIALS.sub(rf"\1{MASK}@", value)
    clean, counts = redactor.redact(value)
    return MASK if counts else clean


def _mask_env(env: dict[str, str], redactor: Redactor) -> dict[str, str]:
    return {k: MASK if _SECRET_NAME.search(k) else _mask_text(v, redactor) for k, v in sorted(env.items())}


def effective(config: Config) -> dict[str, Any]:
    """A plain, JSON/YAML-ready view of ``config`` with secrets masked."""
    redactor = Redactor()
    s, t = config.server, config.telemetry
    profiles: dict[str, Any] = {}
    for name, p in sorted(config.profiles.items()):
        profiles[name] = {
            "memory_bytes": p.memory_bytes, "cpus": p.cpus, "pids": p.pids_limit, "shm": p.shm_bytes,
            "nofile": p.nofile, "timeout_s": p.timeout_s, "kill_grace_s": p.kill_grace_s, "runtime": p.runtime,
            "seccomp": p.seccomp, "tmpfs_bytes": p.tmpfs_bytes, "user": p.user,
            "env": _mask_env(dict(p.env), redactor), "env_passthrough": list(p.env_passthrough),
            "mounts": [{"source": m.source, "target": m.target, "read_only": True} for m in p.mounts],
            "network": "none",
            "output": {
                "stdout_max_bytes": p.output.stdout_max_bytes, "stderr_max_bytes": p.output.stderr_max_bytes,
                "max_total_bytes": p.output.max_total_bytes, "injection": p.output.injection,
                "structured_max_bytes": p.output.structured_max_bytes,
                "structured_max_depth": p.output.structured_max_depth,
                "scrub_budget_s": p.output.scrub_budget_s,
            },
        }
    return {
        "source": config.source,
        "server": {"listen": s.listen, "socket_mode": f"{s.socket_mode:04o}", "instance": s.instance,
                   "shutdown_grace_s": s.shutdown_grace_s, "max_message_bytes": s.max_message_bytes,
                   "health_interval_s": s.health_interval_s, "state_file": s.state_file},
        "engine": _engine(config, redactor),
        "limits": {k: getattr(config.limits, k) for k in
                   ("max_argument_bytes", "max_depth", "max_string_length", "max_array_length")},
        "telemetry": {"service_name": t.service_name,
                      "otlp_endpoint": _mask_text(t.otlp_endpoint, redactor) if t.otlp_endpoint else None,
                      "span_file": t.span_file, "console": t.console, "log_format": t.log_format,
                      "metrics_interval_s": t.metrics_interval_s, "prometheus_listen": t.prometheus_listen},
        "secrets": None if config.secrets is None else {
            "store": config.secrets.store.store, "key_file": config.secrets.store.key_file,
            "key_env": config.secrets.store.key_env},
        "profiles": profiles,
        "tools": [{"name": tool.name, "title": tool.title, "description": tool.description, "image": tool.image,
                   "command": list(tool.command), "profile": tool.profile,
                   "secrets": [{"name": g.name, **({"env": g.env} if g.env else {"file": g.file})}
                               for g in tool.secrets]}
                  for tool in sorted(config.tools.values(), key=lambda x: x.name)],
        # Tool sources: their tools are found at start-up (``toolcell tools`` lists them).
        "servers": [{"name": src.name, "image": src.image, "command": list(src.command), "profile": src.profile,
                     "env": _mask_env(dict(src.env), redactor),
                     "secrets": [{"name": g.name, **({"env": g.env} if g.env else {"file": g.file})}
                                 for g in src.secrets],
                     "pool": None if src.name not in config.source_pools else
                     {"size": config.source_pools[src.name].size, "ttl_s": config.source_pools[src.name].ttl_s},
                     "roots": None if src.roots is None else [dict(r) for r in src.roots],
                     "discovery_timeout_s": src.discovery_timeout_s,
                     "tools": {n: {k: v for k, v in {"profile": o.profile, "title": o.title,
                                                     "description": o.description,
                                                     "annotations": dict(o.annotations) or None,
                                                     "hidden": o.hidden or None}.items() if v is not None}
                               for n, o in sorted(src.overrides.items())}}
                    for src in sorted(config.sources.values(), key=lambda x: x.name)],
    }


def _engine(config: Config, redactor: Redactor) -> dict[str, Any]:
    engine = config.engine
    if engine.kind == "oci":
        return {"kind": "oci", "oci": {"runtime": engine.oci_runtime, "rootfs_dir": engine.oci_rootfs_dir,
                                       "state_dir": engine.oci_state_dir}}
    return {"kind": "docker", "docker_host": _mask_text(engine.docker_host or "unix:///var/run/docker.sock", redactor)}
