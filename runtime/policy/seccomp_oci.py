"""toolcell's seccomp profile (Docker/moby JSON) translated into an OCI runtime spec's ``linux.seccomp`` object.

Docker evaluates a profile's conditions itself before handing runc the result; an OCI runtime driven
directly gets the result only, so this module does what the engine would do, for this host:

- ``archMap`` (or ``architectures``) becomes ``architectures``: the native architecture and its
  sub-architectures (a 32-bit syscall table left out would be a way around every rule: it would fall to
  ``defaultAction`` instead, so it is listed and filtered like the native one);
- a rule whose ``includes.arches`` does not name this host, or whose ``excludes.arches`` does, is dropped;
- a rule that ``includes`` capabilities is dropped (toolcell's sandboxes hold none), one that
  ``excludes`` capabilities is kept (no capability excludes it);
- a rule that ``includes`` a ``minKernel`` newer than the running kernel is dropped (as the engine does;
  toolcell's own loader refuses such rules, this translation also serves Docker's stock profile);
- ``names``, ``action``, ``errnoRet`` and ``args`` are kept as written; comments are dropped.

Anything not understood is refused (``ConfigError``) rather than skipped: an ignored key would be a
rule silently weaker than the one the admin wrote. Pure: JSON in, dict out, no I/O.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

from toolcell.errors import ConfigError

__all__ = ["native_arch", "to_oci_seccomp"]

# Machine (``uname -m``) -> (SCMP_ARCH_* name, Docker's ``includes.arches`` name).
_MACHINES: Final[Mapping[str, tuple[str, str]]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "amd64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "arm64": ("SCMP_ARCH_AARCH64", "arm64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
}
_ARCH_NAMES: Final = frozenset({
    "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64",
})
_ACTIONS: Final = frozenset({
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG",
})
_OPS: Final = frozenset({
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
})
_TOP_KEYS: Final = frozenset({"defaultAction", "defaultErrnoRet", "archMap", "architectures", "syscalls"})
_RULE_KEYS: Final = frozenset({"names", "action", "errnoRet", "args", "comment", "includes", "excludes"})
_FILTER_KEYS: Final = frozenset({"arches", "caps", "minKernel"})
_KERNEL: Final = re.compile(r"([0-9]+)\.([0-9]+)")
_ARG_KEYS: Final = frozenset({"index", "value", "valueTwo", "op"})
_U64: Final = 2**64


def native_arch(machine: str | None = None) -> tuple[str, str]:
    """(SCMP_ARCH_* name, Docker arch name) of ``machine`` (default: this host's ``uname -m``)."""
    m = machine or platform.machine()
    try:
        return _MACHINES[m]
    except KeyError:
        raise ConfigError(f"seccomp: unsupported machine architecture {m!r}") from None


def to_oci_seccomp(profile: str | Mapping[str, Any], *, machine: str | None = None,
                   kernel: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for ``profile`` (JSON text or parsed) on ``machine`` (default: this
    host's ``uname -m``) running ``kernel`` (default: this host's ``uname -r``; for ``minKernel``)."""
    if isinstance(profile, str):
        if not profile.strip():
            raise ConfigError("seccomp: the profile is empty; refusing to run without one")
        try:
            doc = json.loads(profile)
        except ValueError as exc:
            raise ConfigError(f"seccomp: the profile is not JSON: {exc}") from exc
    else:
        doc = profile
    if not isinstance(doc, Mapping):
        raise ConfigError("seccomp: the profile must be a JSON object")
    _no_unknown(doc, _TOP_KEYS, "seccomp")
    native, docker_arch = native_arch(machine)
    running = _kernel_version(kernel or platform.release(), "the running kernel")
    default_action = _action(doc.get("defaultAction"), "seccomp.defaultAction")
    out: dict[str, Any] = {"defaultAction": default_action, "architectures": _arches(doc, native)}
    if "defaultErrnoRet" in doc:
        out["defaultErrnoRet"] = _errno(doc["defaultErrnoRet"], "seccomp.defaultErrnoRet")
    raw_rules = doc.get("syscalls", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("seccomp.syscalls: must be a list")
    rules = []
    for i, raw in enumerate(raw_rules):
        rule = _rule(raw, f"seccomp.syscalls[{i}]", docker_arch, running)
        if rule is not None:
            rules.append(rule)
    out["syscalls"] = rules
    return out


def _arches(doc: Mapping[str, Any], native: str) -> list[str]:
    if "archMap" in doc and "architectures" in doc:
        raise ConfigError("seccomp.archMap: use either archMap or architectures, not both")
    arches = [native]
    if "architectures" in doc:
        names = doc["architectures"]
        if not isinstance(names, list):
            raise ConfigError("seccomp.architectures: must be a list of SCMP_ARCH_* names")
        arches.extend(_arch(a, "seccomp.architectures") for a in names)
    amap = doc.get("archMap")
    if amap is not None:
        if not isinstance(amap, list):
            raise ConfigError("seccomp.archMap: must be a list")
        for i, entry in enumerate(amap):
            where = f"seccomp.archMap[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: must be an object")
            _no_unknown(entry, frozenset({"architecture", "subArchitectures"}), where)
            main = _arch(entry.get("architecture"), where)
            subs = entry.get("subArchitectures") or []
            if not isinstance(subs, list):
                raise ConfigError(f"{where}.subArchitectures: must be a list")
            sub_names = [_arch(s, f"{where}.subArchitectures") for s in subs]
            if main == native:
                arches.extend(sub_names)
    return list(dict.fromkeys(arches))


def _rule(raw: object, where: str, docker_arch: str, running: tuple[int, int]) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be an object")
    if "name" in raw:
        raise ConfigError(f"{where}.name: use 'names' (a list)")
    _no_unknown(raw, _RULE_KEYS, where)
    names = raw.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}.names: must be a non-empty list of syscall names")
    rule: dict[str, Any] = {"names": list(names), "action": _action(raw.get("action"), f"{where}.action")}
    if "errnoRet" in raw:
        rule["errnoRet"] = _errno(raw["errnoRet"], f"{where}.errnoRet")
    if "args" in raw:
        rule["args"] = _args(raw["args"], f"{where}.args")
    includes = _conditions(raw.get("includes"), f"{where}.includes")
    excludes = _conditions(raw.get("excludes"), f"{where}.excludes")
    if "minKernel" in excludes:
        raise ConfigError(f"{where}.excludes.minKernel: not a condition the engine knows")
    if "minKernel" in includes and running < _kernel_version(includes["minKernel"], f"{where}.includes.minKernel"):
        return None  # as the engine decides it: for an older kernel than the rule needs, no rule
    if "arches" in includes and docker_arch not in includes["arches"]:
        return None
    if docker_arch in excludes.get("arches", ()):
        return None
    if includes.get("caps"):
        return None  # the sandbox holds no capability: a rule that needs one never applies
    return rule


def _args(raw: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: must be a list")
    out = []
    for j, a in enumerate(raw):
        w = f"{where}[{j}]"
        if not isinstance(a, Mapping):
            raise ConfigError(f"{w}: must be an object")
        _no_unknown(a, _ARG_KEYS, w)
        index, value, two, op = a.get("index"), a.get("value", 0), a.get("valueTwo", 0), a.get("op")
        if not _is_int(index) or not 0 <= index <= 5:
            raise ConfigError(f"{w}.index: must be 0..5, got {index!r}")
        if not (_is_int(value) and 0 <= value < _U64 and _is_int(two) and 0 <= two < _U64):
            raise ConfigError(f"{w}: value and valueTwo must be unsigned 64-bit integers")
        if op not in _OPS:
            raise ConfigError(f"{w}.op: must be one of {', '.join(sorted(_OPS))}, got {op!r}")
        out.append({"index": index, "value": value, "valueTwo": two, "op": op})
    return out


def _conditions(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be an object")
    _no_unknown(raw, _FILTER_KEYS, where)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "minKernel":
            if not isinstance(value, str):
                raise ConfigError(f"{where}.minKernel: must be a kernel version such as \"4.8\"")
        elif not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}.{key}: must be a list of strings")
        out[str(key)] = value
    return out


def _kernel_version(text: str, where: str) -> tuple[int, int]:
    m = _KERNEL.match(text)
    if m is None:
        raise ConfigError(f"{where}: not a kernel version: {text[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def _action(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in _ACTIONS:
        raise ConfigError(f"{where}: must be one of {', '.join(sorted(_ACTIONS))}, got {value!r}")
    return value


def _errno(value: object, where: str) -> int:
    if not _is_int(value) or not 0 < value < 4096:
        raise ConfigError(f"{where}: must be an errno number 1..4095, got {value!r}")
    return value


def _arch(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in _ARCH_NAMES:
        raise ConfigError(f"{where}: unknown architecture {value!r}")
    return value


def _no_unknown(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (refused rather than ignored)")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
