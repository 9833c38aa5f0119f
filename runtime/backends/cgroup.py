"""A container's resource usage, read from the host's cgroup files (v1 or v2, cgroupfs or systemd driver).

The engine reports no usage for a container once it is gone, and a short tool is gone quickly, so
usage is sampled while the sandbox runs: ``UsageSampler`` is one background thread reading every live
sandbox's ``CgroupProbe`` each interval, and the backend takes a last reading when it learns of the end.
The cgroup disappears with the container's last process, so the last sample is the best-known value
(and a tool that exits within one interval may be undercounted). Engine-neutral: no docker import.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from toolcell.model import Usage

__all__ = ["CgroupLayout", "CgroupProbe", "StatsProbe", "UsageProbe", "UsageSampler"]


# Where a containerised supervisor finds the host's cgroup files (mounted read-only by the deploy files):
# inside a container /sys/fs/cgroup is the container's own (a private cgroup namespace).
HOST_CGROUP_ROOTS = ("/host/sys/fs/cgroup", "/sys/fs/cgroup")


class CgroupLayout:
    """Where a container's cgroup files live on this host (cgroup v1 or v2, cgroupfs or systemd)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.v2 = (root / "cgroup.controllers").exists()

    @classmethod
    def find(cls, configured: str = "") -> CgroupLayout | None:
        """The configured root, else the first of ``HOST_CGROUP_ROOTS`` that shows the engine's containers;
        None: no cgroup files of the engine's containers are visible (usage must come from the engine)."""
        for root in ([configured] if configured else HOST_CGROUP_ROOTS):
            layout = cls(Path(root))
            if layout.shows_containers():
                return layout
        return None

    def shows_containers(self) -> bool:
        """Whether the engine's container cgroups are under this root (not a container's own view)."""
        if self.v2:
            parents = [self.root / "system.slice", self.root / "docker"]
        else:
            parents = [self.root / "memory" / "docker", self.root / "memory" / "system.slice"]
        return any(p.is_dir() for p in parents)

    def memory_candidates(self, cid: str) -> list[tuple[Path, bool]]:
        """(file, is_peak): a peak file, or a current-usage file whose maximum we track."""
        if self.v2:
            dirs = self._v2_dirs(cid)
            return [(d / "memory.peak", True) for d in dirs] + [(d / "memory.current", False) for d in dirs]
        return [(d / "memory.max_usage_in_bytes", True) for d in self._v1_dirs("memory", cid)]

    def oom_candidates(self, cid: str) -> list[Path]:
        if self.v2:
            return [d / "memory.events" for d in self._v2_dirs(cid)]
        return [d / "memory.oom_control" for d in self._v1_dirs("memory", cid)]

    def cpu_candidates(self, cid: str) -> list[Path]:
        if self.v2:
            return [d / "cpu.stat" for d in self._v2_dirs(cid)]
        return [d / "cpuacct.usage" for d in self._v1_dirs("cpuacct", cid)]

    def _v2_dirs(self, cid: str) -> list[Path]:
        return [self.root / "system.slice" / f"docker-{cid}.scope", self.root / "docker" / cid]

    def _v1_dirs(self, controller: str, cid: str) -> list[Path]:
        base = self.root / controller
        return [base / "docker" / cid, base / "system.slice" / f"docker-{cid}.scope"]


class CgroupProbe:
    """Peak memory and CPU time of one container, from the host's cgroup files."""

    def __init__(self, layout: CgroupLayout, cid: str) -> None:
        self._layout = layout
        self._cid = cid
        self._lock = threading.Lock()
        self._memory: tuple[Path, bool] | None = None
        self._cpu: Path | None = None
        self._peak_memory = 0
        self._cpu_ns = 0
        self._oom_kills = 0
        # cgroup v1: an eventfd the kernel signals at each OOM of the container's memcg (and once when the
        # cgroup goes), so the sampler reads the kill count at the moment of the OOM, not up to an interval
        # later when a killed container's cgroup may be gone already. -1: none.
        self.oom_fd = -1

    def watch_oom(self) -> None:
        """Register for the container's OOM events (v1; call once its cgroup exists, i.e. after start)."""
        if self._layout.v2 or self.oom_fd >= 0:
            return
        for control in self._layout.oom_candidates(self._cid):
            try:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            except OSError:
                return
            try:
                target = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    with open(control.parent / "cgroup.event_control", "w") as f:
                        f.write(f"{fd} {target}")
                finally:
                    os.close(target)
            except OSError:
                os.close(fd)
                continue
            self.oom_fd = fd
            return

    def on_oom_event(self) -> None:
        """The eventfd fired: an OOM of the memcg, or its removal. While the cgroup exists it is an OOM (the
        kernel signals at the OOM, before its kill is counted in ``oom_kill``): counted at once, like the oci
        backend does; once the cgroup is gone it is (or may be) the removal: left to what samples saw."""
        events = 0
        if self.oom_fd >= 0:
            with contextlib.suppress(OSError):
                events = os.eventfd_read(self.oom_fd)
        alive = any(path.exists() for path in self._layout.oom_candidates(self._cid))
        if events and alive:
            with self._lock:
                self._oom_kills = max(self._oom_kills, 1)
        self.sample()

    def close_oom(self) -> None:
        fd, self.oom_fd = self.oom_fd, -1
        if fd >= 0:
            os.close(fd)

    def sample(self) -> None:
        memory = self._read_memory()
        cpu = self._read_cpu()
        ooms = self.oom_kills()
        with self._lock:
            self._peak_memory = max(self._peak_memory, memory)
            self._cpu_ns = max(self._cpu_ns, cpu)
            self._oom_kills = max(self._oom_kills, ooms)

    @property
    def seen_oom_kills(self) -> int:
        """The most OOM kills any sample saw: the kernel's own count, kept after the cgroup is gone."""
        with self._lock:
            return self._oom_kills

    def oom_kills(self) -> int:
        """OOM kills in the sandbox's memory cgroup so far (0 when the cgroup is gone or can't tell)."""
        for path in self._layout.oom_candidates(self._cid):
            value = read_key(path, "oom_kill")
            if value is not None:
                return value
        return 0

    def usage(self) -> Usage:
        with self._lock:
            return Usage(peak_memory_bytes=self._peak_memory, cpu_time_ns=self._cpu_ns)

    def _read_memory(self) -> int:
        candidates = [self._memory] if self._memory else self._layout.memory_candidates(self._cid)
        for path, is_peak in candidates:
            value = read_int(path)
            if value is not None:
                self._memory = (path, is_peak)
                return value
        return 0

    def _read_cpu(self) -> int:
        candidates = [self._cpu] if self._cpu else self._layout.cpu_candidates(self._cid)
        for path in candidates:
            if path.name == "cpu.stat":
                value = _read_usage_usec(path)
                value = None if value is None else value * 1000
            else:
                value = read_int(path)
            if value is not None:
                self._cpu = path
                return value
        return 0


class StatsProbe:
    """Peak memory and CPU time of one container from the engine's stats, when its cgroup files are not
    visible (a containerised supervisor without the host's cgroup filesystem). ``read`` fetches one
    one-shot stats document; samples are at most every ``min_interval_s`` (each is an engine request), so
    a short tool may be undercounted. OOM kills are left to the engine's own flag."""

    def __init__(self, read: Callable[[], Mapping[str, Any]], min_interval_s: float = 0.5) -> None:
        self._read = read
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        # -inf, not 0: the monotonic clock starts near the host's boot, so on a host up for less than
        # ``min_interval_s`` a 0 here would skip the first sample (and a short tool would read as zero).
        self._last = float("-inf")
        self._peak_memory = 0
        self._cpu_ns = 0
        self.oom_fd = -1  # no OOM events from the engine's stats

    def watch_oom(self) -> None:
        return None

    def on_oom_event(self) -> None:
        return None

    def close_oom(self) -> None:
        return None

    def sample(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._min_interval_s:
                return
            self._last = now
        try:
            stats = self._read()
        except Exception:  # nosec B110 - gone, or the engine is busy: the next sample tells
            return
        memory = stats.get("memory_stats") or {}
        cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
        peak = max(_int(memory.get("max_usage")), _int(memory.get("usage")))
        with self._lock:
            self._peak_memory = max(self._peak_memory, peak)
            self._cpu_ns = max(self._cpu_ns, _int(cpu.get("total_usage")))

    @property
    def seen_oom_kills(self) -> int:
        return 0

    def oom_kills(self) -> int:
        return 0

    def usage(self) -> Usage:
        with self._lock:
            return Usage(peak_memory_bytes=self._peak_memory, cpu_time_ns=self._cpu_ns)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class UsageProbe(Protocol):
    oom_fd: int

    def sample(self) -> None: ...

    def watch_oom(self) -> None: ...

    def on_oom_event(self) -> None: ...

    def close_oom(self) -> None: ...

    @property
    def seen_oom_kills(self) -> int: ...

    def oom_kills(self) -> int: ...

    def usage(self) -> Usage: ...


class UsageSampler:
    """One background thread sampling every live container's cgroup every ``interval_s``, and at once when a
    container's OOM eventfd fires (``CgroupProbe.watch_oom``)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._probes: set[UsageProbe] = set()
        self._by_fd: dict[int, UsageProbe] = {}
        self._epoll = select.epoll()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, probe: UsageProbe) -> None:
        with self._cond:
            if self._stopped:
                return
            self._probes.add(probe)
            if probe.oom_fd >= 0 and probe.oom_fd not in self._by_fd:
                with contextlib.suppress(OSError):
                    self._epoll.register(probe.oom_fd, select.EPOLLIN)
                    self._by_fd[probe.oom_fd] = probe
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="toolcell-usage", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, probe: UsageProbe) -> None:
        with self._cond:
            self._probes.discard(probe)
            self._forget(probe)

    def _forget(self, probe: UsageProbe) -> None:
        for fd in [fd for fd, p in self._by_fd.items() if p is probe]:
            del self._by_fd[fd]
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            for probe in list(self._probes):
                self._forget(probe)
            self._probes.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._probes and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    self._epoll.close()
                    return
                probes = list(self._probes)
            for probe in probes:
                probe.sample()
            try:
                events = self._epoll.poll(self._interval_s)
            except (InterruptedError, ValueError, OSError):
                events = []
            for fd, _ in events:
                with self._cond:
                    fired = self._by_fd.get(fd)
                if fired is not None:
                    fired.on_oom_event()


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_key(path: Path, key: str) -> int | None:
    """``key``'s value in a flat-keyed cgroup file (``name value`` per line)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _read_usage_usec(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except (OSError, ValueError):
        return None
    return None
