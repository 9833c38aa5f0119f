"""toolcell's seccomp profile against the real engine, each probe run both ways.

Style of bubblewrap's tests/test-seccomp.py: the same raw syscall runs once with the control relaxed
(``seccomp=unconfined``) and once under toolcell's default profile.  Relaxed it must succeed or fail with a
*different* errno (so the probe is known to reach the kernel); under the profile it must fail with EPERM.
A test can therefore not pass because the probe itself is broken.

These tests need a reachable Docker engine and the image ``toolcell/python:bookworm``; without either
they fail, they never skip.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from toolcell.errors import ConfigError
from toolcell.policy.seccomp import load_seccomp

pytestmark = pytest.mark.docker

IMAGE = "toolcell/python:bookworm"
LABEL = {"io.toolcell.test": "1"}

# One python3 program; argv[1] names the probe.  Prints "ok <ret>" or "errno <n>".
PROBE = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
sc = libc.syscall
sc.restype = ctypes.c_long
sc.argtypes = [ctypes.c_long] + [ctypes.c_ulong] * 5

def raw(nr, *args):
    args = list(args) + [0] * (5 - len(args))
    ctypes.set_errno(0)
    r = sc(nr, *args)
    return ("ok %d" % r) if r >= 0 else ("errno %d" % ctypes.get_errno())

def int80(call, a, b, c):
    # socketcall(call, [a, b, c]) through the i386 entry point (int $0x80) of this 64-bit process
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,  # MAP_32BIT
                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code = bytes([0x53, 0xB8, 102, 0, 0, 0, 0x89, 0xFB, 0x89, 0xF1, 0xCD, 0x80, 0x5B, 0xC3])
    m.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    argv = (ctypes.c_uint32 * 3).from_address(addr + 256)
    argv[0], argv[1], argv[2] = a, b, c
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32)(addr)
    r = fn(call, addr + 256)
    return ("ok %d" % r) if r >= 0 else ("errno %d" % -r)

buf = ctypes.create_string_buffer(256)
p = ctypes.addressof(buf)
PROBES = {
    "io_uring_setup":   lambda: raw(425, 1, p),
    "ptrace_traceme":   lambda: raw(101, 0, 0, 0, 0),
    "unshare_user":     lambda: raw(272, 0x10000000),
    "clone_newuser":    lambda: raw(56, 0x10000000 | 0x200),       # NEWUSER|CLONE_FS: EINVAL in-kernel
    "clone3":           lambda: raw(435, 0, 0),                    # NULL args: EINVAL in-kernel
    "keyctl":           lambda: raw(250, 0, 0xFFFFFFFFFFFFFFFD, 0),  # GET_KEYRING_ID(SESSION)
    "add_key":          lambda: raw(248, 0, 0, 0, 0, 0),
    "request_key":      lambda: raw(249, 0, 0, 0, 0),
    "userfaultfd":      lambda: raw(323, 1),                       # UFFD_USER_MODE_ONLY
    "bpf":              lambda: raw(321, 9999, 0, 0),              # bad command: EINVAL in-kernel
    "perf_event_open":  lambda: raw(298, 0, 0, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0),
    "setns":            lambda: raw(308, 0xFFFFFFFFFFFFFFFF, 0),   # fd -1: EBADF in-kernel
    "mount":            lambda: raw(165, 1, 1, 1, 0, 0),           # bad pointers: EFAULT in-kernel
    "umount2":          lambda: raw(166, 1, 0),
    "process_vm_readv": lambda: raw(310, os.getpid(), 0, 0, 0, 0),       # empty iovecs: 0 in-kernel
    "name_to_handle_at": lambda: raw(303, 0xFFFFFFFFFFFFFF9C, 1, 1, 1, 0),  # bad pointers: EFAULT
    "socket_vsock":     lambda: raw(41, 40, 1, 0),
    "socket_alg":       lambda: raw(41, 38, 5, 0),
    "socket_vsock_hi":  lambda: raw(41, (1 << 32) | 40, 1, 0),     # upper half garbage, int 40
    "socket_unix":      lambda: raw(41, 1, 1, 0),
    "personality_noaslr": lambda: raw(135, 0x0040000),             # ADDR_NO_RANDOMIZE
    "personality_query": lambda: raw(135, 0xFFFFFFFF),
    "int80_socket_vsock": lambda: int80(1, 40, 1, 0),
}
print(PROBES[sys.argv[1]]())
"""

# probe -> errno under toolcell's profile (EPERM for all the denials; ENOSYS for clone3).
DENIED = {
    "io_uring_setup": errno.EPERM,
    "ptrace_traceme": errno.EPERM,
    "unshare_user": errno.EPERM,
    "clone_newuser": errno.EPERM,
    "keyctl": errno.EPERM,
    "add_key": errno.EPERM,
    "request_key": errno.EPERM,
    "userfaultfd": errno.EPERM,
    "bpf": errno.EPERM,
    "perf_event_open": errno.EPERM,
    "setns": errno.EPERM,
    "mount": errno.EPERM,
    "umount2": errno.EPERM,
    "process_vm_readv": errno.EPERM,
    "name_to_handle_at": errno.EPERM,
    "socket_vsock": errno.EPERM,
    "socket_alg": errno.EPERM,
    "socket_vsock_hi": errno.EPERM,
    "personality_noaslr": errno.EPERM,
    "clone3": errno.ENOSYS,
}
ALLOWED = ("socket_unix", "personality_query")

WORKLOAD = r"""
import asyncio, json, os, sqlite3, subprocess, tempfile, threading
assert json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]}
db = sqlite3.connect("/tmp/t.db"); db.execute("create table t(x)"); db.execute("insert into t values (1)")
db.commit(); assert db.execute("select count(*) from t").fetchone() == (1,)
out = []
ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]; assert sorted(out) == list(range(8))
assert subprocess.run(["/bin/true"]).returncode == 0
assert subprocess.run(["sh", "-c", "echo hi | wc -c"], capture_output=True, text=True).stdout.strip() == "3"
async def main():
    p = await asyncio.create_subprocess_exec("/bin/true"); await p.wait()
    await asyncio.sleep(0.01); return p.returncode
assert asyncio.run(main()) == 0
with tempfile.NamedTemporaryFile(dir="/tmp") as f:
    f.write(b"x" * 65536); f.flush(); os.fsync(f.fileno())
import socket; a, b = socket.socketpair(); a.sendall(b"z"); assert b.recv(1) == b"z"
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.close()
print("workload ok")
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker.from_env(timeout=60)
    client.ping()  # unreachable engine: error, never skip
    client.images.get(IMAGE)  # missing image: ImageNotFound, never skip
    yield client
    for c in client.containers.list(all=True, filters={"label": "io.toolcell.test=1"}):
        c.remove(force=True)
    client.close()


@pytest.fixture(scope="module")
def toolcell_opt() -> str:
    return load_seccomp("default").security_opt


def run(client: Any, seccomp_opt: str, argv: list[str]) -> tuple[int, str]:
    container = client.containers.create(
        IMAGE,
        argv,
        labels=LABEL,
        network_mode="none",
        cap_drop=["ALL"],
        user="10001:10001",
        security_opt=["no-new-privileges", seccomp_opt],
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,nodev,size=16m"},
    )
    try:
        container.start()
        status = container.wait(timeout=60)
        out = container.logs(stdout=True, stderr=True).decode()
        return int(status["StatusCode"]), out.strip()
    finally:
        container.remove(force=True)


def probe(client: Any, seccomp_opt: str, name: str) -> tuple[int, str]:
    return run(client, seccomp_opt, ["python3", "-c", PROBE, name])


@pytest.mark.parametrize("name", sorted(DENIED))
def test_probe_denied_by_toolcell_but_not_by_kernel(engine: Any, toolcell_opt: str, name: str) -> None:
    code, relaxed = probe(engine, "seccomp=unconfined", name)
    assert code == 0, relaxed
    expected = DENIED[name]
    assert relaxed != f"errno {expected}", f"probe {name} fails without seccomp too: {relaxed}"
    code, confined = probe(engine, toolcell_opt, name)
    assert code == 0, confined
    assert confined == f"errno {expected}", f"{name}: relaxed {relaxed!r}, toolcell {confined!r}"


@pytest.mark.parametrize("name", ALLOWED)
def test_harmless_calls_still_allowed(engine: Any, toolcell_opt: str, name: str) -> None:
    code, out = probe(engine, toolcell_opt, name)
    assert code == 0 and out.startswith("ok "), out


def test_i386_entry_point_is_killed_not_a_socket_hole(engine: Any, toolcell_opt: str) -> None:
    """Relaxed, int 0x80 socketcall creates an AF_VSOCK socket; under toolcell the i386 ABI is gone."""
    code, relaxed = probe(engine, "seccomp=unconfined", "int80_socket_vsock")
    assert code == 0 and relaxed.startswith("ok "), relaxed
    code, confined = probe(engine, toolcell_opt, "int80_socket_vsock")
    assert code != 0 and not confined.startswith("ok "), (code, confined)


def test_python_workload_runs_under_profile(engine: Any, toolcell_opt: str) -> None:
    code, out = run(engine, toolcell_opt, ["python3", "-c", WORKLOAD])
    assert (code, out) == (0, "workload ok")


def _default_plus(*rules: dict[str, Any], first: bool = False) -> str:
    profile = json.loads(load_seccomp("default").json_text)
    profile["syscalls"] = [*rules, *profile["syscalls"]] if first else [*profile["syscalls"], *rules]
    return json.dumps(profile)


VSOCK = {"index": 0, "value": 40, "op": "SCMP_CMP_EQ"}


@pytest.mark.parametrize(
    ("case", "probe_name", "rules", "first"),
    [
        (
            "conditional deny then unconditional allow",
            "socket_vsock",
            [
                {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13, "args": [VSOCK]},
                {"names": ["socket"], "action": "SCMP_ACT_ALLOW"},
            ],
            True,
        ),
        (
            "two comparisons on one argument (runc ORs them)",
            "socket_vsock",
            [
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [
                        {"index": 0, "value": 39, "op": "SCMP_CMP_GT"},
                        {"index": 0, "value": 3, "op": "SCMP_CMP_LT"},
                    ],
                }
            ],
            False,
        ),
        (
            "unknown key in includes (ignored by the engine)",
            "io_uring_setup",
            [{"names": ["io_uring_setup"], "action": "SCMP_ACT_ALLOW", "includes": {"kernel": ["99.0"]}}],
            False,
        ),
    ],
)
def test_engine_is_lax_where_loader_is_strict(
    engine: Any, tmp_path: Any, case: str, probe_name: str, rules: list[dict[str, Any]], first: bool
) -> None:
    text = _default_plus(*rules, first=first)
    code, out = probe(engine, "seccomp=" + text, probe_name)
    assert (code, out) == (0, "ok 3"), f"{case}: the engine no longer lets it through: {out}"
    path = tmp_path / "lax.json"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_seccomp(str(path))


def test_engine_ignores_default_errno_ret(engine: Any) -> None:
    """Why load_seccomp only accepts defaultErrnoRet 1: Debian's 20.10 returns EPERM whatever it says."""
    profile = json.loads(load_seccomp("default").json_text)
    profile["defaultErrnoRet"] = errno.EACCES
    assert probe(engine, "seccomp=" + json.dumps(profile), "io_uring_setup") == (0, f"errno {errno.EPERM}")
