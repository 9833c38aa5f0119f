"""toolcell.policy.seccomp: loading, validation and compilation of seccomp profiles (no engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from toolcell.errors import ConfigError
from toolcell.policy.seccomp import (
    DENIED_BY_DEFAULT,
    check_denies,
    clear_cache,
    load_seccomp,
    parse_seccomp,
    unconditionally_allowed,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def default_doc() -> dict[str, Any]:
    return json.loads(load_seccomp("default").json_text)


def write(tmp_path: Path, doc: Any, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_default_loads_and_compiles() -> None:
    profile = load_seccomp("default")
    assert profile.name == "default"
    assert profile.default_action == "SCMP_ACT_ERRNO" and profile.default_errno == 1
    assert profile.arches[0] == "SCMP_ARCH_X86_64"
    assert len(profile.bpf) > 0 and len(profile.bpf) % 8 == 0  # struct sock_filter is 8 bytes
    assert {"read", "write", "execve", "futex", "clone", "socket"} <= profile.allowed
    assert profile.security_opt == "seccomp=" + profile.json_text


def test_default_is_cached() -> None:
    assert load_seccomp("default") is load_seccomp("default")


@pytest.mark.parametrize("name", sorted(DENIED_BY_DEFAULT | {"umount", "clone3", "kcmp", "pidfd_getfd"}))
def test_default_never_allows(name: str) -> None:
    assert name not in load_seccomp("default").allowed


def test_default_passes_its_own_check() -> None:
    check_denies(load_seccomp("default"))


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("socket", {1, 2, 10, 16}),  # AF_VSOCK (40) and AF_ALG (38) fall to EPERM
        ("personality", {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}),
    ],
)
def test_conditional_allows_are_equality_allowlists(name: str, values: set[int]) -> None:
    profile = load_seccomp("default")
    rules = [r for r in profile.rules if name in r.names]
    assert all(r.action == "SCMP_ACT_ALLOW" and len(r.args) == 1 for r in rules)
    assert {(r.args[0].index, r.args[0].op) for r in rules} == {(0, "SCMP_CMP_EQ")}
    assert {r.args[0].value for r in rules} == values
    assert not unconditionally_allowed(profile, [name])


def test_clone_without_namespace_flags_and_clone3_enosys() -> None:
    profile = load_seccomp("default")
    (clone,) = [r for r in profile.rules if "clone" in r.names]
    assert clone.args[0].op == "SCMP_CMP_MASKED_EQ" and clone.args[0].value == 0x7E020000
    (clone3,) = [r for r in profile.rules if "clone3" in r.names]
    assert (clone3.action, clone3.errno) == ("SCMP_ACT_ERRNO", 38)


def test_packaged_file_matches_generator() -> None:
    gen = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_seccomp.py"), "--check"], capture_output=True, text=True
    )
    assert gen.returncode == 0, gen.stderr


def test_custom_stricter_profile_loads(tmp_path: Path) -> None:
    doc = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []}],
        "syscalls": [
            {"names": ["read", "write", "exit_group", "execve", "brk", "mmap"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm"]}},
        ],
    }
    path = write(tmp_path, doc)
    profile = load_seccomp(path.name, base_dir=tmp_path)
    assert profile.allowed == {"read", "write", "exit_group", "execve", "brk", "mmap"}
    assert profile.source == str(path)
    check_denies(profile)
    assert len(profile.bpf) > 0


def test_cache_follows_mtime(tmp_path: Path) -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    path = write(tmp_path, doc)
    first = load_seccomp(str(path))
    assert load_seccomp(str(path)) is first
    doc["syscalls"][0]["names"] = ["read", "write"]
    write(tmp_path, doc)
    os.utime(path, ns=(1, 1))
    assert load_seccomp(str(path)).allowed == {"read", "write"}


def test_typo_names_profile_and_syscall(tmp_path: Path) -> None:
    doc = default_doc()
    doc["syscalls"][0]["names"].append("opne")
    path = write(tmp_path, doc, "typo.json")
    with pytest.raises(ConfigError) as exc:
        load_seccomp(str(path))
    assert "typo.json" in str(exc.value) and "'opne'" in str(exc.value)


def test_other_arch_name_resolves_to_pseudo_number() -> None:
    """Why the checker distinguishes: libseccomp knows chown32, just not on x86_64."""
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "chown32") < -1
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "opne") == -1


BASE: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}


def rule(**kw: Any) -> dict[str, Any]:
    return {"names": ["read"], "action": "SCMP_ACT_ALLOW", **kw}


BAD: list[tuple[str, Any, str]] = [
    ("not json", "{", "not valid JSON"),
    ("not an object", "[]", "top level"),
    ("unknown top key", {**BASE, "syscals": []}, "syscals"),
    ("missing defaultAction", {"syscalls": []}, "defaultAction"),
    ("bad action", {**BASE, "defaultAction": "SCMP_ACT_NOTIFY"}, "defaultAction"),
    ("defaultErrnoRet ignored by engine", {**BASE, "defaultErrnoRet": 13}, "defaultErrnoRet"),
    ("syscalls not a list", {**BASE, "syscalls": {}}, "syscalls"),
    ("legacy name", {**BASE, "syscalls": [{"name": "read", "action": "SCMP_ACT_ALLOW"}]}, "names"),
    ("empty names", {**BASE, "syscalls": [rule(names=[])]}, "names"),
    ("unknown rule key", {**BASE, "syscalls": [rule(comments="x")]}, "comments"),
    ("unknown includes key", {**BASE, "syscalls": [rule(includes={"kernel": ["5.0"]})]}, "kernel"),
    ("minKernel", {**BASE, "syscalls": [rule(includes={"minKernel": "4.8"})]}, "minKernel"),
    ("errnoRet on allow", {**BASE, "syscalls": [rule(errnoRet=1)]}, "errnoRet"),
    ("arg index", {**BASE, "syscalls": [rule(args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}])]}, "index"),
    ("arg op", {**BASE, "syscalls": [rule(args=[{"index": 0, "value": 1, "op": "EQ"}])]}, "op"),
    ("arg value", {**BASE, "syscalls": [rule(args=[{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}])]}, "value"),
    (
        "two comparisons on one argument",
        {
            **BASE,
            "syscalls": [
                rule(
                    args=[
                        {"index": 0, "value": 3, "op": "SCMP_CMP_GT"},
                        {"index": 0, "value": 9, "op": "SCMP_CMP_LT"},
                    ]
                )
            ],
        },
        "compared twice",
    ),
    (
        "unconditional allow overrides conditional deny",
        {
            **BASE,
            "syscalls": [
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_EQ"}],
                },
                {"names": ["socket"], "action": "SCMP_ACT_ALLOW"},
            ],
        },
        "override",
    ),
    ("foreign-arch name unconditioned", {**BASE, "syscalls": [rule(names=["chown32"])]}, "includes.arches"),
    ("unknown arch", {**BASE, "archMap": [{"architecture": "SCMP_ARCH_Z80"}]}, "SCMP_ARCH_Z80"),
]


@pytest.mark.parametrize(("case", "doc", "needle"), BAD, ids=[b[0] for b in BAD])
def test_malformed_profile_is_config_error(tmp_path: Path, case: str, doc: Any, needle: str) -> None:
    path = write(tmp_path, doc, "bad.json")
    with pytest.raises(ConfigError) as exc:
        load_seccomp(str(path))
    assert needle in str(exc.value) and "bad.json" in str(exc.value), str(exc.value)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json"):
        load_seccomp(str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({**BASE, "syscalls": [rule(names=["ptrace", "read"])]}, {"ptrace"}),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}, DENIED_BY_DEFAULT),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": sorted(DENIED_BY_DEFAULT), "action": "SCMP_ACT_ERRNO"}],
            },
            set(),
        ),
    ],
)
def test_unconditionally_allowed(doc: dict[str, Any], expected: set[str]) -> None:
    profile = parse_seccomp(json.dumps(doc), name="t")
    assert unconditionally_allowed(profile, DENIED_BY_DEFAULT) == expected
    if expected:
        with pytest.raises(ConfigError, match="unconditionally"):
            check_denies(profile)
    else:
        check_denies(profile)
