"""toolcell doctor's rules, as plain calls on engine info and host facts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from toolcell.doctor import HostFacts, Level, OciFacts, _cgroup_layout, evaluate, evaluate_oci

GOOD_INFO = {"ServerVersion": "20.10", "SecurityOptions": ["name=seccomp,profile=default"], "MemoryLimit": True,
             "PidsLimit": True, "CpuCfsQuota": True, "SwapLimit": True, "CgroupVersion": "1",
             "CgroupDriver": "cgroupfs", "Runtimes": {"runc": {}, "runsc": {}}}
GOOD_FACTS = HostFacts(engine_socket="/var/run/docker.sock", socket_mode=0o660, socket_uid=0,
                       io_uring_disabled=2, unprivileged_userns_clone=0, max_user_namespaces=0)


def levels(info: dict | None = GOOD_INFO, facts: HostFacts = GOOD_FACTS, wanted: set[str] | None = None
           ) -> dict[str, Level]:
    findings = evaluate("unix:///var/run/docker.sock", info, "connection refused", facts, wanted or {"runc"})
    return {f.check: f.level for f in findings}


def test_a_good_host_passes_every_check() -> None:
    assert set(levels().values()) == {Level.OK}


def test_unreachable_engine_fails_and_skips_engine_checks() -> None:
    got = levels(info=None)
    assert got["engine reachable"] is Level.FAIL and "seccomp" not in got


def test_engine_without_seccomp_or_pids_fails() -> None:
    assert levels(info={**GOOD_INFO, "SecurityOptions": ["name=apparmor"]})["seccomp"] is Level.FAIL
    assert levels(info={**GOOD_INFO, "PidsLimit": False})["cgroups"] is Level.FAIL


def test_profile_runtime_missing_fails_and_no_gvisor_warns() -> None:
    no_runsc = {**GOOD_INFO, "Runtimes": {"runc": {}}}
    assert levels(info=no_runsc, wanted={"runc", "runsc"})["runtimes"] is Level.FAIL
    assert levels(info=no_runsc)["runtimes"] is Level.WARN


def test_world_accessible_engine_socket_fails() -> None:
    facts = HostFacts("/var/run/docker.sock", 0o666, 0, 2, 0, 0)
    assert levels(facts=facts)["engine socket permissions"] is Level.FAIL


def test_io_uring_and_userns_sysctls_warn_when_open() -> None:
    facts = HostFacts("/var/run/docker.sock", 0o660, 0, 0, None, 1000)
    got = levels(facts=facts)
    assert got["io_uring sysctl"] is Level.WARN and got["user namespaces sysctl"] is Level.WARN


# -- engine.kind oci: facts from the host, no daemon ------------------------------------------------------

GOOD_OCI = OciFacts(runtime="runc", runtime_path="/usr/sbin/runc", runtime_version="runc version 1.1.5", euid=0,
                    cgroup_mode="hybrid", controllers=frozenset({"memory", "pids", "cpu", "cpuacct"}),
                    v2_controllers=frozenset({"hugetlb"}), swap_accounting=True, init_path="/usr/bin/tini-static",
                    store_dir="/var/lib/toolcell/rootfs", store_images=frozenset({"toolcell/python:bookworm"}),
                    seccomp_filter=True, io_uring_disabled=2, unprivileged_userns_clone=0, max_user_namespaces=0)


@pytest.mark.parametrize(("change", "wanted_runtimes", "check", "level"), [
    ({}, {"runc"}, None, Level.OK),
    ({"runtime_path": None}, {"runc"}, "OCI runtime", Level.FAIL),
    # crun refuses a hybrid host with any controller on the unified hierarchy (measured: crun 1.8.1 here)
    ({"runtime": "crun", "runtime_path": "/usr/bin/crun"}, {"runc"}, "OCI runtime", Level.FAIL),
    ({"runtime": "crun", "runtime_path": "/usr/bin/crun", "cgroup_mode": "v2"}, {"runc"}, "OCI runtime", Level.OK),
    ({"euid": 1000}, {"runc"}, "privileges", Level.FAIL),
    ({"controllers": frozenset({"memory", "cpu"})}, {"runc"}, "cgroups", Level.FAIL),
    ({"swap_accounting": False}, {"runc"}, "cgroups", Level.WARN),
    ({"init_path": None}, {"runc"}, "init", Level.FAIL),
    ({"store_images": frozenset()}, {"runc"}, "rootfs store", Level.FAIL),
    ({"seccomp_filter": False}, {"runc"}, "seccomp", Level.FAIL),
    ({}, {"runc", "runsc"}, "runtimes", Level.FAIL),
])
def test_oci_rules(change: dict[str, object], wanted_runtimes: set[str], check: str | None, level: Level) -> None:
    facts = dataclasses.replace(GOOD_OCI, **change)  # type: ignore[arg-type]
    got = {f.check: f.level for f in evaluate_oci(facts, {"toolcell/python:bookworm"}, wanted_runtimes)}
    if check is None:
        assert set(got.values()) == {Level.OK}
    else:
        assert got[check] is level
        assert all(v is Level.OK for k, v in got.items() if k != check), got


def test_oci_cgroup_layout_is_read_from_the_hierarchy(tmp_path: Path) -> None:
    for name in ("memory", "pids", "cpu", "cpuacct"):
        (tmp_path / name).mkdir()
    (tmp_path / "memory" / "memory.memsw.limit_in_bytes").write_text("max\n")
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    assert _cgroup_layout(tmp_path) == ("hybrid", frozenset({"memory", "pids", "cpu", "cpuacct"}),
                                        frozenset({"hugetlb"}), True)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    assert _cgroup_layout(v2)[:3] == ("v2", frozenset({"cpu", "memory", "pids"}), frozenset({"cpu", "memory", "pids"}))
