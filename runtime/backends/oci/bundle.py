"""A ``SandboxSpec`` translated into an OCI bundle's config.json (pure: spec in, dict out, no I/O).

The result reproduces the Docker backend's sandbox (engine 20.10 + runc, ``--cap-drop ALL``,
``--read-only``, ``--network none``, ``--ipc private``, ``--cgroupns private``, ``--init``) field by
field, with what Docker adds that a tool does not need left out (no /dev/mqueue, no /sys/fs/cgroup):

    namespaces     pid, network, ipc, uts, mount, cgroup (no user namespace: the tool runs as
                   ``spec.user`` on the host, as under Docker)
    process        uid:gid with no supplementary groups, all five capability sets empty,
                   noNewPrivileges, RLIMIT_NOFILE, RLIMIT_CORE 0, RLIMIT_NPROC under runsc
    root           the shared unpacked image, read-only
    mounts         /proc, /dev (tmpfs), /dev/pts, /sys (ro), the scratch tmpfs (noexec, nosuid,
                   nodev, size-capped), the read-only host mounts, /etc/hosts and /etc/hostname (ro),
                   the init at /dev/init (ro)
    masked, ro     Docker's default masked and read-only paths under /proc and /sys
    devices        deny all, then runc's defaults (null, zero, full, random, urandom, tty, pts)
    cgroups        ``cgroupsPath`` under a parent the backend made, which holds the limits and
                   the accounting (``cgroups.py``: runc removes its own cgroup on exit). runc's cgroup
                   gets a backstop: the same pids and CPU limits, memory ``BACKSTOP_MARGIN`` above the
                   parent's, so the parent's limit is the one that binds (and counts the OOM) while a
                   sandbox whose parent went missing under runc (which then recreates the path without
                   limits) is still bounded

Refusals (``BackendError``): root or a non-numeric user, a relative path, a scratch without a size,
no seccomp profile.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from toolcell.errors import BackendError
from toolcell.policy.spec import SandboxSpec, sandbox_pids

__all__ = [
    "DEFAULT_PATH",
    "INIT_PATH",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "ImageConfig",
    "build_env",
    "oci_config",
]

OCI_VERSION: Final = "1.0.2"
# Where the init (tini, static) is bind-mounted: /dev is the sandbox's own tmpfs, so the shared
# read-only rootfs needs no mountpoint for it.
INIT_PATH: Final = "/dev/init"
# tini forwards signals to the tool (not -g: runc 1.1 forwards its own SIGURG to the init, and a
# group kill racing the child's setpgid makes tini print a warning into the tool's stderr).
INIT_ARGS: Final = ("--",)
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker 20.10+'s defaults (oci/defaults.go): kernel interfaces that leak host state or let a process
# poke the host (sysrq-trigger, /proc/sys) are hidden or read-only.
MASKED_PATHS: Final = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
NAMESPACES: Final = ("pid", "network", "ipc", "uts", "mount", "cgroup")
_NO_CAPS: Final = ("bounding", "effective", "inheritable", "permitted", "ambient")
# Above the largest single memcg charge (a 2 MiB huge page; per-CPU stock batches are 64 pages), so with
# equal usage a charge always fails at the parent's limit first.
BACKSTOP_MARGIN: Final = 16 * 1024 * 1024
CFS_PERIOD_US: Final = 100_000


@dataclass(frozen=True)
class ImageConfig:
    """What of an image's config a sandbox uses (the rest of the image is its unpacked rootfs)."""

    env: tuple[str, ...] = ()  # "NAME=value", as the image declares them
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def build_env(image_env: Sequence[str], spec_env: Mapping[str, str], hostname: str) -> list[str]:
    """The tool's environment: the image's, overlaid by the spec's; PATH, HOSTNAME and HOME if unset
    (HOME=/tmp: the sandbox's only writable place, as the Docker backend's tools see it)."""
    env: dict[str, str] = {}
    for item in image_env:
        name, sep, value = item.partition("=")
        if sep and name:
            env[name] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    env.update(spec_env)
    env.setdefault("HOME", "/tmp")  # noqa: S108 # nosec B108 - inside the sandbox: its private tmpfs
    for name in env:
        if not name or "=" in name or "\0" in name or "\0" in env[name]:
            raise BackendError(f"invalid environment variable name {name[:64]!r}")
    return [f"{k}={v}" for k, v in env.items()]


def _absolute(path: str, what: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise BackendError(f"{what} must be an absolute path, got {path[:200]!r}")
    return posixpath.normpath(path)


def _user(spec: SandboxSpec) -> tuple[int, int]:
    try:
        uid, gid = spec.uid_gid
    except ValueError:
        raise BackendError(f"user must be numeric uid:gid, got {spec.user[:64]!r}") from None
    if uid <= 0 or gid < 0:
        raise BackendError(f"refusing to run a sandbox as uid {uid}")
    return uid, gid


def _scratch_mounts(spec: SandboxSpec) -> list[dict[str, Any]]:
    mounts = []
    for s in sorted(spec.scratch, key=lambda s: posixpath.normpath(s.path).count("/")):  # parents first
        target = _absolute(s.path, "a scratch directory")
        if s.size_bytes <= 0:
            raise BackendError(f"scratch {target!r} has no size cap")
        # noexec: a dropped binary can't run; nosuid/nodev: no privilege through planted files.
        options = ["rw", "noexec", "nosuid", "nodev", f"size={s.size_bytes}", f"mode={s.mode:o}"]
        if s.uid is not None:
            options.append(f"uid={s.uid}")
        if s.gid is not None:
            options.append(f"gid={s.gid}")
        mounts.append({"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options})
    return mounts


def _backstop(memory_bytes: int, pids: int, cpus: float, swap_limit: bool) -> dict[str, Any]:
    """runc's own cgroup limits: a backstop to the parent's (see the module docstring)."""
    memory: dict[str, int] = {"limit": memory_bytes + BACKSTOP_MARGIN}
    if swap_limit:
        memory["swap"] = memory_bytes + BACKSTOP_MARGIN  # memory + swap, as runc means it
    resources: dict[str, Any] = {
        # Device rules: deny all, runc then adds its default allowlist (null, zero, full, random, ...).
        "devices": [{"allow": False, "access": "rwm"}],
        "memory": memory,
        "pids": {"limit": pids},
    }
    if cpus > 0:
        resources["cpu"] = {"quota": max(1000, int(cpus * CFS_PERIOD_US)), "period": CFS_PERIOD_US}
    return resources


def oci_config(
    spec: SandboxSpec,
    *,
    rootfs: str,
    image: ImageConfig,
    command: Sequence[str],
    seccomp: Mapping[str, Any],
    cgroups_path: str,
    init_path: str,
    netns_path: str = "",
    etc_files: Sequence[tuple[str, str]] = (),
    swap_limit: bool = True,
) -> dict[str, Any]:
    """config.json for one sandbox running ``command`` (the spec's, or the launcher in front of it).

    ``etc_files``: (target, host file) pairs bind-mounted read-only over the image's files, as Docker
    mounts its own /etc/hosts and /etc/hostname (an exported image has them empty).
    ``swap_limit``: the host accounts memory + swap (v1 ``memory.memsw.*``, v2 ``memory.swap.max``).

    ``netns_path``: a network namespace prepared for this sandbox (loopback up, as Docker's ``none``);
    empty: runc makes a fresh one (loopback down).
    """
    if not seccomp:
        raise BackendError("the spec carries no seccomp profile; refusing to create the sandbox")
    if not command:
        raise BackendError("the sandbox has no command")
    uid, gid = _user(spec)
    pids_limit, nproc = sandbox_pids(spec.isolation, spec.pids)
    if spec.memory_bytes <= 0 or pids_limit <= 0:
        raise BackendError("a sandbox needs a memory and a pids limit")
    rlimits = [
        {"type": "RLIMIT_NOFILE", "hard": spec.nofile, "soft": spec.nofile},
        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},  # a crash dump could carry secrets out
    ]
    if nproc:
        rlimits.append({"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc})
    scratch = _scratch_mounts(spec)
    scratch_targets = {m["destination"] for m in scratch}
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        *scratch,
    ]
    for m in spec.mounts:
        target = _absolute(m.target, "a mount target")
        source = _absolute(m.source, "a mount source")
        if target in scratch_targets or target in ("/", "/proc", "/dev", "/sys", INIT_PATH):
            raise BackendError(f"mount target {target!r} would cover a sandbox path")
        # Read-only: a writable host mount would let a hostile tool persist or tamper across calls.
        mounts.append({"destination": target, "type": "bind", "source": source,
                       "options": ["rbind", "ro", "nosuid", "nodev"]})
    for target, source in etc_files:
        mounts.append({"destination": _absolute(target, "an /etc file"), "type": "bind",
                       "source": _absolute(source, "an /etc file"),
                       "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
    mounts.append({"destination": INIT_PATH, "type": "bind", "source": _absolute(init_path, "the init"),
                   "options": ["bind", "ro", "nosuid", "nodev"]})
    namespaces: list[dict[str, str]] = []
    for ns in NAMESPACES:
        entry = {"type": ns}
        if ns == "network" and netns_path:
            entry["path"] = netns_path
        namespaces.append(entry)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": []},
            "args": [INIT_PATH, *INIT_ARGS, *image.entrypoint, *command],
            "env": build_env(image.env, spec.env, spec.hostname),
            "cwd": _absolute(spec.working_dir, "the working directory"),
            "capabilities": {k: [] for k in _NO_CAPS},
            "rlimits": rlimits,
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": _backstop(spec.memory_bytes, pids_limit, spec.cpus, swap_limit),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": dict(seccomp),
        },
    }
