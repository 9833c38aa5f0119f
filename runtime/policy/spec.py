"""The neutral sandbox spec: what one sandbox must be, in no engine's terms.

Policy compiles a tool and its isolation profile into a ``SandboxSpec``; each backend translates it into
its own engine's terms inside that backend (Docker: a container create request; OCI: a bundle's
config.json and cgroups) and adds nothing that weakens it. Everything a caller sends is data on stdin,
never part of the spec.

What is not a field, every backend enforces on every sandbox, with no switch to turn it off:

- the root filesystem read-only; ``scratch`` directories are the only writable paths (tmpfs: noexec,
  nosuid, nodev, size-capped), so a dropped binary can't run and nothing persists;
- no capabilities (bounding, effective, permitted, inheritable, ambient: all empty) and no-new-privileges;
- private pid, ipc, uts, mount and network namespaces; with no ``egress`` the network namespace holds
  only loopback; a private cgroup namespace where the runtime offers one;
- an init as pid 1 that reaps and forwards signals; core dumps off (RLIMIT_CORE 0);
- memory + swap capped at ``memory_bytes`` (no escape into swap), ``cpus`` as a CFS quota, the tool's
  ``pids`` as the task limit, ``nofile`` as RLIMIT_NOFILE;
- masked and read-only kernel paths under /proc and /sys;
- nothing of the sandbox outlives its removal (processes, cgroups, mounts, bundles, networks).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from toolcell.errors import ConfigError
from toolcell.model import SecretGrant, Tool
from toolcell.policy.network import EgressGrant
from toolcell.policy.profile import IsolationProfile, Mount

# A pooled sandbox's invocation id until its claim: it serves nobody yet.
POOL_PREFIX: Final = "pool-"
# Roles of sandboxes that serve no invocation themselves.
ROLE_TOOL: Final = ""
ROLE_PROXY: Final = "proxy"

# Scratch space modes: /tmp is shared by the sandbox's (one) user and sticky; a secret file's directory
# is the sandbox user's alone.
SCRATCH_MODE: Final = 0o1777
SECRET_DIR_MODE: Final = 0o700
SECRET_DIR_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class Identity:
    """Whose a sandbox is and what it serves: every backend records it, sweeps and audits read it."""

    owner: str  # the supervisor instance: a start-up sweep removes only its own
    invocation_id: str
    tool: str = ""
    profile: str = ""
    role: str = ROLE_TOOL
    # Wall-clock time (Unix seconds) after which the owner can no longer need this sandbox: any supervisor
    # sharing the engine may then remove it (its owner is gone, or leaked it). 0: only the owner sweeps it.
    # Stamped by the backend at creation from ``SandboxSpec.lease_s`` (``stamped``).
    lease_until: float = 0.0

    @property
    def serving(self) -> bool:
        """Whether this sandbox serves a known invocation (a pooled one's claim is not known to the engine)."""
        return self.role == ROLE_TOOL and not self.invocation_id.startswith(POOL_PREFIX)


@dataclass(frozen=True)
class Scratch:
    """A private, size-capped, in-memory writable directory: noexec, nosuid, nodev always."""

    path: str
    size_bytes: int
    mode: int = SCRATCH_MODE
    # Owner of the directory itself (None: root); the secret directories belong to the sandbox's user.
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Secrets:
    """Granted secrets, delivered with ``Sandbox.start``: never part of the spec, never a host file.

    ``env`` is added to the tool's environment; ``files`` (path in the sandbox -> content) are written,
    mode 0400, into the empty ``Scratch`` the spec has at each file's directory before the tool starts.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.env or self.files)


NO_SECRETS: Final = Secrets()


@dataclass(frozen=True)
class HostSpec:
    """How a session's host runs its tool (``runtime/data/session_host.py``), fixed by the admin's config.

    ``resident``: the tool is spawned once and serves every call (a REPL, an MCP server's driver); else it
    is spawned fresh for each call in the same sandbox. ``workspace``: where input files are written;
    ``outputs``: collected after each call that asks, within ``caps`` (files, total bytes, bytes per file).
    """

    resident: bool = False
    workspace: str = ""
    outputs: str = ""
    caps: tuple[int, int, int] = (64, 8 * 1024 * 1024, 4 * 1024 * 1024)


@dataclass(frozen=True)
class SandboxSpec:
    image: str
    command: tuple[str, ...]
    user: str  # "uid:gid", never root (the profile refuses it)
    env: Mapping[str, str]
    identity: Identity
    # The profile's isolation: "runc" (the host kernel's namespaces) or "runsc" (gVisor's user-space
    # kernel between tool and host). Each backend maps it onto what it runs.
    isolation: str
    # toolcell's seccomp profile (JSON, in the Docker/moby profile format it is written in); each
    # backend translates it (OCI: ``policy.seccomp_oci``). Empty is refused by every backend.
    seccomp_json: str
    memory_bytes: int
    cpus: float
    # The tool's own processes and threads; a backend adds what its own helpers need (``sandbox_pids``).
    pids: int
    nofile: int
    scratch: tuple[Scratch, ...]
    mounts: tuple[Mount, ...]  # read-only host paths
    timeout_s: float
    kill_grace_s: float
    # Destinations the sandbox may reach through its own egress proxy; empty: no network at all.
    egress: tuple[EgressGrant, ...] = ()
    # The tool is granted secrets: it is spawned only when ``start`` brings them (never before).
    defer: bool = False
    working_dir: str = "/tmp"  # nosec B108 - inside the sandbox: its private, capped tmpfs
    hostname: str = "sandbox"
    # How long after its creation the owner may legitimately still need the sandbox: its timeout and kill
    # grace (plus, pooled, the pool's TTL) and a margin. Past it, a peer supervisor on the same engine may
    # remove it: a crashed supervisor's leftovers are cleaned by whoever is alive, never a live peer's.
    lease_s: float = 0.0
    # The tool says when it is ready (the MCP driver, once its server is initialized): a pooled sandbox
    # counts as ready only then, where the backend's transport can tell.
    ready_signal: bool = False
    # A session's sandbox (issue 18): its main process is the session host, serving several calls; None:
    # one call (the tool itself, or the one-claim launcher).
    host: HostSpec | None = None

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


# Tasks of ours in every sandbox, counted by its pids limit: the init and the launcher (pooled sandboxes;
# under runsc every sandbox), and under runsc the launcher's relay thread.
OWN_TASKS: Final = {"runc": 2, "runsc": 3}
# Under runsc the host's pids cgroup holds gVisor's Sentry, whose host threads (and, on the ptrace
# platform, one stub process per guest process) are counted there: measured on this host's 2022-12-19
# build, ~38 while idle and ~20 + 6.7 per guest task with a fork bomb at RLIMIT_NPROC 16/64/128
# (128/454/880 pids). The tool's own limit is then RLIMIT_NPROC, which gVisor's kernel enforces per
# sandbox (fork/clone fail with EAGAIN), and the cgroup is a backstop sized for the Sentry with ~25% slack.
GVISOR_PIDS_BASE: Final = 64
GVISOR_PIDS_PER_TASK: Final = 8


def min_pids(isolation: str) -> int:
    """The smallest ``pids`` with which a one-process tool can run (measured: with fewer, the init's or
    the launcher's fork fails and the tool never starts)."""
    return OWN_TASKS.get(isolation, 2) + 1


def sandbox_pids(isolation: str, pids: int) -> tuple[int, int]:
    """(pids cgroup limit, RLIMIT_NPROC or 0) that make ``pids`` mean the tool's own tasks.

    runc: the pids cgroup counts exactly the sandbox's tasks. runsc: it also counts the Sentry's host
    threads, so the tool's limit is RLIMIT_NPROC inside gVisor and the cgroup a backstop above it.
    """
    if isolation == "runsc":
        return GVISOR_PIDS_BASE + GVISOR_PIDS_PER_TASK * pids, pids
    return pids, 0


def scratch_dirs(profile: IsolationProfile) -> tuple[Scratch, ...]:
    """The sandbox's writable paths: /tmp, and /dev/shm if the profile asks (POSIX shared memory)."""
    dirs = [Scratch("/tmp", profile.tmpfs_bytes)]  # nosec B108 - inside the sandbox
    if profile.shm_bytes > 0:
        dirs.append(Scratch("/dev/shm", profile.shm_bytes))  # nosec B108 - inside the sandbox
    return tuple(dirs)


# Directories a secret's scratch may not cover: it would hide the image's own files (a secret's
# directory should be its own, e.g. /run/secrets).
SYSTEM_DIRS: Final = frozenset({  # nosec B108 - names of directories to refuse, not files we use
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var", "/var/run", "/var/lib",
    "/usr/bin", "/usr/lib", "/usr/local", "/usr/local/bin", "/usr/local/lib", "/usr/sbin",
    "/usr/share", "/opt/toolcell", "/opt/toolcell/tools",
    "/tmp", "/var/tmp",  # nosec B108 - the sandbox's scratch: refused as a secret's directory
})


def secret_dirs(grants: Iterable[SecretGrant]) -> tuple[str, ...]:
    """The directories of a tool's secret files."""
    return tuple(sorted({posixpath.dirname(posixpath.normpath(g.file)) for g in grants if g.file}))


def system_secret_dir(grants: Iterable[SecretGrant]) -> str | None:
    """A secret file's directory that a sandbox's own scratch could not cover, if any (a config error)."""
    return next((d for d in secret_dirs(grants) if d in SYSTEM_DIRS), None)


def secret_scratch(grants: Iterable[SecretGrant], uid: int, gid: int) -> tuple[Scratch, ...]:
    """An empty, small scratch at each secret file's directory, the sandbox user's alone."""
    return tuple(Scratch(d, SECRET_DIR_BYTES, SECRET_DIR_MODE, uid, gid) for d in secret_dirs(grants))


# Room past a sandbox's own deadline for its owner's removal, retries and a busy engine.
LEASE_MARGIN_S: Final = 120.0


def stamped(spec: SandboxSpec, now: float) -> SandboxSpec:
    """``spec`` with its identity's ``lease_until`` set from ``lease_s`` (``now``: the wall clock)."""
    if spec.lease_s <= 0 or spec.identity.lease_until:
        return spec
    return dataclasses.replace(spec, identity=dataclasses.replace(spec.identity, lease_until=now + spec.lease_s))


def compile_spec(
    tool: Tool,
    profile: IsolationProfile,
    *,
    invocation_id: str,
    owner: str,
    seccomp_json: str,
    environ: Mapping[str, str],
    timeout_s: float | None = None,
) -> SandboxSpec:
    """The spec for one invocation; ``timeout_s`` (from a caller deadline) can only shorten."""
    if not tool.command:
        raise ConfigError("command must not be empty", key=f"tools.{tool.name}.command")
    env = dict(profile.env)
    for name in profile.env_passthrough:
        if name in environ:
            env[name] = environ[name]
    env.update(tool.env)  # a tool source's own variables (the admin's, never the caller's)
    effective_timeout = profile.timeout_s if timeout_s is None else min(profile.timeout_s, timeout_s)
    uid, _, gid = profile.user.partition(":")
    return SandboxSpec(
        image=tool.image,
        command=tuple(tool.command),
        user=profile.user,
        env=env,
        identity=Identity(owner=owner, invocation_id=invocation_id, tool=tool.name, profile=profile.name),
        isolation=profile.runtime,
        seccomp_json=seccomp_json,
        memory_bytes=profile.memory_bytes,
        cpus=profile.cpus,
        pids=profile.pids_limit,
        nofile=profile.nofile,
        scratch=scratch_dirs(profile) + secret_scratch(tool.secrets, int(uid), int(gid or uid)),
        mounts=profile.mounts,
        timeout_s=max(0.0, effective_timeout),
        kill_grace_s=profile.kill_grace_s,
        egress=tuple(profile.network),
        defer=bool(tool.secrets),
        lease_s=max(0.0, effective_timeout) + profile.kill_grace_s + LEASE_MARGIN_S,
        ready_signal=tool.source is not None,
    )


def pooled(spec: SandboxSpec) -> SandboxSpec:
    """What a pooled sandbox for ``spec``'s tool is made from: nothing naming an invocation or a deadline."""
    return dataclasses.replace(spec, identity=dataclasses.replace(spec.identity, invocation_id=POOL_PREFIX),
                               timeout_s=0.0)


def fingerprint(spec: SandboxSpec) -> int:
    """Identity of what a sandbox is made from, ignoring what only names the invocation or its deadline."""
    rest = dataclasses.replace(pooled(spec), seccomp_json="", lease_s=0.0)
    # str hashes are cached on the object: the (large) seccomp text is hashed once per config.
    return hash((repr(rest), hash(spec.seccomp_json)))
