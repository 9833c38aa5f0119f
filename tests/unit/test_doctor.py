"""toolcell doctor's rules, as plain calls on engine info and host facts."""

from __future__ import annotations

from runtime.doctor import HostFacts, Level, evaluate

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
