"""Isolation profiles: frozen values with safe defaults and ``with_*`` builders.

Each default names the threat it mitigates. Options that weaken isolation say so in their docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from toolcell.policy.network import EgressGrant

MiB = 1024 * 1024


@dataclass(frozen=True)
class Mount:
    """A host path exposed to the tool, always read-only (tool code, reference data).

    Read-only because a writable host mount would let a hostile tool persist or tamper with
    host files across invocations.
    """

    source: str
    target: str


InjectionAction = Literal["flag", "wrap", "block"]


@dataclass(frozen=True)
class OutputPolicy:
    # Per-stream caps bound what a flooding tool can make the supervisor hold in memory and what
    # reaches the model's context; the total cap bounds both streams together.
    stdout_max_bytes: int = 1 * MiB
    stderr_max_bytes: int = 256 * 1024
    max_total_bytes: int = 1 * MiB + 256 * 1024
    # Prompt-injection markers in output: "flag" reports them; "wrap" delivers the output as clearly
    # delimited untrusted data; "block" withholds it (status denied). Secrets are always redacted and
    # escapes/controls always removed: those have no off switch.
    injection: InjectionAction = "flag"
    # Largest stdout that is parsed as structured (JSON) content, and its nesting limit.
    structured_max_bytes: int = 256 * 1024
    structured_max_depth: int = 32
    # CPU seconds scrubbing one invocation's output may take (both streams): a tool crafting output that
    # is slow to scrub costs the supervisor at most this; past it nothing more is released (truncated).
    scrub_budget_s: float = 2.0


@dataclass(frozen=True)
class IsolationProfile:
    """How one tool invocation is contained. ``IsolationProfile()`` is the safe default."""

    name: str = "default"
    # Memory cap; swap is set equal so the limit cannot be escaped into swap (OOM -> status oom).
    memory_bytes: int = 256 * MiB
    # CPU quota in cores: a spinner cannot starve the host or its neighbours.
    cpus: float = 1.0
    # The tool's own processes and threads (the sandbox's init, and under runsc the launcher's two, count
    # too): fork and thread bombs stop here with EAGAIN. runc: the pids cgroup; runsc: RLIMIT_NPROC in
    # gVisor's kernel, whose own threads the host cgroup then also holds (see spec.py).
    pids_limit: int = 64
    # RLIMIT_NOFILE: fd exhaustion stays inside the sandbox.
    nofile: int = 256
    # Wall-clock limit; a deadline from the caller can only shorten it.
    timeout_s: float = 30.0
    # SIGTERM -> grace -> SIGKILL, so a tool ignoring SIGTERM still dies.
    kill_grace_s: float = 2.0
    # OCI runtime: "runc" (default) or "runsc" (gVisor: a user-space kernel between tool and host).
    runtime: str = "runc"
    # Seccomp: "default" is toolcell's own tightened allowlist; otherwise a path to a JSON profile.
    seccomp: str = "default"
    # Scratch space; noexec/nosuid/nodev and size-capped so /tmp can't fill the host or stage binaries.
    tmpfs_bytes: int = 64 * MiB
    # POSIX shared memory (/dev/shm). 0 (default): no /dev/shm at all, so /tmp stays the only writable
    # path. Widens what the tool can write: a positive size mounts a noexec/nosuid/nodev tmpfs of that size.
    shm_bytes: int = 0
    # Non-root uid:gid: a container escape starts without root on the host.
    user: str = "10001:10001"
    # Fixed environment for the tool. Nothing of the supervisor's environment is inherited.
    env: Mapping[str, str] = field(default_factory=lambda: {"LANG": "C.UTF-8", "HOME": "/tmp"})  # nosec B108
    # Names copied from the supervisor's environment. Unsafe: anything listed here reaches the tool.
    env_passthrough: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    # No network by default: a prompt-injected tool cannot exfiltrate or reach internal services.
    # Grants open named destinations only, through a per-invocation filtering proxy (policy/network.py).
    network: tuple[EgressGrant, ...] = ()
    output: OutputPolicy = field(default_factory=OutputPolicy)

    def with_memory(self, memory_bytes: int) -> IsolationProfile:
        return dataclasses.replace(self, memory_bytes=memory_bytes)

    def with_cpus(self, cpus: float) -> IsolationProfile:
        return dataclasses.replace(self, cpus=cpus)

    def with_pids_limit(self, pids_limit: int) -> IsolationProfile:
        return dataclasses.replace(self, pids_limit=pids_limit)

    def with_timeout(self, timeout_s: float, kill_grace_s: float | None = None) -> IsolationProfile:
        grace = self.kill_grace_s if kill_grace_s is None else kill_grace_s
        return dataclasses.replace(self, timeout_s=timeout_s, kill_grace_s=grace)

    def with_runtime(self, runtime: str) -> IsolationProfile:
        return dataclasses.replace(self, runtime=runtime)

    def with_shm(self, shm_bytes: int) -> IsolationProfile:
        """Give the tool a writable /dev/shm of ``shm_bytes`` (0: none). Another writable path."""
        return dataclasses.replace(self, shm_bytes=shm_bytes)

    def with_seccomp(self, seccomp: str) -> IsolationProfile:
        return dataclasses.replace(self, seccomp=seccomp)

    def with_mounts(self, *mounts: Mount) -> IsolationProfile:
        """Add read-only host mounts. Each one widens what the tool can read."""
        return dataclasses.replace(self, mounts=self.mounts + tuple(mounts))

    def with_network(self, *grants: EgressGrant) -> IsolationProfile:
        """Replace the egress grants. Each grant lets the tool send data to that destination."""
        return dataclasses.replace(self, network=tuple(grants))

    def with_env(self, **env: str) -> IsolationProfile:
        return dataclasses.replace(self, env={**self.env, **env})

    def with_output(self, stdout_max_bytes: int, stderr_max_bytes: int, **more: Any) -> IsolationProfile:
        output = dataclasses.replace(self.output, stdout_max_bytes=stdout_max_bytes,
                                     stderr_max_bytes=stderr_max_bytes, **more)
        return dataclasses.replace(self, output=output)

    def named(self, name: str) -> IsolationProfile:
        return dataclasses.replace(self, name=name)
