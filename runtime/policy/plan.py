"""Compile a tool and its isolation profile into a container plan.

The plan is the complete, engine-neutral description of one sandbox. Backends translate it 1:1;
they add nothing that weakens it. Everything a caller sends is data on stdin, never part of the plan.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from runtime.errors import ConfigError
from runtime.model import SecretGrant, Tool
from runtime.policy.network import LABEL_ROLE, ROLE_PROXY, EgressLayout, EgressSettings
from runtime.policy.profile import IsolationProfile, Mount

LABEL_MANAGED = "io.toolcell.managed"
LABEL_OWNER = "io.toolcell.owner"
LABEL_INVOCATION = "io.toolcell.invocation"
LABEL_TOOL = "io.toolcell.tool"
LABEL_PROFILE = "io.toolcell.profile"


@dataclass(frozen=True)
class ContainerPlan:
    image: str
    command: tuple[str, ...]
    user: str
    env: Mapping[str, str]
    labels: Mapping[str, str]
    runtime: str
    seccomp_json: str
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    nofile: int
    tmpfs: Mapping[str, str]
    mounts: tuple[Mount, ...]
    timeout_s: float
    kill_grace_s: float
    stdout_max_bytes: int
    stderr_max_bytes: int
    # "none", or the name of the invocation's internal egress network (see ``policy/network.py``).
    network_mode: str = "none"
    # Fixed address on ``network_mode``'s network ("" = the engine picks); more networks joined before start.
    network_ip: str = ""
    extra_networks: tuple[str, ...] = ()
    read_only_rootfs: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    init: bool = True
    ipc_mode: str = "private"
    cgroupns_mode: str = "private"
    log_driver: str = "none"
    working_dir: str = "/tmp"  # nosec B108 - inside the sandbox: its private, capped tmpfs
    hostname: str = "sandbox"
    extra: Mapping[str, str] = field(default_factory=dict)


def compile_plan(
    tool: Tool,
    profile: IsolationProfile,
    *,
    invocation_id: str,
    owner: str,
    seccomp_json: str,
    environ: Mapping[str, str],
    timeout_s: float | None = None,
) -> ContainerPlan:
    """Build the plan for one invocation; ``timeout_s`` (from a caller deadline) can only shorten."""
    if not tool.command:
        raise ConfigError("command must not be empty", key=f"tools.{tool.name}.command")
    env = dict(profile.env)
    for name in profile.env_passthrough:
        if name in environ:
            env[name] = environ[name]
    effective_timeout = profile.timeout_s if timeout_s is None else min(profile.timeout_s, timeout_s)
    # /tmp is the only writable path. noexec: a dropped binary can't be run from it; nosuid/nodev:
    # no privilege via files; size: the tool can't fill host memory through tmpfs.
    tmpfs = {"/tmp": f"rw,noexec,nosuid,nodev,size={profile.tmpfs_bytes},mode=1777"}  # nosec B108
    return ContainerPlan(
        image=tool.image,
        command=tuple(tool.command),
        user=profile.user,
        env=env,
        labels={
            LABEL_MANAGED: "true",
            LABEL_OWNER: owner,
            LABEL_INVOCATION: invocation_id,
            LABEL_TOOL: tool.name,
            LABEL_PROFILE: profile.name,
        },
        runtime=profile.runtime,
        seccomp_json=seccomp_json,
        memory_bytes=profile.memory_bytes,
        nano_cpus=int(profile.cpus * 1e9),
        pids_limit=profile.pids_limit,
        nofile=profile.nofile,
        tmpfs=tmpfs,
        mounts=profile.mounts,
        timeout_s=max(0.0, effective_timeout),
        kill_grace_s=profile.kill_grace_s,
        stdout_max_bytes=profile.output.stdout_max_bytes,
        stderr_max_bytes=profile.output.stderr_max_bytes,
    )


def compile_proxy_plan(
    settings: EgressSettings,
    layout: EgressLayout,
    *,
    policy_json: str,
    upstream_network: str,
    invocation_id: str,
    tool: str,
    owner: str,
    seccomp_json: str,
) -> ContainerPlan:
    """The egress proxy's sidecar: contained like a tool (it parses what a hostile tool sends)."""
    return ContainerPlan(
        image=settings.image,
        command=("python3", "-I", "-S", "-u", "-"),  # the program arrives on stdin (runtime/egress/proxy.py)
        user="10001:10001",
        env={"LANG": "C.UTF-8", "HOME": "/tmp", "TOOLCELL_EGRESS_POLICY": policy_json},  # nosec B108 - the sidecar's own tmpfs
        labels={
            LABEL_MANAGED: "true",
            LABEL_OWNER: owner,
            LABEL_INVOCATION: invocation_id,
            LABEL_TOOL: tool,
            LABEL_ROLE: ROLE_PROXY,
        },
        runtime="runc",
        seccomp_json=seccomp_json,
        memory_bytes=settings.proxy_memory_bytes,
        nano_cpus=500_000_000,
        pids_limit=16,
        nofile=512,
        tmpfs={"/tmp": "rw,noexec,nosuid,nodev,size=1048576,mode=1777"},  # nosec B108 - inside the sidecar
        mounts=(),
        timeout_s=0.0,  # lives as long as its invocation; the pipeline stops it
        kill_grace_s=1.0,
        stdout_max_bytes=1024 * 1024,
        stderr_max_bytes=64 * 1024,
        network_mode=layout.network,
        network_ip=layout.proxy_ip,
        extra_networks=(upstream_network,),
        hostname="egress",
    )


# A pooled sandbox's secret files arrive with its claim, written by its launcher into an empty tmpfs at each
# file's directory: small, in memory only, the sandbox user's alone, nothing executable.
CLAIM_DIR_OPTIONS = "rw,noexec,nosuid,nodev,size=1m,mode=0700"
# Directories that tmpfs may not cover: it would hide the image's own files (a secret's directory should
# be its own, e.g. /run/secrets).
SYSTEM_DIRS = frozenset({  # nosec B108 - names of directories to refuse, not files we use
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var", "/var/run", "/var/lib",
    "/usr/bin", "/usr/lib", "/usr/local", "/usr/local/bin", "/usr/local/lib", "/usr/sbin",
    "/usr/share", "/opt/toolcell", "/opt/toolcell/tools",
    "/tmp", "/var/tmp",  # nosec B108 - the sandbox's scratch: refused as a secret's directory
})


def secret_dirs(grants: Iterable[SecretGrant]) -> tuple[str, ...]:
    """The directories of a tool's secret files."""
    return tuple(sorted({posixpath.dirname(posixpath.normpath(g.file)) for g in grants if g.file}))


def unpoolable_secret_dir(grants: Iterable[SecretGrant]) -> str | None:
    """A secret file's directory that a pooled sandbox could not cover with its own tmpfs, if any."""
    return next((d for d in secret_dirs(grants) if d in SYSTEM_DIRS), None)


def pooled_plan(plan: ContainerPlan, grants: Iterable[SecretGrant]) -> ContainerPlan:
    """A pooled sandbox's plan: each secret file's directory an empty tmpfs that its claim fills."""
    dirs = secret_dirs(grants)
    if not dirs:
        return plan
    uid, _, gid = plan.user.partition(":")
    options = f"{CLAIM_DIR_OPTIONS},uid={uid},gid={gid or uid}"
    return dataclasses.replace(plan, tmpfs={**plan.tmpfs, **{d: options for d in dirs}})

