"""The one place configuration files and the environment are read. Frozen values out.

``load_config(path)`` validates the YAML against ``data/config.schema.json`` (errors name the key),
resolves profile inheritance, compiles every tool's input schema and every profile's seccomp
profile, so an invalid config is refused at start-up (or on reload), never half-applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from toolcell.access_settings import SecuritySettings, parse_security
from toolcell.errors import ConfigError
from toolcell.model import SecretGrant, Tool, ToolOverride, ToolSource
from toolcell.policy.arguments import ArgumentLimits, compile_schema
from toolcell.policy.network import EgressSettings, GrantError, candidate_subnets, parse_grant
from toolcell.policy.profile import IsolationProfile, Mount, OutputPolicy
from toolcell.policy.resolve import ResolvedTool, resolve_tool
from toolcell.policy.seccomp import SeccompProfile, load_seccomp
from toolcell.policy.spec import SandboxSpec, compile_spec, min_pids, system_secret_dir
from toolcell.safepath import UnsafePath, trusted_socket
from toolcell.secretstore import SecretStoreSettings
from toolcell.sessions.config import build_session, build_workspace, check_message_room
from toolcell.units import parse_duration, parse_size

ENV_CONFIG = "TOOLCELL_CONFIG"
ENV_LISTEN = "TOOLCELL_LISTEN"
ENV_TOKEN = "TOOLCELL_TOKEN"  # noqa: S105 # nosec B105 - the variable name, not a token
ENV_ENGINE = "TOOLCELL_ENGINE"  # overrides engine.kind (docker | oci)


@dataclass(frozen=True)
class ServerSettings:
    listen: str
    socket_mode: int = 0o600
    # Owner recorded on every sandbox; "" until ``toolcell.instance.resolved`` decides it at start-up.
    instance: str = ""
    shutdown_grace_s: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    # How often the engine and the tools' images are checked for the gRPC health status (0: never).
    health_interval_s: float = 10.0
    # Where `toolcell reload` finds the pid and the outcome of the last reload.
    state_file: str = ""
    # The Unix-socket forwarder: open connections per caller uid, and how long a new connection may take to
    # send the HTTP/2 preface (server.max_connections_per_uid, server.handshake_timeout).
    max_connections_per_uid: int = 32
    handshake_timeout_s: float = 5.0
    # How often sandboxes of any owner whose lease ended are removed (a crashed peer's leftovers).
    sweep_interval_s: float = 60.0


@dataclass(frozen=True)
class TelemetrySettings:
    service_name: str = "toolcell"
    otlp_endpoint: str | None = None
    span_file: str | None = None
    # The span file rotates past this size, keeping this many older files (span_file.1 ...).
    span_file_max_bytes: int = 16 * 1024 * 1024
    span_file_keep: int = 3
    console: bool = False
    log_format: str = "json"
    metrics_interval_s: float = 10.0
    prometheus_listen: str | None = None


@dataclass(frozen=True)
class SecretsSettings:
    store: SecretStoreSettings


ENGINE_KINDS = ("docker", "oci")


@dataclass(frozen=True)
class EngineSettings:
    """Which backend runs the sandboxes (``engine.kind``) and where it finds what it needs.

    ``docker``: a Docker engine at ``docker_host`` (its socket is root-equivalent on its host).
    ``oci``: no daemon: an OCI runtime binary (``oci.runtime``, runc or crun) on per-call bundles over
    root filesystems unpacked once into ``oci.rootfs_dir`` (``toolcell images build`` writes them).
    """

    kind: str = "docker"
    docker_host: str | None = None
    # Pooled sandboxes' private channels live under this directory (None: the engine's attach relay).
    pool_channel_dir: str | None = None
    # Serve (NOT_SERVING, calls refused UNAVAILABLE) while the engine is unreachable at start-up, instead of exiting.
    wait_at_start: bool = False
    oci_runtime: str = "runc"
    oci_rootfs_dir: str = "/var/lib/toolcell/rootfs"
    # Bundles, the runtime's own state and per-sandbox records (a crash's leftovers are swept from here).
    oci_state_dir: str = ""
    # Where the host's cgroup files are (peak memory, CPU time, OOM kills of each sandbox). "": the first of
    # /host/sys/fs/cgroup (the host's, mounted read-only into a containerised supervisor) and /sys/fs/cgroup
    # that shows the engine's containers; when none does, usage comes from the engine's stats.
    cgroup_root: str = ""


@dataclass(frozen=True)
class PoolSpec:
    """Warm pool of one tool: ``size`` started sandboxes, each recycled after ``ttl_s`` unused."""

    size: int
    ttl_s: float = 300.0


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    telemetry: TelemetrySettings
    limits: ArgumentLimits
    profiles: Mapping[str, IsolationProfile]
    tools: Mapping[str, Tool]
    validators: Mapping[str, Draft202012Validator]
    seccomp: Mapping[str, SeccompProfile]
    engine: EngineSettings = field(default_factory=EngineSettings)
    secrets: SecretsSettings | None = None
    output_validators: Mapping[str, Draft202012Validator] = field(default_factory=dict)
    source: str = "<built-in>"
    environ: Mapping[str, str] = field(default_factory=dict)
    egress: EgressSettings = field(default_factory=EgressSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    # Tool name -> its warm pool (the tool's own ``pool``, else its profile's). A pooled container holds no
    # secret before it is claimed: the claim carries them.
    pools: Mapping[str, PoolSpec] = field(default_factory=dict)
    # Stock MCP servers whose tools are discovered at start-up and reload (``runtime/sources``), and the
    # pool each of their tools gets. Their tools join ``tools`` through ``with_tools``.
    sources: Mapping[str, ToolSource] = field(default_factory=dict)
    source_pools: Mapping[str, PoolSpec] = field(default_factory=dict)

    def with_tools(self, tools: Mapping[str, Tool], validators: Mapping[str, Draft202012Validator],
                   output_validators: Mapping[str, Draft202012Validator]) -> Config:
        """This config with discovered tools added (names are checked for clashes with the admin's own)."""
        clash = sorted(set(tools) & set(self.tools))
        if clash:
            raise ConfigError(f"discovered tool {clash[0]!r} has the name of a configured tool", key="servers")
        pools = dict(self.pools)
        for name, tool in tools.items():
            spec = self.source_pools.get(tool.source.server) if tool.source else None
            if spec is not None and spec.size > 0 and not self.profiles[tool.profile].network:
                pools[name] = spec
        cap = self.security.concurrency.global_max
        if cap is not None and sum(p.size for p in pools.values()) > cap:
            raise ConfigError(f"warm pools hold {sum(p.size for p in pools.values())} sandboxes but the global "
                              f"concurrency cap is {cap}: pooled sandboxes count against it", key="servers")
        return dataclasses.replace(self, tools={**self.tools, **tools},
                                   validators={**self.validators, **validators},
                                   output_validators={**self.output_validators, **output_validators},
                                   pools=pools)

    def resolve(self, name: str) -> ResolvedTool:
        """The tool called ``name`` and its profile; the caller can choose nothing else."""
        return resolve_tool(self.tools, self.profiles, name)

    def resolve_tool(self, tool: Tool) -> ResolvedTool:
        """``tool`` (not yet in this config) with its profile."""
        return ResolvedTool(tool=tool, profile=self.profiles[tool.profile])

    def compile(self, resolved: ResolvedTool, invocation_id: str, timeout_s: float | None = None) -> SandboxSpec:
        """The neutral sandbox spec of one run of ``resolved`` (policy's ``compile_spec`` with this config's
        owner, seccomp profile and environment)."""
        return compile_spec(resolved.tool, resolved.profile, invocation_id=invocation_id,
                            owner=self.server.instance, seccomp_json=self.seccomp[resolved.profile.name].json_text,
                            environ=self.environ, timeout_s=timeout_s)


def runtime_dir() -> Path:
    """Where the default socket lives: $XDG_RUNTIME_DIR/toolcell, /run/toolcell for root, else /tmp.

    Only a name: whoever uses it first checks it (``safepath.private_dir``), since another local user may
    have created ``/tmp/toolcell-<uid>`` before us.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "toolcell"
    if os.geteuid() == 0:
        return Path("/run/toolcell")
    return Path(f"/tmp/toolcell-{os.geteuid()}")  # noqa: S108 # nosec B108 - safepath checks it before use


def _pool_channel_dir(engine: Mapping[str, Any]) -> str | None:
    raw = engine.get("pool_channel", "{runtime_dir}/channels")
    return raw.replace("{runtime_dir}", str(runtime_dir())) if raw else None


def _build_engine(raw: Mapping[str, Any], env: Mapping[str, str]) -> EngineSettings:
    oci = raw.get("oci", {})
    kind = env.get(ENV_ENGINE) or raw.get("kind", "docker")
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"unknown engine kind {kind[:40]!r} (from ${ENV_ENGINE}); use one of "
                          f"{', '.join(ENGINE_KINDS)}", key="engine.kind")
    return EngineSettings(
        kind=kind,
        docker_host=raw.get("docker_host") or env.get("DOCKER_HOST"),
        pool_channel_dir=_pool_channel_dir(raw),
        wait_at_start=bool(raw.get("wait_at_start", False)),
        oci_runtime=oci.get("runtime", "runc"),
        oci_rootfs_dir=oci.get("rootfs_dir", "/var/lib/toolcell/rootfs"),
        oci_state_dir=oci.get("state_dir", "{runtime_dir}/oci").replace("{runtime_dir}", str(runtime_dir())),
        cgroup_root=raw.get("cgroup_root", ""),
    )


def default_socket() -> Path:
    """The default socket's path (unchecked): ``<runtime_dir>/toolcell.sock``."""
    return runtime_dir() / "toolcell.sock"


def default_target() -> str:
    """A caller's default address: $TOOLCELL_LISTEN as given, else the default socket, checked first.

    The check (``safepath.trusted_socket``) makes the runtime dir 0700 if it is absent, and refuses a
    runtime dir or a socket another local user owns (or could replace): such a socket may be an impostor
    that would receive the call's arguments and bearer token. Raises ``safepath.UnsafePath``.
    """
    listen = os.environ.get(ENV_LISTEN)
    if listen:
        return listen
    try:
        return f"unix://{trusted_socket(default_socket())}"
    except UnsafePath as exc:
        raise UnsafePath(exc.path, exc.problem, f"{exc.fix}; or name the supervisor's socket with --target or "
                         f"{ENV_LISTEN}", what=f"the default socket's {exc.what}") from exc


def client_token() -> str | None:
    """A caller's bearer JWT from the environment (the CLI's default)."""
    return os.environ.get(ENV_TOKEN) or None


def _schema() -> dict[str, Any]:
    text = resources.files("toolcell.data").joinpath("config.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _check_against_schema(doc: Any) -> None:
    validator = Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "<root>"
        raise ConfigError(err.message, key=key)


def _pool_spec(raw: Mapping[str, Any], base: PoolSpec | None, key: str) -> PoolSpec:
    ttl = parse_duration(raw["ttl"], f"{key}.ttl") if "ttl" in raw else (base.ttl_s if base else 300.0)
    return PoolSpec(size=int(raw.get("size", base.size if base else 0)), ttl_s=ttl)


def _build_pools(doc: Mapping[str, Any], tools: Mapping[str, Tool],
                 profiles: Mapping[str, IsolationProfile]) -> dict[str, PoolSpec]:
    """Resolve each tool's pool: its own, else its profile's (inherited through ``extends``).

    Never pooled (always the cold path): tools whose profile grants egress (their network is made per
    invocation), and tools granted a secret file in a system directory (a pooled sandbox covers each secret
    file's directory with its own empty tmpfs, which the claim fills). Secrets arrive with the claim.
    """
    raw_profiles = doc.get("profiles", {})

    def profile_pool(name: str, depth: int = 0) -> PoolSpec | None:
        spec = raw_profiles.get(name, {})
        parent = spec.get("extends")
        base = profile_pool(parent, depth + 1) if parent and depth < 32 else None
        return _pool_spec(spec["pool"], base, f"profiles.{name}.pool") if "pool" in spec else base

    pools: dict[str, PoolSpec] = {}
    for i, raw in enumerate(doc.get("tools", [])):
        tool = tools[raw["name"]]
        unpoolable = profiles[tool.profile].network
        if "pool" in raw:
            if unpoolable and raw["pool"].get("size", 0) > 0:
                raise ConfigError("this tool cannot be pooled: it is granted egress: its network is made for "
                                  "each invocation", key=f"tools[{i}].pool")
            spec: PoolSpec | None = _pool_spec(raw["pool"], profile_pool(tool.profile), f"tools[{i}].pool")
        else:
            spec = None if unpoolable else profile_pool(tool.profile)
        if spec is not None and spec.size > 0:
            pools[tool.name] = spec
    return pools


def _build_profile(name: str, raw: Mapping[str, Any], base: IsolationProfile, base_dir: Path) -> IsolationProfile:
    key = f"profiles.{name}"
    p = base.named(name)
    if "memory" in raw:
        p = p.with_memory(parse_size(raw["memory"], f"{key}.memory"))
    if "cpus" in raw:
        p = p.with_cpus(float(raw["cpus"]))
    if "pids" in raw:
        p = p.with_pids_limit(int(raw["pids"]))
    if "timeout" in raw or "kill_grace" in raw:
        timeout = parse_duration(raw.get("timeout", p.timeout_s), f"{key}.timeout")
        grace = parse_duration(raw.get("kill_grace", p.kill_grace_s), f"{key}.kill_grace")
        p = p.with_timeout(timeout, grace)
    if "runtime" in raw:
        p = p.with_runtime(raw["runtime"])
    if "seccomp" in raw:
        spec = raw["seccomp"]
        if spec != "default" and not Path(spec).is_absolute():
            spec = str(base_dir / spec)
        p = p.with_seccomp(spec)
    if "env" in raw:
        p = p.with_env(**raw["env"])
    if "mounts" in raw:
        mounts = []
        for i, m in enumerate(raw["mounts"]):
            if not Path(m["source"]).exists():
                raise ConfigError(f"mount source {m['source']!r} does not exist", key=f"{key}.mounts[{i}].source")
            mounts.append(Mount(source=m["source"], target=m["target"]))
        p = p.with_mounts(*mounts)
    changes: dict[str, Any] = {}
    if "nofile" in raw:
        changes["nofile"] = int(raw["nofile"])
    if "tmpfs_size" in raw:
        changes["tmpfs_bytes"] = parse_size(raw["tmpfs_size"], f"{key}.tmpfs_size")
    if "shm" in raw:
        changes["shm_bytes"] = parse_size(raw["shm"], f"{key}.shm")
    if "user" in raw:
        changes["user"] = raw["user"] if ":" in raw["user"] else f"{raw['user']}:{raw['user']}"
    if "env_passthrough" in raw:
        changes["env_passthrough"] = tuple(raw["env_passthrough"])
    if "network" in raw:
        p = p.with_network(*_build_grants(raw["network"], f"{key}.network"))
    if "output" in raw:
        changes["output"] = _build_output(raw["output"], p.output, f"{key}.output")
    if changes:
        p = dataclasses.replace(p, **changes)
    if p.memory_bytes < 6 * 1024 * 1024:
        raise ConfigError("must be at least 6Mi (the engine's minimum)", key=f"{key}.memory")
    if p.pids_limit < min_pids(p.runtime):
        raise ConfigError(f"must be at least {min_pids(p.runtime)} under {p.runtime} (the sandbox's init and the "
                          "launcher count too; with fewer the tool never starts)", key=f"{key}.pids")
    return p


def _build_grants(raw: str | list[Any], key: str) -> list[Any]:
    if raw == "none":
        return []
    grants = []
    for i, item in enumerate(raw):
        try:
            grants.append(parse_grant(item))
        except GrantError as exc:
            raise ConfigError(str(exc), key=f"{key}[{i}]") from exc
    return grants


def _build_egress(raw: Mapping[str, Any]) -> EgressSettings:
    settings = EgressSettings(
        network=raw.get("network", ""),
        image=raw.get("image", EgressSettings.image),
        subnet_pool=raw.get("subnet_pool", EgressSettings.subnet_pool),
        proxy_memory_bytes=parse_size(raw.get("proxy_memory", EgressSettings.proxy_memory_bytes),
                                      "egress.proxy_memory"),
        ready_timeout_s=parse_duration(raw.get("ready_timeout", EgressSettings.ready_timeout_s),
                                       "egress.ready_timeout"),
    )
    try:
        candidate_subnets(settings.subnet_pool, 1)
    except ValueError as exc:
        raise ConfigError(str(exc), key="egress.subnet_pool") from exc
    if settings.proxy_memory_bytes < 16 * 1024 * 1024:
        raise ConfigError("must be at least 16Mi", key="egress.proxy_memory")
    return settings


def _build_output(raw: Mapping[str, Any], base: OutputPolicy, key: str) -> OutputPolicy:
    sizes: dict[str, Any] = {name: parse_size(raw[name], f"{key}.{name}")
             for name in ("stdout_max_bytes", "stderr_max_bytes", "max_total_bytes", "structured_max_bytes")
             if name in raw}
    if "max_total_bytes" not in raw and ("stdout_max_bytes" in raw or "stderr_max_bytes" in raw):
        # An explicit per-stream cap sets the default total to their sum.
        sizes["max_total_bytes"] = (sizes.get("stdout_max_bytes", base.stdout_max_bytes)
                                    + sizes.get("stderr_max_bytes", base.stderr_max_bytes))
    other = {name: raw[name] for name in ("injection", "structured_max_depth") if name in raw}
    if "scrub_budget" in raw:
        other["scrub_budget_s"] = parse_duration(raw["scrub_budget"], f"{key}.scrub_budget")
    return dataclasses.replace(base, **sizes, **other)


def _build_profiles(raw: Mapping[str, Any], base_dir: Path) -> dict[str, IsolationProfile]:
    built: dict[str, IsolationProfile] = {}

    def build(name: str, chain: tuple[str, ...]) -> IsolationProfile:
        if name in built:
            return built[name]
        if name in chain:
            raise ConfigError(f"profile inheritance cycle: {' -> '.join((*chain, name))}", key=f"profiles.{name}")
        spec = raw.get(name, {})
        parent_name = spec.get("extends")
        if parent_name is not None and parent_name not in raw and parent_name != "default":
            raise ConfigError(f"extends unknown profile {parent_name!r}", key=f"profiles.{name}.extends")
        parent = build(parent_name, (*chain, name)) if parent_name else IsolationProfile()
        built[name] = _build_profile(name, spec, parent, base_dir)
        return built[name]

    build("default", ())
    for name in raw:
        build(name, ())
    return built


def _build_secrets(raw: Mapping[str, Any] | None, base_dir: Path) -> SecretsSettings | None:
    if raw is None:
        return None

    def resolve(path: str) -> str:
        path = path.replace("{runtime_dir}", str(runtime_dir()))
        return path if Path(path).is_absolute() else str(base_dir / path)

    return SecretsSettings(
        store=SecretStoreSettings(
            store=resolve(raw["store"]),
            key_file=resolve(raw["key_file"]) if raw.get("key_file") else None,
            key_env=raw.get("key_env", "TOOLCELL_SECRETS_KEY"),
        ),
    )


def _build_sources(raw: list[Any], profiles: Mapping[str, IsolationProfile], tools: Mapping[str, Tool],
                   secrets: SecretsSettings | None) -> tuple[dict[str, ToolSource], dict[str, PoolSpec]]:
    sources: dict[str, ToolSource] = {}
    pools: dict[str, PoolSpec] = {}
    prefixes = {name.split(".", 1)[0] for name in tools}
    for i, s in enumerate(raw):
        key = f"servers[{i}]"
        name = s["name"]
        if name in sources:
            raise ConfigError(f"duplicate server name {name!r}", key=f"{key}.name")
        if name in prefixes:  # "time.get_current_time" must name one thing
            raise ConfigError(f"server name {name!r} is the prefix of a configured tool's name", key=f"{key}.name")
        profile = s.get("profile", "default")
        if profile not in profiles:
            raise ConfigError(f"unknown profile {profile!r}", key=f"{key}.profile")
        overrides: dict[str, ToolOverride] = {}
        for tool_name, o in s.get("tools", {}).items():
            if "profile" in o and o["profile"] not in profiles:
                raise ConfigError(f"unknown profile {o['profile']!r}", key=f"{key}.tools.{tool_name}.profile")
            overrides[tool_name] = ToolOverride(profile=o.get("profile"), title=o.get("title"),
                                                description=o.get("description"),
                                                annotations=o.get("annotations", {}), hidden=o.get("hidden", False))
        grants = tuple(SecretGrant(name=g["name"], env=g.get("env"), file=g.get("file")) for g in s.get("secrets", []))
        if grants and secrets is None:
            raise ConfigError("the server is granted secrets but no secrets store is configured", key=f"{key}.secrets")
        for p in {profile, *(o.profile for o in overrides.values() if o.profile)}:
            _check_grants(grants, profiles[p], key=f"{key}.secrets")
        env = dict(s.get("env", {}))
        clash = next((g.env for g in grants if g.env in env), None)
        if clash:
            raise ConfigError(f"environment variable {clash!r} is set twice", key=f"{key}.env")
        roots = s.get("roots")
        sources[name] = ToolSource(
            name=name, image=s["image"], command=tuple(s["command"]), profile=profile, env=env, secrets=grants,
            roots=None if roots is None else tuple({"uri": r["uri"], **({"name": r["name"]} if "name" in r else {})}
                                                   for r in roots),
            discovery_timeout_s=parse_duration(s.get("discovery_timeout", 60), f"{key}.discovery_timeout"),
            overrides=overrides,
            session=build_session(s["session"], f"{key}.session") if "session" in s else None)
        if "pool" in s:
            if profiles[profile].network and s["pool"].get("size", 0) > 0:
                raise ConfigError("this server cannot be pooled: its profile grants egress: its network is made "
                                  "for each invocation", key=f"{key}.pool")
            pools[name] = _pool_spec(s["pool"], None, f"{key}.pool")
    return sources, pools


def _state_file(raw: str | None, listen: str) -> str:
    """Explicit path, else next to the Unix socket, else in the runtime dir."""
    if raw:
        return raw.replace("{runtime_dir}", str(runtime_dir()))
    if listen.startswith("unix:"):
        return listen.removeprefix("unix://").removeprefix("unix:") + ".state"
    return str(runtime_dir() / "toolcell.state")


def _check_grants(grants: tuple[SecretGrant, ...], profile: IsolationProfile, key: str) -> None:
    seen_env: set[str] = set()
    seen_files: set[str] = set()
    for i, g in enumerate(grants):
        if g.env is not None:
            if g.env in seen_env or g.env in profile.env or g.env in profile.env_passthrough:
                raise ConfigError(f"environment variable {g.env!r} is set twice", key=f"{key}[{i}].env")
            seen_env.add(g.env)
        if g.file is not None:
            if g.file in seen_files or g.file == "/" or g.file.startswith("/tmp/"):  # noqa: S108 # nosec B108
                raise ConfigError(f"file {g.file!r} is reused or inside the scratch tmpfs", key=f"{key}[{i}].file")
            seen_files.add(g.file)
    system_dir = system_secret_dir(grants)
    if system_dir is not None:
        # Secret files arrive with the sandbox's start, written into an empty tmpfs at their directory:
        # covering a system directory would hide the image's own files there.
        raise ConfigError(f"a secret file's directory must be its own (e.g. /run/secrets), not {system_dir}",
                          key=key)


def parse_config(doc: Any, *, source: str = "<built-in>", base_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML/JSON document and build the frozen Config."""
    if not isinstance(doc, dict):
        raise ConfigError("the configuration must be a mapping", key="<root>")
    _check_against_schema(doc)
    env = dict(os.environ if environ is None else environ)
    base_dir = base_dir or Path.cwd()
    server_raw = doc.get("server", {})
    listen = env.get(ENV_LISTEN) or server_raw.get("listen") or "unix://{runtime_dir}/toolcell.sock"
    listen = listen.replace("{runtime_dir}", str(runtime_dir()))
    server = ServerSettings(
        listen=listen,
        socket_mode=int(server_raw.get("socket_mode", "0600"), 8),
        # Empty: decided at start-up, unique (``toolcell.instance``); TOOLCELL_INSTANCE overrides.
        instance=server_raw.get("instance", ""),
        shutdown_grace_s=parse_duration(server_raw.get("shutdown_grace", 10), "server.shutdown_grace"),
        max_message_bytes=int(server_raw.get("max_message_bytes", 4 * 1024 * 1024)),
        health_interval_s=parse_duration(server_raw.get("health_interval", 10), "server.health_interval"),
        state_file=_state_file(server_raw.get("state_file"), listen),
        max_connections_per_uid=int(server_raw.get("max_connections_per_uid", 32)),
        handshake_timeout_s=parse_duration(server_raw.get("handshake_timeout", 5), "server.handshake_timeout"),
        sweep_interval_s=parse_duration(server_raw.get("sweep_interval", 60), "server.sweep_interval"),
    )
    if server.handshake_timeout_s <= 0:
        raise ConfigError("must be more than 0", key="server.handshake_timeout")
    tel = doc.get("telemetry", {})
    telemetry = TelemetrySettings(
        service_name=tel.get("service_name", "toolcell"),
        otlp_endpoint=tel.get("otlp_endpoint") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        span_file=(tel.get("span_file") or "").replace("{runtime_dir}", str(runtime_dir())) or None,
        span_file_max_bytes=parse_size(tel.get("span_file_max_bytes", "16Mi"), "telemetry.span_file_max_bytes"),
        span_file_keep=int(tel.get("span_file_keep", 3)),
        console=bool(tel.get("console", False)),
        log_format=tel.get("log_format", "json"),
        metrics_interval_s=parse_duration(tel.get("metrics_interval", 10), "telemetry.metrics_interval"),
        prometheus_listen=tel.get("prometheus_listen") or env.get("TOOLCELL_PROMETHEUS_LISTEN") or None,
    )
    if telemetry.span_file_max_bytes < 4096:
        raise ConfigError("must be at least 4Ki", key="telemetry.span_file_max_bytes")
    lim = doc.get("limits", {})
    limits = ArgumentLimits(**{k: int(v) for k, v in lim.items()})
    profiles = _build_profiles(doc.get("profiles", {}), base_dir)
    seccomp: dict[str, SeccompProfile] = {}
    for name, profile in profiles.items():
        try:
            seccomp[name] = load_seccomp(profile.seccomp, base_dir=base_dir)
        except ConfigError as exc:
            raise ConfigError(str(exc), key=f"profiles.{name}.seccomp") from exc
    tools: dict[str, Tool] = {}
    validators: dict[str, Draft202012Validator] = {}
    output_validators: dict[str, Draft202012Validator] = {}
    secrets = _build_secrets(doc.get("secrets"), base_dir)
    for i, t in enumerate(doc.get("tools", [])):
        key = f"tools[{i}]"
        if t["name"] in tools:
            raise ConfigError(f"duplicate tool name {t['name']!r}", key=f"{key}.name")
        profile_name = t.get("profile", "default")
        if profile_name not in profiles:
            raise ConfigError(f"unknown profile {profile_name!r}", key=f"{key}.profile")
        input_schema = t.get("input_schema", {"type": "object"})
        validators[t["name"]] = compile_schema(input_schema, key=f"{key}.input_schema")
        if "output_schema" in t:
            output_validators[t["name"]] = compile_schema(t["output_schema"], key=f"{key}.output_schema")
        grants = tuple(SecretGrant(name=g["name"], env=g.get("env"), file=g.get("file"))
                       for g in t.get("secrets", []))
        if grants and secrets is None:
            raise ConfigError("the tool is granted secrets but no secrets store is configured",
                              key=f"{key}.secrets")
        _check_grants(grants, profiles[profile_name], key=f"{key}.secrets")
        tools[t["name"]] = Tool(
            name=t["name"],
            title=t.get("title", ""),
            description=t["description"],
            image=t["image"],
            command=tuple(t["command"]),
            profile=profile_name,
            input_schema=input_schema,
            output_schema=t.get("output_schema"),
            annotations=t.get("annotations", {}),
            secrets=grants,
            session=build_session(t["session"], f"{key}.session") if "session" in t else None,
            workspace=build_workspace(t["workspace"], f"{key}.workspace") if "workspace" in t else None,
        )
    for i, t in enumerate(doc.get("tools", [])):
        output = profiles[tools[t["name"]].profile].output
        check_message_room(tools[t["name"]], result_bytes=output.max_total_bytes + output.structured_max_bytes,
                           argument_bytes=limits.max_argument_bytes, max_message_bytes=server.max_message_bytes,
                           key=f"tools[{i}].workspace")
    security = parse_security(doc, listen=listen, base_dir=base_dir, runtime_dir=str(runtime_dir()))
    pools = _build_pools(doc, tools, profiles)
    sources, source_pools = _build_sources(doc.get("servers", []), profiles, tools, secrets)
    cap = security.concurrency.global_max
    if cap is not None and sum(p.size for p in pools.values()) > cap:
        raise ConfigError(f"warm pools hold {sum(p.size for p in pools.values())} sandboxes but the global "
                          f"concurrency cap is {cap}: pooled sandboxes count against it", key="tools")
    return Config(
        server=server,
        telemetry=telemetry,
        limits=limits,
        profiles=profiles,
        tools=tools,
        validators=validators,
        output_validators=output_validators,
        secrets=secrets,
        seccomp=seccomp,
        engine=_build_engine(doc.get("engine", {}), env),
        source=source,
        environ=env,
        egress=_build_egress(doc.get("egress", {})),
        security=security,
        pools=pools,
        sources=sources,
        source_pools=source_pools,
    )


def load_config(path: str | os.PathLike[str] | None = None, *, listen: str | None = None) -> Config:
    """Load ``path`` (or $TOOLCELL_CONFIG, or the built-in default) and validate it completely."""
    path = path or os.environ.get(ENV_CONFIG)
    if path is None:
        text = resources.files("toolcell.data").joinpath("default-config.yaml").read_text()
        source, base_dir = "<built-in>", Path.cwd()
    else:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from exc
        source, base_dir = str(p), p.resolve().parent
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    environ = dict(os.environ)
    if listen:
        environ[ENV_LISTEN] = listen
    return parse_config(doc, source=source, base_dir=base_dir, environ=environ)
