"""toolcell.policy.seccomp_oci: toolcell's (moby-format) seccomp profile -> an OCI ``linux.seccomp`` object."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from toolcell.errors import ConfigError
from toolcell.policy.seccomp_oci import native_arch, to_oci_seccomp

REPO = Path(__file__).resolve().parents[2]
DEFAULT = (REPO / "runtime" / "data" / "seccomp-default.json").read_text()


def profile(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                           "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X32"]},
                                       {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
                           "syscalls": list(rules)}
    doc.update(top)
    return doc


def allow(*names: str, **extra: Any) -> dict[str, Any]:
    return {"names": list(names), "action": "SCMP_ACT_ALLOW", **extra}


def test_the_default_profile_on_x86_64() -> None:
    doc = json.loads(DEFAULT)
    out = to_oci_seccomp(DEFAULT, machine="x86_64")
    assert set(out) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    assert out["defaultAction"] == doc["defaultAction"] == "SCMP_ACT_ERRNO"
    assert out["defaultErrnoRet"] == 1
    assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
    # Every rule that applies on amd64 is there, in order, as written (minus comments and conditions).
    expected = [r for r in doc["syscalls"] if "arm64" not in r.get("includes", {}).get("arches", ["amd64"])]
    assert len(out["syscalls"]) == len(expected) == len(doc["syscalls"]) - 1
    for got, want in zip(out["syscalls"], expected, strict=True):
        assert got["names"] == want["names"]
        assert got["action"] == want["action"]
        assert got.get("errnoRet") == want.get("errnoRet")
        assert got.get("args", []) == [{"valueTwo": 0, **a} for a in want.get("args", [])]
        assert "comment" not in got and "includes" not in got and "excludes" not in got
    names = {n for r in out["syscalls"] for n in r["names"]}
    assert "arch_prctl" in names  # the amd64-only rule
    assert "arm_fadvise64_64" not in names  # the arm64-only rule


def test_the_default_profile_on_aarch64() -> None:
    out = to_oci_seccomp(DEFAULT, machine="aarch64")
    assert out["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    names = {n for r in out["syscalls"] for n in r["names"]}
    assert "arm_fadvise64_64" in names and "arch_prctl" not in names


def test_this_host_is_supported() -> None:
    assert native_arch()[0].startswith("SCMP_ARCH_")
    assert to_oci_seccomp(DEFAULT)["architectures"][0] == native_arch()[0]


@pytest.mark.parametrize(("conditions", "kept"), [
    ({"includes": {"arches": ["amd64"]}}, True),
    ({"includes": {"arches": ["arm64", "amd64"]}}, True),
    ({"includes": {"arches": ["arm64"]}}, False),
    ({"excludes": {"arches": ["amd64"]}}, False),
    ({"excludes": {"arches": ["s390x"]}}, True),
    ({"includes": {"caps": ["CAP_SYS_ADMIN"]}}, False),  # the sandbox holds no capability
    ({"excludes": {"caps": ["CAP_SYS_ADMIN"]}}, True),  # ... so none excludes the rule
    ({"includes": {"caps": []}}, True),
    ({}, True),
])
def test_conditions_are_evaluated_for_this_host(conditions: dict[str, Any], kept: bool) -> None:
    out = to_oci_seccomp(profile(allow("read"), allow("clone3", **conditions)), machine="x86_64")
    assert [r["names"] for r in out["syscalls"]] == ([["read"], ["clone3"]] if kept else [["read"]])


def test_args_errno_and_actions_are_kept() -> None:
    rule = {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "comment": "x",
            "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                     {"index": 1, "value": 255, "valueTwo": 8, "op": "SCMP_CMP_MASKED_EQ"}]}
    out = to_oci_seccomp(profile(rule), machine="x86_64")
    assert out["syscalls"] == [{"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                                "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"},
                                         {"index": 1, "value": 255, "valueTwo": 8, "op": "SCMP_CMP_MASKED_EQ"}]}]


def test_architectures_instead_of_archmap() -> None:
    doc = profile(allow("read"))
    del doc["archMap"]
    doc["architectures"] = ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert to_oci_seccomp(doc, machine="x86_64")["architectures"] == [
        "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]


def test_no_archmap_means_the_native_architecture_only() -> None:
    doc = profile(allow("read"))
    del doc["archMap"]
    assert to_oci_seccomp(doc, machine="x86_64")["architectures"] == ["SCMP_ARCH_X86_64"]


@pytest.mark.parametrize(("doc", "where"), [
    ("", "empty"),
    ("   ", "empty"),
    ("{not json", "not JSON"),
    ("[]", "JSON object"),
    (profile(allow("read"), listenerPath="/x"), "seccomp.listenerPath"),
    (profile(allow("read"), flags=["SECCOMP_FILTER_FLAG_LOG"]), "seccomp.flags"),
    (profile(allow("read"), architectures=["SCMP_ARCH_X86"]), "either archMap or architectures"),
    (profile(allow("read"), defaultAction="SCMP_ACT_MAYBE"), "seccomp.defaultAction"),
    (profile(allow("read"), defaultErrnoRet=0), "seccomp.defaultErrnoRet"),
    (profile(allow("read"), archMap=[{"architecture": "SCMP_ARCH_VAX"}]), "unknown architecture"),
    (profile(allow("read"), archMap=[{"architecture": "SCMP_ARCH_X86_64", "subs": []}]), "archMap[0].subs"),
    (profile({"name": "read", "action": "SCMP_ACT_ALLOW"}), "use 'names'"),
    (profile(allow("read", commment="typo")), "syscalls[0].commment"),
    (profile({"names": [], "action": "SCMP_ACT_ALLOW"}), "non-empty list"),
    (profile({"names": ["read"], "action": "ALLOW"}), "syscalls[0].action"),
    (profile(allow("read", errnoRet="1")), "errnoRet"),
    (profile(allow("read", args=[{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}])), "index: must be 0..5"),
    (profile(allow("read", args=[{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}])), "unsigned 64-bit"),
    (profile(allow("read", args=[{"index": 0, "value": 0, "op": "SCMP_CMP_EQ", "x": 1}])), "args[0].x"),
    (profile(allow("read", args=[{"index": 0, "value": 0, "op": "EQ"}])), "op: must be one of"),
    (profile(allow("read", includes={"minKernel": 5})), "minKernel: must be a kernel version"),
    (profile(allow("read", includes={"minKernel": "five"})), "not a kernel version"),
    (profile(allow("read", excludes={"minKernel": "5.8"})), "excludes.minKernel"),
    (profile(allow("read", includes={"kernel": ["5"]})), "includes.kernel"),
    (profile(allow("read", excludes={"arches": "amd64"})), "list of strings"),
])
def test_what_is_not_understood_is_refused(doc: Any, where: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(ConfigError, match=re.escape(where)):
        to_oci_seccomp(text, machine="x86_64")


def test_a_refused_rule_is_refused_even_when_it_would_not_apply() -> None:
    # A typo in an arm64-only rule is still a typo: refused on every host, not skipped on this one.
    with pytest.raises(ConfigError, match=re.escape("syscalls[0].typo")):
        to_oci_seccomp(profile(allow("read", includes={"arches": ["arm64"]}, typo=1)), machine="x86_64")


@pytest.mark.parametrize(("kernel", "kept"), [("5.10.0-1-amd64", False), ("5.11.0", True), ("6.18.44-fc", True),
                                               ("4.19", False)])
def test_min_kernel_is_decided_for_the_running_kernel(kernel: str, kept: bool) -> None:
    out = to_oci_seccomp(profile(allow("read"), allow("pidfd_getfd", includes={"minKernel": "5.11"})),
                         machine="x86_64", kernel=kernel)
    assert [r["names"] for r in out["syscalls"]] == ([["read"], ["pidfd_getfd"]] if kept else [["read"]])


MOBY = Path("/work/shared/reference/moby-seccomp-default.json")


@pytest.mark.skipif(not MOBY.is_file(), reason="Docker's stock profile is a reference file of this workspace")
def test_dockers_stock_profile() -> None:
    doc = json.loads(MOBY.read_text())
    out = to_oci_seccomp(doc, machine="x86_64", kernel="6.1.0")
    assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    names = {n for r in out["syscalls"] for n in r["names"]}
    assert "ptrace" in names  # Docker allows it on kernels >= 4.8 (minKernel)
    assert "mount" not in names  # only with CAP_SYS_ADMIN (includes.caps)
    assert "arch_prctl" in names and "s390_pci_mmio_read" not in names
    assert not any("includes" in r or "excludes" in r or "comment" in r for r in out["syscalls"])


def test_unsupported_machine() -> None:
    with pytest.raises(ConfigError, match="unsupported machine"):
        to_oci_seccomp(DEFAULT, machine="vax")
