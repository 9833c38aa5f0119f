"""Seccomp profiles: load, validate and compile with libseccomp before any container uses them.

A profile is Docker's JSON format (``defaultAction``, ``defaultErrnoRet``, ``archMap``, ``syscalls``).
The engine (Docker 20.10 + runc) is forgiving in ways that turn mistakes into holes or silent gaps:
unknown JSON keys are ignored, unknown syscall names are skipped, and several comparisons on one argument
are OR-ed by runc.  So ``load_seccomp`` is strict where the engine is lax:

- only keys the engine understands are accepted (a typo'd key is an error, not an ignored rule);
- every syscall name must be known to libseccomp (``pyseccomp.resolve_syscall`` returns -1 for a typo,
  and a negative pseudo number such as -10004 for ``chown32``, a syscall of another architecture, on
  x86_64); a name an allow rule grants on this host must resolve on the native architecture or a
  sub-architecture from the ``archMap``.  Foreign names belong in a rule whose ``includes.arches`` does
  not match this host (or in a deny, where they are a no-op);
- a rule may compare each argument at most once (runc would OR the comparisons);
- a syscall with an unconditional rule may have no rule with another action (libseccomp lets the
  unconditional one win silently, so a conditional deny next to an unconditional allow never fires);
- ``minKernel`` conditions are refused (the engine decides them, not the profile checked here), and so
  is a ``defaultErrnoRet`` other than 1 (Docker 20.10 ignores it and returns EPERM);
- the whole profile is compiled into a BPF program for the native architecture (and the archMap's
  sub-architectures), so anything libseccomp refuses fails at load time, not at container start.

Rules conditioned on capabilities are evaluated as the engine will: toolcell runs every tool with
``cap_drop: ALL``, so ``includes.caps`` rules never apply and ``excludes.caps`` never excludes.

Everything wrong is a :class:`toolcell.errors.ConfigError` naming the profile and the offending key.
Pure: no docker, grpc or OTel imports; ``pyseccomp`` (ctypes over libseccomp) is the only native code.
"""

from __future__ import annotations

import errno
import importlib.resources
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp

from toolcell.errors import ConfigError

DEFAULT_SPEC = "default"
_DEFAULT_RESOURCE = "seccomp-default.json"

# Syscalls toolcell's default profile never allows, not even conditionally.  ``toolcell doctor`` and the
# tests check profiles against it with :func:`unconditionally_allowed`.
DENIED_BY_DEFAULT: frozenset[str] = frozenset(
    {
        "io_uring_setup", "io_uring_enter", "io_uring_register",
        "ptrace", "process_vm_readv", "process_vm_writev",
        "userfaultfd",
        "keyctl", "add_key", "request_key",
        "bpf", "perf_event_open",
        "unshare", "setns",
        "mount", "umount2", "pivot_root", "chroot",
        "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
        "open_by_handle_at", "name_to_handle_at",
        "kexec_load", "kexec_file_load",
        "init_module", "finit_module", "delete_module",
        "reboot", "swapon", "swapoff",
        "socketcall", "modify_ldt",
    }
)  # fmt: skip

_ACTIONS: Mapping[str, int | None] = {
    "SCMP_ACT_ALLOW": pyseccomp.ALLOW,
    "SCMP_ACT_ERRNO": None,  # needs the errno
    "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
    "SCMP_ACT_TRAP": pyseccomp.TRAP,
    "SCMP_ACT_LOG": pyseccomp.LOG,
}
_ALLOWING = frozenset({"SCMP_ACT_ALLOW", "SCMP_ACT_LOG"})
_OPS: Mapping[str, int] = {
    "SCMP_CMP_NE": pyseccomp.NE,
    "SCMP_CMP_LT": pyseccomp.LT,
    "SCMP_CMP_LE": pyseccomp.LE,
    "SCMP_CMP_EQ": pyseccomp.EQ,
    "SCMP_CMP_GE": pyseccomp.GE,
    "SCMP_CMP_GT": pyseccomp.GT,
    "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ,
}
# Docker arch name (``includes.arches``) and libseccomp arch for each SCMP_ARCH_* name.
_ARCHES: Mapping[str, tuple[str, int]] = {
    "SCMP_ARCH_X86_64": ("amd64", pyseccomp.Arch.X86_64),
    "SCMP_ARCH_X86": ("x86", pyseccomp.Arch.X86),
    "SCMP_ARCH_X32": ("x32", pyseccomp.Arch.X32),
    "SCMP_ARCH_AARCH64": ("arm64", pyseccomp.Arch.AARCH64),
    "SCMP_ARCH_ARM": ("arm", pyseccomp.Arch.ARM),
    "SCMP_ARCH_MIPS": ("mips", pyseccomp.Arch.MIPS),
    "SCMP_ARCH_MIPS64": ("mips64", pyseccomp.Arch.MIPS64),
    "SCMP_ARCH_MIPS64N32": ("mips64n32", pyseccomp.Arch.MIPS64N32),
    "SCMP_ARCH_MIPSEL": ("mipsel", pyseccomp.Arch.MIPSEL),
    "SCMP_ARCH_MIPSEL64": ("mipsel64", pyseccomp.Arch.MIPSEL64),
    "SCMP_ARCH_MIPSEL64N32": ("mipsel64n32", pyseccomp.Arch.MIPSEL64N32),
    "SCMP_ARCH_PPC": ("ppc", pyseccomp.Arch.PPC),
    "SCMP_ARCH_PPC64": ("ppc64", pyseccomp.Arch.PPC64),
    "SCMP_ARCH_PPC64LE": ("ppc64le", pyseccomp.Arch.PPC64LE),
    "SCMP_ARCH_S390": ("s390", pyseccomp.Arch.S390),
    "SCMP_ARCH_S390X": ("s390x", pyseccomp.Arch.S390X),
    "SCMP_ARCH_RISCV64": ("riscv64", pyseccomp.Arch.RISCV64),
}
_TOP_KEYS = frozenset({"defaultAction", "defaultErrnoRet", "archMap", "architectures", "syscalls"})
_RULE_KEYS = frozenset({"names", "action", "errnoRet", "args", "comment", "includes", "excludes"})
_FILTER_KEYS = frozenset({"arches", "caps"})
_ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
_U64 = 2**64


@dataclass(frozen=True)
class SeccompArg:
    index: int
    op: str
    value: int
    value_two: int = 0


@dataclass(frozen=True)
class SeccompRule:
    """One rule as it applies on this host (arch and caps conditions already evaluated)."""

    index: int  # position in the profile's ``syscalls`` list
    names: tuple[str, ...]
    action: str
    errno: int | None
    args: tuple[SeccompArg, ...]


@dataclass(frozen=True)
class SeccompProfile:
    """A validated, compiled profile.  ``json_text`` is what goes to the engine, byte for byte."""

    name: str
    source: str
    json_text: str
    default_action: str
    default_errno: int | None
    arches: tuple[str, ...]
    rules: tuple[SeccompRule, ...]
    # Names some applicable ALLOW/LOG rule lists, with or without argument conditions.
    allowed: frozenset[str]
    # Names an applicable ALLOW/LOG rule lists without argument conditions.
    allowed_unconditionally: frozenset[str]
    bpf: bytes

    @property
    def security_opt(self) -> str:
        """The value for Docker's ``security_opt`` list."""
        return "seccomp=" + self.json_text

    @property
    def default_allows(self) -> bool:
        return self.default_action in _ALLOWING


def unconditionally_allowed(profile: SeccompProfile, names: Iterable[str]) -> frozenset[str]:
    """The subset of ``names`` the profile lets through whatever the arguments are."""
    out = set()
    named_by_other = {n for r in profile.rules if r.action not in _ALLOWING for n in r.names}
    named_conditionally = {n for r in profile.rules if r.args for n in r.names}
    for name in names:
        by_default = profile.default_allows and name not in named_by_other | named_conditionally
        if name in profile.allowed_unconditionally or by_default:
            out.add(name)
    return frozenset(out)


def check_denies(profile: SeccompProfile, names: Iterable[str] = DENIED_BY_DEFAULT) -> None:
    """Raise ConfigError when ``profile`` unconditionally allows any of ``names``."""
    bad = unconditionally_allowed(profile, names)
    if bad:
        raise ConfigError(
            f"seccomp profile {profile.name!r} allows {', '.join(sorted(bad))} unconditionally",
            key="seccomp",
        )


_cache: dict[tuple[str, str, int], SeccompProfile] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_seccomp(spec: str, *, base_dir: Path | None = None) -> SeccompProfile:
    """Load ``"default"`` (the packaged profile) or a path to a Docker-format JSON profile.

    A relative path is taken relative to ``base_dir`` (the config file's directory).  Results are cached
    per (spec, file mtime); a changed file is re-validated.
    """
    if spec == DEFAULT_SPEC:
        key: tuple[str, str, int] = (spec, "", 0)
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
        try:
            text = importlib.resources.files("toolcell").joinpath("data", _DEFAULT_RESOURCE).read_text("utf-8")
        except OSError as exc:  # a broken install
            raise ConfigError(f"packaged seccomp profile is missing: {exc}", key="seccomp") from exc
        source = f"runtime/data/{_DEFAULT_RESOURCE}"
    else:
        if not spec:
            raise ConfigError("empty seccomp profile path", key="seccomp")
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            raise ConfigError(f"seccomp profile {spec!r}: {exc.strerror}", key="seccomp") from exc
        key = (spec, str(path.resolve()), mtime)
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"seccomp profile {spec!r}: cannot read: {exc}", key="seccomp") from exc
        source = str(path)
    profile = parse_seccomp(text, name=spec, source=source)
    with _cache_lock:
        _cache[key] = profile
    return profile


def parse_seccomp(text: str, *, name: str, source: str = "") -> SeccompProfile:
    """Validate and compile one profile given as JSON text (no caching, no file access)."""
    return _Compiler(name, source or name).run(text)


class _Compiler:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"seccomp profile {self.name!r}: {where}: {message}", key="seccomp")

    def run(self, text: str) -> SeccompProfile:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise self.fail("json", f"not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise self.fail("json", "top level must be an object")
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise self.fail(", ".join(sorted(unknown)), "unknown key (the engine would ignore it)")
        default_action, default_errno = self.action(doc, "defaultAction", "defaultErrnoRet", "top level")
        arches, native_docker = self.arches(doc)
        raw_rules = doc.get("syscalls", [])
        if not isinstance(raw_rules, list):
            raise self.fail("syscalls", "must be a list")
        rules = [r for i, raw in enumerate(raw_rules) if (r := self.rule(i, raw, native_docker, arches)) is not None]
        self.check_overrides(rules)
        bpf = self.compile(default_action, default_errno, arches, rules)
        allowed = {n for r in rules if r.action in _ALLOWING for n in r.names}
        uncond = {n for r in rules if r.action in _ALLOWING and not r.args for n in r.names}
        return SeccompProfile(
            name=self.name,
            source=self.source,
            json_text=text,
            default_action=default_action,
            default_errno=default_errno,
            arches=tuple(_ARCH_NAME_OF[a] for a in arches),
            rules=tuple(rules),
            allowed=frozenset(allowed),
            allowed_unconditionally=frozenset(uncond),
            bpf=bpf,
        )

    # -- structure ------------------------------------------------------------------------------------

    def action(self, obj: Mapping[str, Any], key: str, errno_key: str, where: str) -> tuple[str, int | None]:
        action = obj.get(key)
        if not isinstance(action, str) or action not in _ACTIONS:
            raise self.fail(f"{where}.{key}", f"must be one of {', '.join(sorted(_ACTIONS))}, got {action!r}")
        err = obj.get(errno_key)
        if err is not None and (not _is_int(err) or not 0 < err < 4096):
            raise self.fail(f"{where}.{errno_key}", f"must be an errno number 1..4095, got {err!r}")
        if errno_key == "defaultErrnoRet" and err not in (None, errno.EPERM):
            # Measured on Debian's engine 20.10: defaultErrnoRet is ignored, the default errno is EPERM.
            raise self.fail(f"{where}.{errno_key}", "the engine ignores it and returns EPERM; use 1 or omit")
        if err is not None and action != "SCMP_ACT_ERRNO":
            raise self.fail(f"{where}.{errno_key}", f"only meaningful with SCMP_ACT_ERRNO, not {action}")
        if action == "SCMP_ACT_ERRNO" and err is None:
            err = errno.EPERM  # what runc uses when no errno is given
        return action, err

    def arches(self, doc: Mapping[str, Any]) -> tuple[list[int], str]:
        native = pyseccomp.system_arch()
        native_name = _ARCH_NAME_OF.get(native)
        if native_name is None:
            raise self.fail("archMap", f"unsupported native architecture {native:#x}")
        native_docker = _ARCHES[native_name][0]
        arches = [native]
        if "archMap" in doc and "architectures" in doc:
            raise self.fail("archMap", "use either archMap or architectures, not both")
        if "architectures" in doc:
            names = doc["architectures"]
            if not isinstance(names, list):
                raise self.fail("architectures", "must be a list of SCMP_ARCH_* names")
            for a in names:
                arches.append(self.arch(a, "architectures"))
        amap = doc.get("archMap")
        if amap is not None:
            if not isinstance(amap, list):
                raise self.fail("archMap", "must be a list")
            for i, entry in enumerate(amap):
                where = f"archMap[{i}]"
                if not isinstance(entry, dict) or set(entry) - {"architecture", "subArchitectures"}:
                    raise self.fail(where, "must be {architecture, subArchitectures}")
                main = self.arch(entry.get("architecture"), where)
                subs = entry.get("subArchitectures") or []
                if not isinstance(subs, list):
                    raise self.fail(where, "subArchitectures must be a list")
                sub_arches = [self.arch(s, where) for s in subs]
                if main == native:
                    arches.extend(sub_arches)
        return list(dict.fromkeys(arches)), native_docker

    def arch(self, name: object, where: str) -> int:
        if not isinstance(name, str) or name not in _ARCHES:
            raise self.fail(where, f"unknown architecture {name!r}")
        return _ARCHES[name][1]

    def rule(self, i: int, raw: object, native_docker: str, arches: list[int]) -> SeccompRule | None:
        where = f"syscalls[{i}]"
        if not isinstance(raw, dict):
            raise self.fail(where, "must be an object")
        if "name" in raw:
            raise self.fail(f"{where}.name", "use 'names' (a list)")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise self.fail(f"{where}.{sorted(unknown)[0]}", "unknown key (the engine would ignore it)")
        names = raw.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise self.fail(f"{where}.names", "must be a non-empty list of syscall names")
        action, err = self.action(raw, "action", "errnoRet", where)
        args = self.args(where, raw.get("args"))
        includes = self.conditions(f"{where}.includes", raw.get("includes"))
        excludes = self.conditions(f"{where}.excludes", raw.get("excludes"))
        applies = True
        if includes.get("arches") and native_docker not in includes["arches"]:
            applies = False
        if native_docker in excludes.get("arches", ()):
            applies = False
        if includes.get("caps"):
            applies = False  # toolcell drops every capability
        # An allow must name syscalls of this host; a deny of a foreign-arch syscall is a harmless no-op.
        strict = applies and action in _ALLOWING
        for n in names:
            self.resolve(f"{where}.names", n, arches if strict else None)
        if not applies:
            return None
        return SeccompRule(index=i, names=tuple(names), action=action, errno=err, args=args)

    def args(self, where: str, raw: object) -> tuple[SeccompArg, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail(f"{where}.args", "must be a list")
        out: list[SeccompArg] = []
        for j, a in enumerate(raw):
            w = f"{where}.args[{j}]"
            if not isinstance(a, dict) or set(a) - _ARG_KEYS:
                raise self.fail(w, "must be {index, value, valueTwo, op}")
            index, value, two, op = a.get("index"), a.get("value", 0), a.get("valueTwo", 0), a.get("op")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 5:
                raise self.fail(w, f"index must be 0..5, got {index!r}")
            if not _is_int(value) or not 0 <= value < _U64 or not _is_int(two) or not 0 <= two < _U64:
                raise self.fail(w, "value and valueTwo must be unsigned 64-bit integers")
            if not isinstance(op, str) or op not in _OPS:
                raise self.fail(w, f"op must be one of {', '.join(sorted(_OPS))}, got {op!r}")
            if any(prev.index == index for prev in out):
                # runc adds each comparison of a repeated argument as its own rule: OR, not AND.
                raise self.fail(w, f"argument {index} is compared twice; runc would OR the comparisons")
            out.append(SeccompArg(index=index, op=op, value=value, value_two=two))
        return tuple(out)

    def conditions(self, where: str, raw: object) -> dict[str, list[str]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(where, "must be an object")
        if "minKernel" in raw:
            # The engine decides minKernel against its own kernel at container start; refusing it keeps the
            # profile that was checked here identical to the one enforced.
            raise self.fail(f"{where}.minKernel", "kernel-dependent rules are not supported")
        unknown = set(raw) - _FILTER_KEYS
        if unknown:
            raise self.fail(f"{where}.{sorted(unknown)[0]}", "unknown key (the engine would ignore it)")
        out: dict[str, list[str]] = {}
        for k, v in raw.items():
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise self.fail(f"{where}.{k}", "must be a list of strings")
            out[k] = v
        return out

    def resolve(self, where: str, name: str, arches: list[int] | None) -> None:
        """Fail unless ``name`` is a syscall of ``arches`` (or, for a rule elsewhere, of libseccomp)."""
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == -1:
            raise self.fail(where, f"unknown syscall {name!r}")
        if arches is None:
            return
        if not any(pyseccomp.resolve_syscall(a, name) >= 0 for a in arches):
            on = ", ".join(_ARCH_NAME_OF[a] for a in arches)
            raise self.fail(
                where,
                f"syscall {name!r} does not exist on {on}; put it in a rule with includes.arches",
            )

    def check_overrides(self, rules: list[SeccompRule]) -> None:
        """Refuse a syscall with an unconditional rule and any other rule of a different action.

        libseccomp (and so runc) lets the unconditional rule win silently on the native arch: a
        conditional deny next to an unconditional allow would never fire.
        """
        by_name: dict[str, list[SeccompRule]] = {}
        for rule in rules:
            for n in rule.names:
                by_name.setdefault(n, []).append(rule)
        for n, entries in by_name.items():
            for rule in entries:
                if rule.args:
                    continue
                for other in entries:
                    if other is not rule and (other.action, other.errno) != (rule.action, rule.errno):
                        raise self.fail(
                            f"syscalls[{other.index}].names",
                            f"{n!r} also has an unconditional {rule.action} (syscalls[{rule.index}]), "
                            f"which would silently override this {other.action}",
                        )

    # -- compilation ----------------------------------------------------------------------------------

    def compile(
        self,
        default_action: str,
        default_errno: int | None,
        arches: list[int],
        rules: list[SeccompRule],
    ) -> bytes:
        try:
            filt = pyseccomp.SyscallFilter(_action_value(default_action, default_errno))
            for a in arches[1:]:
                filt.add_arch(a)
        except OSError as exc:
            raise self.fail("archMap", f"libseccomp refused the architectures: {exc.strerror}") from exc
        for rule in rules:
            act = _action_value(rule.action, rule.errno)
            args = [pyseccomp.Arg(a.index, _OPS[a.op], a.value, a.value_two) for a in rule.args]
            for n in rule.names:
                try:
                    filt.add_rule(act, n, *args)
                except OSError as exc:
                    raise self.fail(f"syscalls[{rule.index}].names ({n})", _explain(exc)) from exc
        # export_bpf wants a real descriptor: an anonymous in-memory file, never the disk.
        with os.fdopen(os.memfd_create("toolcell-seccomp", os.MFD_CLOEXEC), "w+b") as fh:
            try:
                filt.export_bpf(fh)
            except OSError as exc:
                raise self.fail("compile", f"libseccomp could not export BPF: {exc.strerror}") from exc
            fh.seek(0)
            return fh.read()


_ARCH_NAME_OF: Mapping[int, str] = {v[1]: k for k, v in _ARCHES.items()}


def _action_value(action: str, err: int | None) -> int:
    if action == "SCMP_ACT_ERRNO":
        return int(pyseccomp.ERRNO(err if err is not None else errno.EPERM))
    value = _ACTIONS[action]
    if value is None:  # only ERRNO needs an argument; _ACTIONS maps every other action to a value
        raise ConfigError(f"seccomp action {action} has no value")
    return int(value)


def _explain(exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return "conflicts with another rule for the same syscall (libseccomp refuses it; so would runc)"
    if exc.errno == errno.EINVAL:
        return "libseccomp refused the rule (invalid comparison for this syscall)"
    return f"libseccomp refused the rule: {exc.strerror}"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
