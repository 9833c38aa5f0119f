"""Profile -> plan compilation: the plan carries the hardening, the caller can't change it."""

import pytest

from runtime.model import Tool
from runtime.policy.network import parse_grant
from runtime.policy.plan import LABEL_MANAGED, LABEL_OWNER, compile_plan
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
    assert p.ipc_mode == "private" and p.cgroupns_mode == "private"
    assert p.tmpfs["/tmp"].startswith("rw,noexec,nosuid,nodev,size=")
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
