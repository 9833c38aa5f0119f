"""Compile a tool and its isolation profile into a container plan.

The plan is the complete, engine-neutral description of one sandbox. Backends translate it 1:1;
they add nothing that weakens it. Everything a caller sends is data on stdin, never part of the plan.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from runtime.errors import ConfigError
from runtime.model import SecretGrant, Tool
from runtime.policy.network import LABEL_ROLE, ROLE_PROXY, EgressLayout, EgressSettings
from runtime.policy.profile import IsolationProfile, Mount

LABEL_MANAGED = "io.toolcell.managed"
LABEL_OWNER = "io.toolcell.owner"
LABEL_INVOCATION = "io.toolcell.invocation"
LABEL_TOOL = "io.toolcell.tool"
LABEL_PROFILE = "io.toolcell.profile"

# /tmp is the only writable path. noexec: a dropped binary can't be run from it; nosuid/nodev: no
# privilege via files; size: the tool can't fill host memory through tmpfs.
SCRATCH_OPTIONS = "rw,noexec,nosuid,nodev,size={size},mode=1777"
# The engine always mounts a writable mqueue filesystem at /dev/mqueue (under runc, even with IPC "none"):
# an empty read-only tmpfs hides it, so no path but /tmp (and /dev/shm if asked) can be written.
MQUEUE_DIR = "/dev/mqueue"
MQUEUE_OPTIONS = "ro,noexec,nosuid,nodev,size=4k,mode=0555"
# Under runsc the host's pids cgroup holds gVisor's Sentry, whose host threads (and, on the ptrace
# platform, one stub process per guest process) are counted there: measured on this host's 2022-12-19
# build, ~38 while idle and ~20 + 6.7 per guest task with a fork bomb at RLIMIT_NPROC 16/64/128
# (128/454/880 pids). The tool's own limit is then RLIMIT_NPROC, which gVisor's kernel enforces per
# sandbox (fork/clone fail with EAGAIN), and the cgroup is a backstop sized for the Sentry with ~25% slack.
GVISOR_PIDS_BASE = 64
GVISOR_PIDS_PER_TASK = 8


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
    # The host pids cgroup limit (under runsc sized for gVisor's own threads; see ``sandbox_pids``).
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
    # Own IPC namespace with no /dev/shm mounted; a profile's ``shm`` comes as a tmpfs in ``tmpfs``.
    ipc_mode: str = "none"
    cgroupns_mode: str = "private"
    log_driver: str = "none"
    working_dir: str = "/tmp"  # nosec B108 - inside the sandbox: its private, capped tmpfs
    hostname: str = "sandbox"
    extra: Mapping[str, str] = field(default_factory=dict)
    # RLIMIT_NPROC (soft = hard) for the sandbox's processes; 0: not set (runc, where it would count the
    # uid's processes host-wide; its pids cgroup is per sandbox).
    nproc: int = 0


# Tasks of ours in every sandbox, counted by its pids limit: the engine's init and the launcher (pooled
# sandboxes; under runsc every sandbox), and under runsc the launcher's relay thread.
OWN_TASKS: Final = {"runc": 2, "runsc": 3}


def min_pids(runtime: str) -> int:
    """The smallest ``pids`` with which a one-process tool can run on ``runtime`` (measured: with fewer,
    the init's or the launcher's fork fails and the tool never starts)."""
    return OWN_TASKS.get(runtime, 2) + 1


def sandbox_pids(runtime: str, pids: int) -> tuple[int, int]:
    """(pids cgroup limit, RLIMIT_NPROC or 0) that make ``pids`` mean the tool's own tasks on ``runtime``.

    runc: the pids cgroup counts exactly the sandbox's tasks. runsc: it also counts the Sentry's host
    threads, so the tool's limit is RLIMIT_NPROC inside gVisor and the cgroup a backstop above it.
    """
    if runtime == "runsc":
        return GVISOR_PIDS_BASE + GVISOR_PIDS_PER_TASK * pids, pids
    return pids, 0


def scratch_tmpfs(profile: IsolationProfile) -> dict[str, str]:
    """The sandbox's only writable paths: /tmp, and /dev/shm if the profile asks; /dev/mqueue hidden."""
    tmpfs = {"/tmp": SCRATCH_OPTIONS.format(size=profile.tmpfs_bytes),  # nosec B108 - inside the sandbox
             MQUEUE_DIR: MQUEUE_OPTIONS}
    if profile.shm_bytes > 0:
        # POSIX shared memory, as restricted as /tmp.
        tmpfs["/dev/shm"] = SCRATCH_OPTIONS.format(size=profile.shm_bytes)  # nosec B108 - inside the sandbox
    return tmpfs


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
    pids_limit, nproc = sandbox_pids(profile.runtime, profile.pids_limit)
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
        pids_limit=pids_limit,
        nproc=nproc,
        nofile=profile.nofile,
        tmpfs=scratch_tmpfs(profile),
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
        tmpfs={"/tmp": SCRATCH_OPTIONS.format(size=1048576), MQUEUE_DIR: MQUEUE_OPTIONS},  # nosec B108 - the sidecar's
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

