"""Per-sandbox parent cgroups made by the OCI backend: the limits, and the accounting that outlives runc's own.

runc creates the container's cgroup at ``cgroupsPath`` and deletes it when ``runc run`` ends, taking
the OOM count, the peak memory and the CPU time with it. So every sandbox gets a parent of ours::

    v1 (one mount per controller)   <root>/<ctrl>/toolcell/<owner>/<id>    ctrl: memory, pids, cpu, cpuacct
    v2 (one hierarchy)              <root>/toolcell/<owner>/<id>

holding the limits (hierarchical: they bind runc's child ``.../<id>/c``, which gets none of its own),
read after the exit (v1: ``memory.oom_control`` oom_kill -- counted in the memcg that hit its limit,
ours --, ``memory.max_usage_in_bytes``, ``cpuacct.usage``; v2: ``memory.events``, ``memory.peak``,
``cpu.stat``) and removed with the sandbox, together with whatever runc left under ``<id>`` in other
controllers (cpuset, devices, freezer, blkio, systemd, unified).

Limits: memory = memory + swap = ``memory_bytes`` (no escape into swap: v1 ``memory.memsw.limit_in_bytes``,
v2 ``memory.swap.max`` 0, which is swap alone); pids (fork bombs); CPU as a CFS quota. Plain file I/O,
blocking: called from the backend's threads. The root is a parameter, so the path logic is testable
in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from toolcell.backends.cgroup import read_int, read_key
from toolcell.errors import BackendError
from toolcell.model import Usage

__all__ = ["CgroupLimits", "CgroupTree", "SandboxCgroup", "safe_component"]

TOP: Final = "toolcell"
CHILD: Final = "c"  # runc's own cgroup under ours
CFS_PERIOD_US: Final = 100_000
V1_LIMITED: Final = ("memory", "pids", "cpu", "cpuacct")
_SAFE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def safe_component(name: str) -> str:
    """``name`` as one path component (an owner string is config: never let it climb the tree)."""
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    import hashlib

    return "h-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids: int
    cpus: float


class CgroupTree:
    """This host's cgroup layout (v1 or v2, detected once) and where each owner's sandboxes go."""

    def __init__(self, root: str | os.PathLike[str] = "/sys/fs/cgroup") -> None:
        self.root = Path(root)
        self.v2 = (self.root / "cgroup.controllers").exists()
        self._ready: set[str] = set()
        self._used: set[str] = set()
        if not self.v2:
            for ctrl in V1_LIMITED:
                if not (self.root / ctrl).is_dir():
                    raise BackendError(f"cgroup v1 controller {ctrl!r} is not mounted at {self.root / ctrl}")

    @property
    def swap_limit(self) -> bool:
        """Whether runc may be given a memory + swap limit (v1: swap accounting on; v2: runc skips
        ``memory.swap.max`` where it is missing)."""
        return self.v2 or (self.root / "memory" / "memory.memsw.limit_in_bytes").exists()

    def runc_path(self, owner: str, sandbox_id: str) -> str:
        """``linux.cgroupsPath`` for runc: its cgroup is a child of ours."""
        return f"/{TOP}/{safe_component(owner)}/{sandbox_id}/{CHILD}"

    def owner_dirs(self, owner: str) -> list[Path]:
        """Every hierarchy's directory for ``owner`` (existing or not)."""
        rel = Path(TOP) / safe_component(owner)
        if self.v2:
            return [self.root / rel]
        hierarchies = sorted({os.path.realpath(p) for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()})
        return [Path(h) / rel for h in hierarchies]

    def sandbox(self, owner: str, sandbox_id: str) -> SandboxCgroup:
        return SandboxCgroup(self, owner, sandbox_id)

    def orphans(self, owner: str) -> set[str]:
        """Sandbox ids with a directory of ``owner``'s in any hierarchy."""
        found: set[str] = set()
        for d in self.owner_dirs(owner):
            with contextlib.suppress(OSError):
                found.update(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        return found

    def owners_used(self) -> list[str]:
        """Owners whose directories this tree made (or found) since it was created."""
        return sorted(self._used)

    def remove_owner(self, owner: str) -> None:
        """Remove ``owner``'s (empty) directories; any that still hold a sandbox stay."""
        self._ready.discard(owner)
        for d in self.owner_dirs(owner):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _prepare_owner(self, owner: str) -> None:
        """v2: let the sandboxes under ``toolcell/<owner>`` use memory, pids and cpu (once per owner)."""
        self._used.add(owner)
        if owner in self._ready and (not self.v2 or (self.root / TOP / safe_component(owner)).is_dir()):
            return
        if self.v2:
            top = self.root / TOP
            owner_dir = top / safe_component(owner)
            owner_dir.mkdir(parents=True, exist_ok=True)
            for d in (self.root, top, owner_dir):
                _write(d / "cgroup.subtree_control", "+memory +pids +cpu")
        self._ready.add(owner)


class SandboxCgroup:
    """One sandbox's parent cgroups: create with limits, read usage, kill what is inside, remove."""

    def __init__(self, tree: CgroupTree, owner: str, sandbox_id: str) -> None:
        self._tree = tree
        self._owner = owner
        rel = Path(TOP) / safe_component(owner) / sandbox_id
        self._rel = rel
        if tree.v2:
            self.memory_dir = self.pids_dir = self.cpu_dir = self.cpuacct_dir = tree.root / rel
        else:
            self.memory_dir = tree.root / "memory" / rel
            self.pids_dir = tree.root / "pids" / rel
            self.cpu_dir = tree.root / "cpu" / rel
            self.cpuacct_dir = tree.root / "cpuacct" / rel
        self._peak = 0
        self._cpu_ns = 0
        # v1: an eventfd the kernel signals on each OOM of our parent memcg (and once more when the
        # cgroup is removed: read it before). The kernel counts ``oom_kill`` in the killed task's own
        # memcg only -- runc's child, gone with ``runc run`` -- so the count cannot be read afterwards.
        self._oom_fd = -1
        self._ooms = 0

    def dirs(self) -> list[Path]:
        """Every directory of this sandbox in every hierarchy (whoever made it: us or runc)."""
        if self._tree.v2:
            return [self._tree.root / self._rel]
        return [d / self._rel.name for d in self._tree.owner_dirs(self._owner)]

    def create(self, limits: CgroupLimits) -> None:
        """Make the parents and write the limits; on any failure nothing is left behind."""
        self._tree._prepare_owner(self._owner)
        made: list[Path] = []
        try:
            for d in dict.fromkeys((self.memory_dir, self.pids_dir, self.cpu_dir, self.cpuacct_dir)):
                d.mkdir(parents=True)
                made.append(d)
            if self._tree.v2:
                self._limit_v2(limits)
            else:
                self._limit_v1(limits)
                self._watch_oom_v1()
        except OSError as exc:
            self._close_oom_fd()
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise BackendError(f"cannot create the sandbox's cgroup {self._rel}: {exc}") from exc

    def _limit_v1(self, limits: CgroupLimits) -> None:
        mem = self.memory_dir
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # memory + swap: without it the tool could spill into swap past its limit
            _write(memsw, str(limits.memory_bytes))
        swappiness = mem / "memory.swappiness"
        if not memsw.exists() and swappiness.exists():
            _write(swappiness, "0")
        _write(self.pids_dir / "pids.max", str(limits.pids))
        if limits.cpus > 0:
            _write(self.cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(self.cpu_dir / "cpu.cfs_quota_us", str(max(1000, int(limits.cpus * CFS_PERIOD_US))))

    def _watch_oom_v1(self) -> None:
        self._oom_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        control = os.open(self.memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _write(self.memory_dir / "cgroup.event_control", f"{self._oom_fd} {control}")
        finally:
            os.close(control)

    def _close_oom_fd(self) -> None:
        if self._oom_fd >= 0:
            os.close(self._oom_fd)
            self._oom_fd = -1

    def _limit_v2(self, limits: CgroupLimits) -> None:
        d = self.memory_dir
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():  # swap alone: 0 keeps memory + swap at memory.max
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(limits.pids))
        if limits.cpus > 0:
            _write(d / "cpu.max", f"{max(1000, int(limits.cpus * CFS_PERIOD_US))} {CFS_PERIOD_US}")
        _write(d / "cgroup.subtree_control", "+memory +pids +cpu")

    # -- after (or during) the run --------------------------------------------------------------------

    def oom_kills(self) -> int:
        """OOM events in the sandbox so far (v2: kills, hierarchical; v1: OOMs of our memcg, each of
        which the kernel ends with a kill). Read it before ``remove``."""
        if self._tree.v2:
            return read_key(self.memory_dir / "memory.events", "oom_kill") or 0
        if self._oom_fd >= 0 and self.memory_dir.exists():
            with contextlib.suppress(BlockingIOError):
                self._ooms += os.eventfd_read(self._oom_fd)
        kills = read_key(self.memory_dir / "memory.oom_control", "oom_kill") or 0
        return max(self._ooms, kills)

    def sample(self) -> Usage:
        """Peak memory and CPU time so far (kept in our parents after runc's child is gone)."""
        if self._tree.v2:
            peak = read_int(self.memory_dir / "memory.peak")
            if peak is None:
                peak = read_int(self.memory_dir / "memory.current")
            usec = read_key(self.cpu_dir / "cpu.stat", "usage_usec")
            cpu = None if usec is None else usec * 1000
        else:
            peak = read_int(self.memory_dir / "memory.max_usage_in_bytes")
            cpu = read_int(self.cpuacct_dir / "cpuacct.usage")
        self._peak = max(self._peak, peak or 0)
        self._cpu_ns = max(self._cpu_ns, cpu or 0)
        return Usage(peak_memory_bytes=self._peak, cpu_time_ns=self._cpu_ns)

    @property
    def last_usage(self) -> Usage:
        return Usage(peak_memory_bytes=self._peak, cpu_time_ns=self._cpu_ns)

    def pids(self) -> set[int]:
        """Every process in this sandbox's cgroups (any hierarchy, any depth)."""
        found: set[int] = set()
        for top in self.dirs():
            for dirpath, _dirs, _files in os.walk(top):
                with contextlib.suppress(OSError, ValueError):
                    found.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
        return found

    def kill_all(self) -> int:
        """SIGKILL every process in the sandbox's cgroups (the fallback when runc cannot kill its init).

        Each through a pidfd, after checking that the process it pins is still in this sandbox's cgroup: a
        pid read from cgroup.procs may exit and be reused by any host process before the signal (pid_max
        is 32768 on small hosts), and the supervisor, as root, could otherwise kill that one.
        """
        found = self.pids()
        for pid in found:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:
                    mine = f"/{self._rel.name}/"  # the sandbox's directory, or one of runc's below it
                    if any(mine in line + "/" for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)
        return len(found)

    def remove(self) -> bool:
        """Remove every directory of this sandbox, deepest first; False if a non-empty one remains."""
        self._close_oom_fd()
        ok = True
        for top in self.dirs():
            if not top.exists():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    ok = False
        return ok


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
