"""Where a sandbox's peak memory and CPU time come from: the host's cgroup files, or the engine's stats.

A supervisor in a container sees its own /sys/fs/cgroup (a private cgroup namespace), where no sandbox's
cgroup is: usage read 0. Now it uses the host's cgroup filesystem mounted at /host/sys/fs/cgroup, else the
engine's stats (the real-engine check is in tests/integration/test_supervisor_image.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from toolcell.backends.cgroup import CgroupLayout, StatsProbe


def tree(root: Path, *dirs: str) -> Path:
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize(("dirs", "files", "shows"), [
    (["memory/docker"], [], True),                       # v1, cgroupfs driver
    (["memory/system.slice"], [], True),                 # v1, systemd driver
    (["system.slice"], ["cgroup.controllers"], True),    # v2
    (["memory"], [], False),                             # a container's own v1 view
    ([], ["cgroup.controllers"], False),                 # a container's own v2 view (cgroupns)
])
def test_a_root_shows_the_engines_containers_or_not(tmp_path: Path, dirs: list[str], files: list[str],
                                                   shows: bool) -> None:
    tree(tmp_path, *dirs)
    for f in files:
        (tmp_path / f).write_text("memory cpu\n")
    assert CgroupLayout(tmp_path).shows_containers() is shows
    found = CgroupLayout.find(str(tmp_path))
    assert (found is not None) is shows


def test_stats_probe_keeps_the_peak_and_rate_limits_engine_requests() -> None:
    docs: list[dict[str, Any]] = [
        {"memory_stats": {"usage": 10_000_000, "max_usage": 12_000_000},
         "cpu_stats": {"cpu_usage": {"total_usage": 5}}},
        {"memory_stats": {"usage": 3_000_000}, "cpu_stats": {"cpu_usage": {"total_usage": 9}}},
        {"memory_stats": {}, "cpu_stats": {}},  # an exited container: nothing
    ]
    calls: list[int] = []

    def read() -> dict[str, Any]:
        calls.append(1)
        return docs[len(calls) - 1]

    probe = StatsProbe(read, min_interval_s=0.0)
    for _ in docs:
        probe.sample()
    usage = probe.usage()
    assert (usage.peak_memory_bytes, usage.cpu_time_ns) == (12_000_000, 9)
    limited = StatsProbe(read, min_interval_s=3600)
    calls.clear()
    limited.sample()
    limited.sample()
    assert len(calls) == 1


def test_a_failing_engine_request_leaves_the_probe_as_it_was() -> None:
    def read() -> dict[str, Any]:
        raise OSError("gone")

    probe = StatsProbe(read, min_interval_s=0.0)
    probe.sample()
    assert probe.usage().peak_memory_bytes == 0 and probe.oom_kills() == 0
