"""``toolcell doctor``: check the host the way the sandbox (and its hostile test suite) needs it.

Each check returns a ``Finding`` (ok / warn / fail, what was seen, how to fix it). For ``engine.kind
docker`` engine facts come from the backend's ``info()`` and host facts from ``/proc/sys`` and the engine
socket's mode; for ``oci`` (no daemon) from the host itself: the OCI runtime binary, privileges, cgroup
controllers, the init binary and the rootfs store (``OciFacts``). ``evaluate`` and ``evaluate_oci`` are
pure (facts in, findings out) so every rule is unit-tested without a host.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
import subprocess  # nosec B404 - fixed argv: the configured OCI runtime's --version
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolcell.errors import ToolcellError


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class HostFacts:
    """What doctor reads from the host itself (None: not present on this kernel)."""

    engine_socket: str | None
    socket_mode: int | None
    socket_uid: int | None
    io_uring_disabled: int | None
    unprivileged_userns_clone: int | None
    max_user_namespaces: int | None


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def host_facts(docker_host: str) -> HostFacts:
    path = docker_host.removeprefix("unix://") if docker_host.startswith("unix://") else None
    mode = uid = None
    if path:
        try:
            st = os.stat(path)
            mode, uid = stat.S_IMODE(st.st_mode), st.st_uid
        except OSError:
            pass
    return HostFacts(
        engine_socket=path,
        socket_mode=mode,
        socket_uid=uid,
        io_uring_disabled=_read_int("/proc/sys/kernel/io_uring_disabled"),
        unprivileged_userns_clone=_read_int("/proc/sys/kernel/unprivileged_userns_clone"),
        max_user_namespaces=_read_int("/proc/sys/user/max_user_namespaces"),
    )


def check_engine(address: str, info: Mapping[str, Any] | None, error: str) -> Finding:
    if info is None:
        return Finding("engine reachable", Level.FAIL, f"{address}: {error}",
                       "start the engine (bash scripts/setup.sh starts dockerd), or set engine.docker_host "
                       "/ DOCKER_HOST to its socket")
    return Finding("engine reachable", Level.OK, f"{address}: Docker {info.get('ServerVersion', '?')}")


def check_seccomp(info: Mapping[str, Any]) -> Finding:
    opts = [str(o) for o in info.get("SecurityOptions") or []]
    if any(o.startswith("name=seccomp") for o in opts):
        return Finding("seccomp", Level.OK, "engine supports seccomp")
    return Finding("seccomp", Level.FAIL, f"security options: {opts or 'none'}",
                   "use a kernel with CONFIG_SECCOMP_FILTER and an engine built with seccomp (Debian's docker.io)")


def check_cgroups(info: Mapping[str, Any]) -> Finding:
    missing = [name for key, name in (("MemoryLimit", "memory"), ("PidsLimit", "pids"), ("CpuCfsQuota", "cpu quota"))
               if not info.get(key)]
    detail = f"cgroup v{info.get('CgroupVersion', '?')} ({info.get('CgroupDriver', '?')})"
    if missing:
        return Finding("cgroups", Level.FAIL, f"{detail}; no {', '.join(missing)} limits",
                       "enable the memory, pids and cpu controllers (e.g. boot with cgroup_enable=memory)")
    if info.get("SwapLimit") is False:
        return Finding("cgroups", Level.WARN, f"{detail}; no swap limit: memory+swap can't be capped",
                       "boot with swapaccount=1 (cgroup v1) or disable swap")
    return Finding("cgroups", Level.OK, f"{detail}; memory, pids and cpu limits available")


def check_runtimes(info: Mapping[str, Any], wanted: set[str]) -> Finding:
    have = set(info.get("Runtimes") or {})
    missing = sorted(wanted - have)
    if missing:
        return Finding("runtimes", Level.FAIL, f"profiles use {', '.join(missing)}; engine has {sorted(have)}",
                       "install runsc (apt-get install runsc) and register it: bash scripts/setup.sh")
    if "runsc" not in have:
        return Finding("runtimes", Level.WARN, f"engine has {sorted(have)}; no gVisor",
                       "for untrusted code install runsc and run bash scripts/setup.sh to register it")
    return Finding("runtimes", Level.OK, f"engine has {sorted(have)}")


def check_socket(facts: HostFacts) -> Finding:
    if facts.engine_socket is None:
        return Finding("engine socket permissions", Level.WARN, "the engine is reached over TCP",
                       "prefer the engine's Unix socket; a TCP engine endpoint must use TLS")
    if facts.socket_mode is None:
        return Finding("engine socket permissions", Level.FAIL, f"{facts.engine_socket}: not found",
                       "start the engine or point engine.docker_host at its socket")
    if facts.socket_mode & 0o007:
        return Finding("engine socket permissions", Level.FAIL,
                       f"{facts.engine_socket} is mode {facts.socket_mode:04o}: anyone on the host controls the engine",
                       f"chmod o-rwx {facts.engine_socket} (and keep the docker group to trusted users)")
    if facts.socket_uid != 0:
        return Finding("engine socket permissions", Level.WARN,
                       f"{facts.engine_socket} is owned by uid {facts.socket_uid}", "the socket should be root's")
    return Finding("engine socket permissions", Level.OK, f"{facts.engine_socket} mode {facts.socket_mode:04o}")


def check_io_uring(facts: HostFacts) -> Finding:
    if facts.io_uring_disabled is None:
        return Finding("io_uring sysctl", Level.OK,
                       "kernel.io_uring_disabled absent; toolcell's seccomp denies io_uring")
    if facts.io_uring_disabled == 0:
        return Finding("io_uring sysctl", Level.WARN,
                       "kernel.io_uring_disabled=0: host processes may use io_uring (sandboxes cannot: seccomp)",
                       "sysctl -w kernel.io_uring_disabled=2 (persist in /etc/sysctl.d/) unless the host needs it")
    return Finding("io_uring sysctl", Level.OK, f"kernel.io_uring_disabled={facts.io_uring_disabled}")


def check_userns(facts: HostFacts) -> Finding:
    if facts.unprivileged_userns_clone == 0 or facts.max_user_namespaces == 0:
        return Finding("user namespaces sysctl", Level.OK, "unprivileged user namespaces are disabled")
    seen = ", ".join(f"{name}={value}" for name, value in (
        ("kernel.unprivileged_userns_clone", facts.unprivileged_userns_clone),
        ("user.max_user_namespaces", facts.max_user_namespaces)) if value is not None)
    return Finding("user namespaces sysctl", Level.WARN,
                   f"{seen}: unprivileged user namespaces allowed on the host (sandboxes cannot: seccomp)",
                   "sysctl -w kernel.unprivileged_userns_clone=0 (Debian) unless rootless containers need them")


def evaluate(address: str, info: Mapping[str, Any] | None, error: str, facts: HostFacts,
             wanted_runtimes: set[str]) -> list[Finding]:
    findings = [check_engine(address, info, error)]
    if info is not None:
        findings += [check_seccomp(info), check_cgroups(info), check_runtimes(info, wanted_runtimes)]
    findings += [check_socket(facts), check_io_uring(facts), check_userns(facts)]
    return findings


async def run_doctor(address: str, get_info: Callable[[], Any], wanted_runtimes: set[str]) -> list[Finding]:
    """Gather engine info through ``get_info`` (an awaitable factory) and the host's facts; evaluate."""
    info: Mapping[str, Any] | None = None
    error = ""
    try:
        info = await get_info()
    except ToolcellError as exc:
        error = str(exc)
    return evaluate(address, info, error, host_facts(address), wanted_runtimes)


@dataclass(frozen=True)
class OciFacts:
    """What doctor reads from the host for the daemonless engine."""

    runtime: str  # as configured (a name on PATH or a path)
    runtime_path: str | None  # resolved, None: not found
    runtime_version: str
    euid: int
    cgroup_mode: str  # "v1", "hybrid", "v2" or "none"
    controllers: frozenset[str]  # memory, pids, cpu, cpuacct ... available to per-call cgroups
    v2_controllers: frozenset[str]  # controllers bound to the unified hierarchy (hybrid: crun refuses any)
    swap_accounting: bool
    init_path: str | None
    store_dir: str
    store_images: frozenset[str]  # references present in the rootfs store
    seccomp_filter: bool
    io_uring_disabled: int | None
    unprivileged_userns_clone: int | None
    max_user_namespaces: int | None


def _cgroup_layout(root: Path) -> tuple[str, frozenset[str], frozenset[str], bool]:
    """(mode, controllers usable for limits, controllers on the unified hierarchy, swap accounting)."""
    if (root / "cgroup.controllers").is_file():  # the unified hierarchy at the root: v2
        v2 = frozenset((root / "cgroup.controllers").read_text().split())
        return "v2", v2, v2, (root / "memory.swap.max").exists() or "memory" in v2
    v1 = frozenset(c for c in ("memory", "pids", "cpu", "cpuacct", "freezer") if (root / c).is_dir())
    unified = root / "unified" / "cgroup.controllers"
    v2 = frozenset(unified.read_text().split()) if unified.is_file() else frozenset()
    mode = "hybrid" if unified.is_file() else ("v1" if v1 else "none")
    return mode, v1, v2, (root / "memory" / "memory.memsw.limit_in_bytes").exists()


def oci_facts(runtime: str, store_dir: str, *, init_path: str = "/usr/bin/tini-static",
              cgroup_root: str = "/sys/fs/cgroup") -> OciFacts:
    from toolcell.backends.oci.rootfs import RootfsStore

    path = shutil.which(runtime)
    version = ""
    if path is not None:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,  # noqa: S603 # nosec B603
                                 check=False).stdout
            version = out.splitlines()[0].strip() if out else ""
        except (OSError, subprocess.TimeoutExpired):
            version = ""
    mode, controllers, v2, swap = _cgroup_layout(Path(cgroup_root))
    try:
        images = frozenset(k for k, v in RootfsStore(store_dir).references().items() if k != v)
    except ToolcellError:
        images = frozenset()
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    return OciFacts(
        runtime=runtime, runtime_path=path, runtime_version=version, euid=os.geteuid(), cgroup_mode=mode,
        controllers=controllers, v2_controllers=v2, swap_accounting=swap,
        init_path=init_path if os.access(init_path, os.X_OK) else None, store_dir=store_dir, store_images=images,
        seccomp_filter="Seccomp_filters:" in status or "Seccomp:" in status,
        io_uring_disabled=_read_int("/proc/sys/kernel/io_uring_disabled"),
        unprivileged_userns_clone=_read_int("/proc/sys/kernel/unprivileged_userns_clone"),
        max_user_namespaces=_read_int("/proc/sys/user/max_user_namespaces"),
    )


def evaluate_oci(facts: OciFacts, wanted_images: set[str], wanted_runtimes: set[str]) -> list[Finding]:
    """Findings for ``engine.kind: oci``: the same sandbox as the Docker engine's, with no daemon."""
    findings = []
    if facts.runtime_path is None:
        findings.append(Finding("OCI runtime", Level.FAIL, f"{facts.runtime!r} not found on PATH",
                                "apt-get install runc (or set engine.oci.runtime to its path)"))
    elif os.path.basename(facts.runtime) == "crun" and facts.cgroup_mode == "hybrid" and facts.v2_controllers:
        findings.append(Finding("OCI runtime", Level.FAIL,
                                f"{facts.runtime_version or 'crun'} refuses a hybrid cgroup host with controllers on "
                                f"cgroup v2 ({', '.join(sorted(facts.v2_controllers))})",
                                "use runc (engine.oci.runtime: runc), or boot with cgroup v2 only"))
    else:
        findings.append(Finding("OCI runtime", Level.OK, f"{facts.runtime_path}: {facts.runtime_version or '?'}"))
    if facts.euid != 0:
        findings.append(Finding("privileges", Level.FAIL, f"running as uid {facts.euid}",
                                "the oci engine creates namespaces, mounts and cgroups: run the supervisor as root "
                                "(see deploy/README.md for what that means in a sidecar)"))
    else:
        findings.append(Finding("privileges", Level.OK, "root (no Docker socket needed)"))
    missing = sorted({"memory", "pids", "cpu"} - facts.controllers)
    detail = f"cgroup {facts.cgroup_mode}; controllers {', '.join(sorted(facts.controllers)) or 'none'}"
    if missing:
        findings.append(Finding("cgroups", Level.FAIL, f"{detail}; no {', '.join(missing)}",
                                "mount the memory, pids and cpu controllers (v1) or enable them in cgroup.subtree_"
                                "control (v2)"))
    elif not facts.swap_accounting:
        findings.append(Finding("cgroups", Level.WARN, f"{detail}; no swap accounting: memory+swap can't be capped",
                                "boot with swapaccount=1 (cgroup v1) or disable swap"))
    else:
        findings.append(Finding("cgroups", Level.OK, f"{detail}; memory+swap, pids and cpu limits available"))
    if facts.init_path is None:
        findings.append(Finding("init", Level.FAIL, "no tini-static: a tool would run as pid 1 (no reaping, SIGTERM "
                                "ignored)", "apt-get install tini"))
    else:
        findings.append(Finding("init", Level.OK, f"{facts.init_path}"))
    absent = sorted(wanted_images - facts.store_images)
    if absent:
        findings.append(Finding("rootfs store", Level.FAIL, f"{facts.store_dir}: no {', '.join(absent)}",
                                f"toolcell images unpack --store {facts.store_dir} {' '.join(absent)} "
                                "(or toolcell images build)"))
    else:
        findings.append(Finding("rootfs store", Level.OK,
                                f"{facts.store_dir}: {len(facts.store_images)} image(s), every tool's present"))
    findings.append(Finding("seccomp", Level.OK if facts.seccomp_filter else Level.FAIL,
                            "kernel supports seccomp filters" if facts.seccomp_filter else "no seccomp in this kernel",
                            "" if facts.seccomp_filter else "use a kernel with CONFIG_SECCOMP_FILTER"))
    if "runsc" in wanted_runtimes:
        findings.append(Finding("runtimes", Level.FAIL, "profiles use runsc, which the oci engine does not run",
                                "use engine.kind docker for runsc profiles"))
    host = HostFacts(engine_socket=None, socket_mode=None, socket_uid=None, io_uring_disabled=facts.io_uring_disabled,
                     unprivileged_userns_clone=facts.unprivileged_userns_clone,
                     max_user_namespaces=facts.max_user_namespaces)
    return [*findings, check_io_uring(host), check_userns(host)]


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{f.level.value:>4}] {f.check}: {f.detail}")
        if f.fix and f.level is not Level.OK:
            lines.append(f"       fix: {f.fix}")
    failed = sum(f.level is Level.FAIL for f in findings)
    warned = sum(f.level is Level.WARN for f in findings)
    lines.append(f"{len(findings)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)
