#!/usr/bin/env python3
"""Generate runtime/data/seccomp-default.json: Docker's default allowlist, tightened.

    .venv/bin/python scripts/gen_seccomp.py [--reference FILE] [--check]

Input is the engine's upstream default (moby/profiles ``seccomp/default.json``; a copy lives in
/work/shared/reference/moby-seccomp-default.json).  Only its *unconditional* allow rule is taken over;
every capability-, kernel- or foreign-arch-conditioned rule is dropped, because toolcell always runs
tools with ``cap_drop: ALL`` and the engine silently ignores conditions it does not understand.  From
that allowlist the names in DENY (below, each with its reason) are removed; what is not allowed falls to
``defaultAction: SCMP_ACT_ERRNO`` with ``defaultErrnoRet: 1`` (EPERM).

Then a few hand-written rules are appended (socket families, personality, clone without namespace flags,
clone3 -> ENOSYS).  The output is deterministic: it does not depend on the libseccomp of the machine that
runs the script (names this libseccomp cannot resolve are listed in UNRESOLVABLE and dropped; the script
fails when the reference brings a new one, so it gets reviewed).

``--check`` regenerates in memory and exits 1 when the committed file differs (for CI).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runtime" / "data" / "seccomp-default.json"
# Vendored copy of moby/profiles seccomp/default.json (June 2026), the engine's current upstream default.
REFERENCE = Path(__file__).resolve().parent / "data" / "moby-seccomp-default.json"

EPERM = 1
ENOSYS = 38

# Removed from Docker's unconditional allowlist (or never granted because upstream only grants them
# behind a capability / minKernel condition, which toolcell does not carry over).  Everything here is
# denied with EPERM.  Keep one reason per entry.
DENY: dict[str, str] = {
    # -- kernel attack surface a tool does not need -------------------------------------------------
    "io_uring_setup": "io_uring: large, bug-prone kernel surface; bypasses per-syscall filtering",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    "bpf": "eBPF programs and maps",
    "perf_event_open": "perf counters: kernel info leaks, side channels",
    "userfaultfd": "userfaultfd: classic primitive to win kernel races",
    "keyctl": "kernel keyrings are not namespaced",
    "add_key": "kernel keyrings are not namespaced",
    "request_key": "kernel keyrings are not namespaced; can upcall into the host",
    "modify_ldt": "x86 LDT: 16-bit/Wine only, history of CVEs (upstream allows it on amd64)",
    "remap_file_pages": "deprecated, emulated, bug history",
    "epoll_ctl_old": "never implemented; nothing calls it",
    "epoll_wait_old": "never implemented; nothing calls it",
    "memfd_secret": "secret memory: mlocked, invisible to the kernel; no tool needs it",
    "socketcall": "x86-32 socket multiplexer: its arguments live in memory, so socket() domain filters cannot see them",
    # -- debugging / inspecting other processes ------------------------------------------------------
    "ptrace": "tracing; upstream allows it on kernels >= 4.8",
    "process_vm_readv": "reads another process's memory; upstream allows it on kernels >= 4.8",
    "process_vm_writev": "writes another process's memory; upstream allows it on kernels >= 4.8",
    "process_madvise": "acts on another process's memory",
    "process_mrelease": "reaps another process's memory (for OOM killers)",
    "kcmp": "compares kernel objects of other processes",
    "pidfd_getfd": "steals file descriptors from another process",
    # -- namespaces and mounts: the container's shape is fixed by the supervisor ------------------------
    "unshare": "new namespaces (user namespaces unlock root-only kernel code)",
    "setns": "joining namespaces",
    "mount": "mounts",
    "umount": "mounts",
    "umount2": "mounts",
    "pivot_root": "mounts",
    "chroot": "mounts",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "move_mount": "new mount API",
    "open_tree": "new mount API",
    "mount_setattr": "new mount API",
    "statmount": "mount introspection; /proc/self/mountinfo suffices",
    "listmount": "mount introspection; /proc/self/mountinfo suffices",
    "name_to_handle_at": "file handles: only useful with open_by_handle_at",
    "open_by_handle_at": "file handles bypass path checks (the 'shocker' escape)",
    "quotactl": "disk quotas",
    "quotactl_fd": "disk quotas",
    "fanotify_init": "filesystem-wide monitoring",
    "fanotify_mark": "filesystem-wide monitoring (useless without fanotify_init)",
    "lookup_dcookie": "kernel profiling",
    # -- host-wide state ----------------------------------------------------------------------------
    "kexec_load": "replacing the kernel",
    "kexec_file_load": "replacing the kernel",
    "init_module": "kernel modules",
    "finit_module": "kernel modules",
    "delete_module": "kernel modules",
    "reboot": "reboot",
    "swapon": "swap",
    "swapoff": "swap",
    "acct": "process accounting",
    "syslog": "kernel log",
    "sethostname": "hostname is fixed by the plan",
    "setdomainname": "hostname is fixed by the plan",
    "settimeofday": "clock",
    "stime": "clock",
    "clock_settime": "clock",
    "clock_settime64": "clock",
    "adjtimex": "clock discipline (NTP)",
    "clock_adjtime": "clock discipline (NTP)",
    "clock_adjtime64": "clock discipline (NTP)",
    "iopl": "raw I/O ports",
    "ioperm": "raw I/O ports",
    "vhangup": "terminal hangup",
    "sync": "flushes every filesystem of the host: I/O storm from inside a sandbox (fsync suffices)",
    "syncfs": "flushes the host filesystem under the overlay (fsync suffices)",
    "get_mempolicy": "NUMA policy",
    "set_mempolicy": "NUMA policy",
    "set_mempolicy_home_node": "NUMA policy",
    "mbind": "NUMA policy",
    "migrate_pages": "NUMA policy",
    "move_pages": "NUMA policy",
    "lsm_get_self_attr": "LSM introspection",
    "lsm_set_self_attr": "LSM introspection",
    "lsm_list_modules": "LSM introspection",
    # -- handled by the hand-written rules below, never allowed unconditionally -------------------------
    "socket": "allowed only for AF_UNIX, AF_INET, AF_INET6, AF_NETLINK (rules below)",
    "personality": "allowed only for the harmless values (rules below)",
    "clone": "allowed only without namespace flags (rule below)",
    "clone3": "ENOSYS so glibc falls back to clone, whose flags seccomp can inspect (rule below)",
}

# Names in the reference that libseccomp 2.5.4 (Debian 12) does not know: resolve_syscall returns -1 and
# runc would skip them silently.  Dropped (so: denied).  When the host's libseccomp learns them, review and
# move each either to the allowlist (by deleting it here) or to DENY.
UNRESOLVABLE: dict[str, str] = {
    "getxattrat": "new xattr *at family (6.13)",
    "setxattrat": "new xattr *at family (6.13)",
    "listxattrat": "new xattr *at family (6.13)",
    "removexattrat": "new xattr *at family (6.13)",
    "mseal": "memory sealing (6.10); glibc does not use it yet",
    "uretprobe": "uprobes trampoline (6.11)",
    "riscv_hwprobe": "riscv only",
}

# Architecture families.  Docker's ``includes.arches`` matches the engine's own (Go) architecture; the
# archMap adds sub-architectures to the filter.  x86 (i386) is deliberately NOT a sub-architecture of
# x86_64: for i386 tasks libseccomp turns any argument-conditioned socket() rule into an unconditional
# socketcall(SYS_SOCKET) allow, which would re-open AF_VSOCK/AF_ALG to 32-bit code (int 0x80).  Without
# it, an i386 syscall hits the bad-arch action and the thread is killed.
ARCH_MAP = [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
]
FAMILIES = {"amd64": ("X86_64", "X32"), "arm64": ("AARCH64", "ARM")}

# socket(2) domains a tool plausibly needs.  Allowed by equality on the full 64-bit register, so a domain
# with garbage in the upper half (which the kernel truncates to int) cannot slip past a range rule.
SOCKET_DOMAINS = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK (getaddrinfo, if lookups)"}
# personality(2): PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and 0xffffffff (query only).
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: clone() must have none of them.
CLONE_NS_MASK = 0x7E020000

# Arch-specific allows taken over from the reference (those not in DENY).
ARCH_RULES_FROM_REFERENCE = {"amd64", "arm64"}


def _resolver() -> Any:
    import pyseccomp

    return pyseccomp


def _family_of(name: str, ps: Any) -> set[str]:
    """The families (amd64, arm64) on which some arch of the family knows ``name``."""
    out = set()
    for fam, arches in FAMILIES.items():
        if any(ps.resolve_syscall(getattr(ps.Arch, a), name) >= 0 for a in arches):
            out.add(fam)
    return out


def generate(reference: dict[str, Any]) -> dict[str, Any]:
    ps = _resolver()
    allow: set[str] = set()
    for rule in reference["syscalls"]:
        if rule["action"] != "SCMP_ACT_ALLOW" or rule.get("args") or rule.get("excludes"):
            continue
        inc = rule.get("includes") or {}
        if set(inc) - {"arches"}:
            continue  # caps / minKernel conditioned: not carried over
        if "arches" in inc and not set(inc["arches"]) & ARCH_RULES_FROM_REFERENCE:
            continue  # ppc, s390, riscv: not in the archMap
        allow.update(rule["names"])
    allow -= set(DENY)
    for name in sorted(allow):
        if ps.resolve_syscall(ps.Arch.NATIVE, name) == -1 and name not in UNRESOLVABLE:
            sys.exit(f"gen_seccomp: libseccomp does not know {name!r}: add it to UNRESOLVABLE or DENY")
    allow -= set(UNRESOLVABLE)

    common: list[str] = []
    per_family: dict[str, list[str]] = {fam: [] for fam in FAMILIES}
    for name in sorted(allow):
        fams = _family_of(name, ps)
        if fams == set(FAMILIES):
            common.append(name)
        else:
            for fam in sorted(fams):
                per_family[fam].append(name)
            # a name known on no family of the archMap is simply dropped (it could never match)

    syscalls: list[dict[str, Any]] = [
        {
            "names": common,
            "action": "SCMP_ACT_ALLOW",
            "comment": "Docker's default allowlist minus scripts/gen_seccomp.py DENY",
        }
    ]
    for fam, names in per_family.items():
        if names:
            syscalls.append(
                {
                    "names": names,
                    "action": "SCMP_ACT_ALLOW",
                    "comment": f"only known on {fam} (or its compat arch)",
                    "includes": {"arches": [fam]},
                }
            )
    for domain, label in SOCKET_DOMAINS.items():
        syscalls.append(
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": domain, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
                "comment": f"socket({label}); every other family (AF_VSOCK, AF_ALG, ...) -> EPERM",
            }
        )
    for value in PERSONALITIES:
        syscalls.append(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
                "comment": f"personality({value:#x})",
            }
        )
    syscalls.append(
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            "comment": "clone() without namespace flags (x86_64/aarch64 argument order)",
        }
    )
    syscalls.append(
        {
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": ENOSYS,
            "comment": "clone3 flags live in memory; ENOSYS makes glibc fall back to clone",
        }
    )
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "archMap": ARCH_MAP,
        "syscalls": syscalls,
    }


def render(profile: dict[str, Any]) -> str:
    return json.dumps(profile, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--check", action="store_true", help="fail when the committed file is stale")
    opts = parser.parse_args()
    text = render(generate(json.loads(opts.reference.read_text())))
    if opts.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is stale; run scripts/gen_seccomp.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
