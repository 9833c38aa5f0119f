"""Compile a tool and its isolation profile into a container plan.

The plan is the complete, engine-neutral description of one sandbox. Backends translate it 1:1;
they add nothing that weakens it. Everything a caller sends is data on stdin, never part of the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from runtime.errors import ConfigError
from runtime.model import Tool
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
