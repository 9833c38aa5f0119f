"""Profile -> spec -> the Docker backend's terms: the hardening is fixed, the caller can't change it.

``compile_spec`` (pure) and the Docker backend's translation of it (``_tmpfs``, labels, the pids
pair), checked without an engine; the engine's own view is in tests/integration/test_backend_contract.py.
"""

from typing import Any

import pytest

from toolcell.backends.docker import _tmpfs
from toolcell.backends.docker_egress import LABEL_MANAGED, LABEL_OWNER, LABEL_ROLE, identity_labels
from toolcell.model import SecretGrant, Tool
from toolcell.policy.network import parse_grant
from toolcell.policy.profile import IsolationProfile, Mount
from toolcell.policy.spec import (
    GVISOR_PIDS_BASE,
    GVISOR_PIDS_PER_TASK,
    POOL_PREFIX,
    SandboxSpec,
    compile_spec,
    pooled,
    sandbox_pids,
)

TOOL = Tool(name="t", description="d", image="img", command=("python3", "/x.py"))
DEFAULT = IsolationProfile()


def spec(profile: IsolationProfile = DEFAULT, tool: Tool = TOOL, **kw: Any) -> SandboxSpec:
    args: dict[str, Any] = {"invocation_id": "inv_1", "owner": "o", "seccomp_json": "{}",
                            "environ": {"SECRET": "s", "TZ": "UTC"}}
    args.update(kw)
    return compile_spec(tool, profile, **args)


def test_default_spec_translates_to_the_hardened_container() -> None:
    s = spec()
    assert s.egress == () and not s.defer  # no network at all, nothing deferred
    assert s.user == "10001:10001" and s.memory_bytes == 256 * 1024 * 1024
    tmpfs = _tmpfs(s)
    assert tmpfs["/tmp"] == f"rw,noexec,nosuid,nodev,size={DEFAULT.tmpfs_bytes},mode=1777"
    assert "/dev/shm" not in tmpfs  # no POSIX shm unless the profile asks
    assert tmpfs["/dev/mqueue"].startswith("ro,")  # the engine's writable mqueue mount is covered
    labels = identity_labels(s.identity)
    assert labels[LABEL_MANAGED] == "true" and labels[LABEL_OWNER] == "o" and LABEL_ROLE not in labels
    assert labels["io.toolcell.invocation"] == "inv_1" and labels["io.toolcell.tool"] == "t"


@pytest.mark.parametrize(
    ("profile", "environ_keys"),
    [
        (IsolationProfile(), {"LANG", "HOME"}),  # nothing of the supervisor's env leaks by default
        (IsolationProfile(env_passthrough=("TZ",)), {"LANG", "HOME", "TZ"}),
        (IsolationProfile(env_passthrough=("MISSING",)), {"LANG", "HOME"}),
    ],
)
def test_env_is_an_allowlist(profile: IsolationProfile, environ_keys: set[str]) -> None:
    assert set(spec(profile).env) == environ_keys


@pytest.mark.parametrize(
    ("profile_timeout", "caller_timeout", "expected"),
    [(30.0, None, 30.0), (30.0, 5.0, 5.0), (2.0, 5.0, 2.0)],
)
def test_caller_deadline_only_shortens(profile_timeout: float, caller_timeout: float | None, expected: float) -> None:
    assert spec(IsolationProfile().with_timeout(profile_timeout), timeout_s=caller_timeout).timeout_s == expected


def test_builders_return_new_values() -> None:
    base = IsolationProfile()
    derived = base.with_memory(64 * 1024 * 1024).with_pids_limit(8).with_mounts(Mount("/src", "/opt/tool"))
    assert base.memory_bytes == 256 * 1024 * 1024 and base.mounts == ()
    s = spec(derived)
    assert (s.memory_bytes, s.pids, s.mounts) == (64 * 1024 * 1024, 8, (Mount("/src", "/opt/tool"),))


def test_a_granted_profile_carries_its_grants_and_no_proxy_settings() -> None:
    """The spec names the destinations; the backend makes the network and sets the proxy environment."""
    s = spec(IsolationProfile().with_network(parse_grant("allowed.test")))
    assert s.egress == (parse_grant("allowed.test"),)
    assert not any(k.lower().endswith("_proxy") for k in s.env)


@pytest.mark.parametrize(
    ("shm_bytes", "expected"),
    [
        (0, None),  # the default: no /dev/shm at all
        (16 * 1024 * 1024, "rw,noexec,nosuid,nodev,size=16777216,mode=1777"),
        (1, "rw,noexec,nosuid,nodev,size=1,mode=1777"),
    ],
)
def test_shm_only_when_asked_and_then_sized_noexec_nosuid_nodev(shm_bytes: int, expected: str | None) -> None:
    tmpfs = _tmpfs(spec(IsolationProfile().with_shm(shm_bytes)))
    assert tmpfs.get("/dev/shm") == expected
    writable = sorted(path for path, options in tmpfs.items() if options.startswith("rw"))
    assert writable == sorted(["/tmp"] + (["/dev/shm"] if expected else []))


def test_a_secret_files_directory_is_an_empty_scratch_of_the_users_own() -> None:
    tool = Tool(name="t", description="d", image="img", command=("run",),
                secrets=(SecretGrant("a", file="/run/secrets/a"), SecretGrant("b", env="B")))
    s = spec(tool=tool)
    assert s.defer
    assert _tmpfs(s)["/run/secrets"] == "rw,noexec,nosuid,nodev,size=1048576,mode=700,uid=10001,gid=10001"
    assert s.mounts == ()  # never a host file


def test_a_pooled_spec_names_no_invocation() -> None:
    s = pooled(spec())
    assert s.identity.invocation_id == POOL_PREFIX and not s.identity.serving and s.timeout_s == 0.0


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
    s = spec(IsolationProfile().with_runtime(runtime).with_pids_limit(pids))
    assert (s.isolation, s.pids) == (runtime, pids)


def test_the_sentry_backstop_covers_the_measured_overhead() -> None:
    """Measured here: a fork bomb at RLIMIT_NPROC 16/64/128 peaked at 128/454/880 host pids."""
    for tasks, peak in ((16, 128), (64, 454), (128, 880)):
        assert sandbox_pids("runsc", tasks)[0] >= peak * 1.2
