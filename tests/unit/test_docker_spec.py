"""Profile -> plan compilation: the plan carries the hardening, the caller can't change it."""

import pytest

from runtime.model import Tool
from runtime.policy.network import parse_grant
from runtime.policy.plan import (
    GVISOR_PIDS_BASE,
    GVISOR_PIDS_PER_TASK,
    LABEL_MANAGED,
    LABEL_OWNER,
    compile_plan,
    sandbox_pids,
)
from runtime.policy.profile import IsolationProfile, Mount

TOOL = Tool(name="t", description="d", image="img", command=("python3", "/x.py"))


DEFAULT = IsolationProfile()


def plan(profile: IsolationProfile = DEFAULT, **kw: object):  # type: ignore[no-untyped-def]
    args = {"invocation_id": "inv_1", "owner": "o", "seccomp_json": "{}", "environ": {"SECRET": "s", "TZ": "UTC"}}
    args.update(kw)
    return compile_plan(TOOL, profile, **args)  # type: ignore[arg-type]


def test_default_plan_is_hardened() -> None:
    p = plan()
    assert p.network_mode == "none"
    assert p.read_only_rootfs and p.no_new_privileges and p.init
    assert p.cap_drop == ("ALL",)
    assert p.log_driver == "none"
    assert p.user == "10001:10001"
    assert p.ipc_mode == "none" and p.cgroupns_mode == "private"
    assert p.tmpfs["/tmp"].startswith("rw,noexec,nosuid,nodev,size=")
    assert "/dev/shm" not in p.tmpfs  # no POSIX shm unless the profile asks
    assert p.tmpfs["/dev/mqueue"].startswith("ro,")  # the engine's writable mqueue mount is covered
    assert p.memory_bytes == 256 * 1024 * 1024
    assert p.labels[LABEL_MANAGED] == "true" and p.labels[LABEL_OWNER] == "o"


@pytest.mark.parametrize(
    ("profile", "environ_keys"),
    [
        (IsolationProfile(), {"LANG", "HOME"}),  # nothing of the supervisor's env leaks by default
        (IsolationProfile(env_passthrough=("TZ",)), {"LANG", "HOME", "TZ"}),
        (IsolationProfile(env_passthrough=("MISSING",)), {"LANG", "HOME"}),
    ],
)
def test_env_is_an_allowlist(profile: IsolationProfile, environ_keys: set[str]) -> None:
    assert set(plan(profile).env) == environ_keys


@pytest.mark.parametrize(
    ("profile_timeout", "caller_timeout", "expected"),
    [(30.0, None, 30.0), (30.0, 5.0, 5.0), (2.0, 5.0, 2.0)],
)
def test_caller_deadline_only_shortens(profile_timeout: float, caller_timeout: float | None, expected: float) -> None:
    assert plan(IsolationProfile().with_timeout(profile_timeout), timeout_s=caller_timeout).timeout_s == expected


def test_builders_return_new_values() -> None:
    base = IsolationProfile()
    derived = base.with_memory(64 * 1024 * 1024).with_pids_limit(8).with_mounts(Mount("/src", "/opt/tool"))
    assert base.memory_bytes == 256 * 1024 * 1024 and base.mounts == ()
    p = plan(derived)
    assert (p.memory_bytes, p.pids_limit, p.mounts) == (64 * 1024 * 1024, 8, (Mount("/src", "/opt/tool"),))


def test_a_granted_profile_still_compiles_without_network() -> None:
    """The plan alone never opens a network: only the egress session joins it to its internal one."""
    p = plan(IsolationProfile().with_network(parse_grant("allowed.test")))
    assert (p.network_mode, p.network_ip, p.extra_networks) == ("none", "", ())
    assert not any(k.lower().endswith("_proxy") for k in p.env)


@pytest.mark.parametrize(
    ("shm_bytes", "expected"),
    [
        (0, None),  # the default: no /dev/shm at all
        (16 * 1024 * 1024, "rw,noexec,nosuid,nodev,size=16777216,mode=1777"),
        (1, "rw,noexec,nosuid,nodev,size=1,mode=1777"),
    ],
)
def test_shm_only_when_asked_and_then_sized_noexec_nosuid_nodev(shm_bytes: int, expected: str | None) -> None:
    p = plan(IsolationProfile().with_shm(shm_bytes))
    assert p.tmpfs.get("/dev/shm") == expected
    assert p.ipc_mode == "none"  # the engine's own 64 MiB /dev/shm is never mounted
    writable = sorted(path for path, options in p.tmpfs.items() if options.startswith("rw"))
    assert writable == sorted(["/tmp"] + (["/dev/shm"] if expected else []))


@pytest.mark.parametrize(
    ("runtime", "pids", "cgroup", "nproc"),
    [
        ("runc", 64, 64, 0),  # the pids cgroup counts exactly the sandbox's tasks; no host-wide RLIMIT_NPROC
        ("runc", 1, 1, 0),
        ("runsc", 64, GVISOR_PIDS_BASE + GVISOR_PIDS_PER_TASK * 64, 64),  # gVisor enforces the tool's limit
        ("runsc", 1, GVISOR_PIDS_BASE + GVISOR_PIDS_PER_TASK, 1),
        ("runsc", 32768, GVISOR_PIDS_BASE + GVISOR_PIDS_PER_TASK * 32768, 32768),
    ],
)
def test_pids_mean_the_tools_own_tasks_on_both_runtimes(runtime: str, pids: int, cgroup: int, nproc: int) -> None:
    assert sandbox_pids(runtime, pids) == (cgroup, nproc)
    p = plan(IsolationProfile().with_runtime(runtime).with_pids_limit(pids))
    assert (p.pids_limit, p.nproc) == (cgroup, nproc)


def test_the_sentry_backstop_covers_the_measured_overhead() -> None:
    """Measured here: a fork bomb at RLIMIT_NPROC 16/64/128 peaked at 128/454/880 host pids."""
    for tasks, peak in ((16, 128), (64, 454), (128, 880)):
        assert sandbox_pids("runsc", tasks)[0] >= peak * 1.2
