"""Hostile probe: one tool, many attacks.  Sent as the code of a ``python.run``-style tool (pyrun.py).

The test prepends ``PROBE_ARGS = {"probe": NAME, "params": {...}}`` to this source (profile mounts, the
other way to ship it, do not work under this host's gVisor build: see docs/security.md).
Observing probes print ONE JSON object (their observations) as the last line of stdout and exit 0;
abusive probes (bombs, floods, spinners) do what their name says and let the sandbox stop them.
Only the standard library: this runs in ``toolcell/python:bookworm`` under any runtime.

Every observation is a plain value: ``"ok"`` / ``"ok <n>"`` when the attempt succeeded, otherwise the
errno name (``"EPERM"``), so the test on the host can assert the exact failure.
"""

import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long] + [ctypes.c_ulong] * 6


def err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}") if exc.errno else type(exc).__name__


def raw(nr: int, *args: int) -> str:
    """A raw x86-64 syscall: "ok <ret>" or the errno name."""
    full = [a & 0xFFFFFFFFFFFFFFFF for a in args] + [0] * (6 - len(args))
    ctypes.set_errno(0)
    r = _syscall(nr, *full)
    if r >= 0:
        return f"ok {r}"
    e = ctypes.get_errno()
    return errno.errorcode.get(e, f"errno {e}")


def attempt(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        r = fn()
    except OSError as exc:
        return err(exc)
    return "ok" if r is None else f"ok {r}"


def emit(obs: dict) -> None:  # type: ignore[type-arg]
    sys.stdout.write(json.dumps(obs, sort_keys=True) + "\n")
    sys.stdout.flush()


# -- network ----------------------------------------------------------------------------------------


def probe_network(params: dict) -> dict:  # type: ignore[type-arg]
    obs: dict[str, object] = {"ifaces": sorted(os.listdir("/sys/class/net"))}
    for host, port in params.get("targets", []):
        s = socket.socket()
        s.settimeout(3)
        obs[f"tcp {host}"] = attempt(lambda s=s, h=host, p=port: s.connect((h, p)))
        s.close()
    try:
        socket.getaddrinfo(params.get("name", "example.com"), 443)
        obs["dns"] = "resolved"
    except OSError as exc:
        obs["dns"] = type(exc).__name__
    families = {
        "AF_VSOCK": (40, socket.SOCK_STREAM, 0),
        "AF_ALG": (38, socket.SOCK_SEQPACKET, 0),
        "AF_PACKET raw": (17, socket.SOCK_RAW, 0x0300),
        "AF_INET raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        "AF_NETLINK route": (16, socket.SOCK_RAW, 0),
        "AF_UNIX": (socket.AF_UNIX, socket.SOCK_STREAM, 0),
    }
    for name, (fam, typ, proto) in families.items():
        try:
            socket.socket(fam, typ, proto).close()
            obs[f"socket {name}"] = "ok"
        except OSError as exc:
            obs[f"socket {name}"] = err(exc)
    return obs


# -- syscalls ---------------------------------------------------------------------------------------

_buf = ctypes.create_string_buffer(256)
_p = ctypes.addressof(_buf)

# name -> arguments chosen so that the KERNEL (no seccomp) answers with something other than EPERM
# where it can (bad pointers -> EFAULT, bad fd -> EBADF ...), so a relaxed run proves the probe works.
SYSCALLS = {
    "mount": lambda: raw(165, 1, 1, 1, 0, 0),
    "umount2": lambda: raw(166, 1, 0),
    "unshare(CLONE_NEWUSER)": lambda: raw(272, 0x10000000),
    "setns": lambda: raw(308, -1, 0),
    "ptrace(TRACEME)": lambda: raw(101, 0, 0, 0, 0),
    "ptrace(ATTACH, 1)": lambda: raw(101, 16, 1, 0, 0),
    "keyctl": lambda: raw(250, 0, -3, 0),
    "add_key": lambda: raw(248, 0, 0, 0, 0, 0),
    "bpf": lambda: raw(321, 9999, 0, 0),
    "perf_event_open": lambda: raw(298, 0, 0, -1, -1, 0),
    "userfaultfd": lambda: raw(323, 1),
    "io_uring_setup": lambda: raw(425, 1, _p),
    "kexec_load": lambda: raw(246, 0, 0, 0, 0),
    "reboot": lambda: raw(169, 0, 0, 0, 0),  # bad magic: EINVAL if the kernel ever got that far
    "init_module": lambda: raw(175, 0, 0, 0),
    "open_by_handle_at": lambda: raw(304, -100, 1, 0),
    "process_vm_readv": lambda: raw(310, os.getpid(), 0, 0, 0, 0, 0),
    "personality(ADDR_NO_RANDOMIZE)": lambda: raw(135, 0x0040000),
}


def probe_syscalls(params: dict) -> dict:  # type: ignore[type-arg]
    return {name: fn() for name, fn in SYSCALLS.items()}


def probe_i386(params: dict) -> dict:  # type: ignore[type-arg]
    """socketcall(AF_VSOCK) through the i386 entry point (int $0x80): toolcell's profile kills it."""
    print("about to enter the i386 ABI", flush=True)
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(bytes([0x53, 0xB8, 102, 0, 0, 0, 0x89, 0xFB, 0x89, 0xF1, 0xCD, 0x80, 0x5B, 0xC3]))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    argv = (ctypes.c_uint32 * 3).from_address(addr + 256)
    argv[0], argv[1], argv[2] = 40, 1, 0
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32)(addr)
    r = fn(1, addr + 256)
    return {"int80 socket(AF_VSOCK)": f"ok {r}" if r >= 0 else errno.errorcode.get(-r, str(-r))}


# -- privilege --------------------------------------------------------------------------------------


def probe_privilege(params: dict) -> dict:  # type: ignore[type-arg]
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    obs: dict[str, object] = {k: status.get(k, "absent") for k in
                              ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                               "NoNewPrivs", "Seccomp")}
    obs["setuid(0)"] = attempt(lambda: os.setuid(0))
    obs["setgid(0)"] = attempt(lambda: os.setgid(0))
    obs["setresuid(0,0,0)"] = attempt(lambda: os.setresuid(0, 0, 0))
    obs["setgroups([0])"] = attempt(lambda: os.setgroups([0]))
    obs["chown /tmp to root"] = attempt(lambda: os.chown("/tmp", 0, 0))
    suid = []
    for top in ("/bin", "/sbin", "/usr", "/etc", "/lib", "/opt", "/var"):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_mode & 0o6000 and not os.path.islink(path):
                    suid.append(path)
    obs["setuid/setgid files"] = suid
    return obs


# -- filesystem -------------------------------------------------------------------------------------


def write(path: str) -> str:
    try:
        with open(path, "w") as fh:
            fh.write("1")
    except OSError as exc:
        return err(exc)
    return "ok"


def probe_fs(params: dict) -> dict:  # type: ignore[type-arg]
    obs: dict[str, object] = {}
    for path in ("/tmp/x", "/x", "/etc/passwd", "/usr/bin/x", "/opt/probes/x", "/proc/sys/kernel/hostname",
                 "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger", "/sys/kernel/uevent_helper"):
        obs[f"write {path}"] = write(path)
    cgroup = [os.path.join(d, f) for d, _, fs in os.walk("/sys/fs/cgroup") for f in fs
              if f in ("memory.limit_in_bytes", "memory.max", "pids.max", "cgroup.procs")]
    obs["cgroup files found"] = len(cgroup)
    obs["cgroup files writable"] = [p for p in cgroup if write(p) == "ok"]
    # noexec /tmp: a dropped binary cannot be executed.
    with open("/usr/bin/true", "rb") as src, open("/tmp/dropped", "wb") as dst:
        dst.write(src.read())
    os.chmod("/tmp/dropped", 0o755)
    obs["exec /tmp/dropped"] = exec_status("/tmp/dropped")
    return obs


def exec_status(path: str) -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.execv(path, [path])
        except OSError as exc:
            os.write(w, err(exc).encode())
        os._exit(127)
    os.close(w)
    msg = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    return msg or "ok"


def probe_tmpfill(params: dict) -> dict:  # type: ignore[type-arg]
    written, chunk = 0, b"\0" * (1 << 20)
    try:
        with open("/tmp/fill", "wb") as fh:
            while written < params.get("limit", 1 << 34):
                written += fh.write(chunk)
                fh.flush()
    except OSError as exc:
        return {"result": err(exc), "written": written}
    return {"result": "ok", "written": written}


def writable_dirs() -> list:  # type: ignore[type-arg]
    """Every directory this process can create a file in (outside /proc and /sys)."""
    found = []
    for dirpath, dirs, _files in os.walk("/"):
        if dirpath.startswith(("/proc", "/sys")):
            dirs[:] = []
            continue
        path = os.path.join(dirpath, f".probe-{os.getpid()}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            continue
        os.unlink(path)
        found.append(dirpath)
    return sorted(found)


def probe_shm(params: dict) -> dict:  # type: ignore[type-arg]
    """POSIX shared memory: /dev/shm and shm_open, its mount options, its noexec and size cap."""
    obs: dict[str, object] = {"write /dev/shm/x": write("/dev/shm/x")}
    try:
        from multiprocessing import shared_memory

        segment = shared_memory.SharedMemory(create=True, size=4096)
        segment.close()
        segment.unlink()
        obs["shm_open"] = "ok"
    except OSError as exc:
        obs["shm_open"] = err(exc)
    with open("/proc/mounts") as fh:
        obs["mounts"] = {f[1]: f[3] for f in (line.split() for line in fh) if f[1] in ("/dev/shm", "/dev/mqueue")}
    obs["writable dirs"] = writable_dirs()
    if obs["write /dev/shm/x"] == "ok":
        with open("/usr/bin/true", "rb") as src, open("/dev/shm/dropped", "wb") as dst:
            dst.write(src.read())
        os.chmod("/dev/shm/dropped", 0o755)
        obs["exec /dev/shm/dropped"] = exec_status("/dev/shm/dropped")
        written, chunk = 0, b"\0" * (1 << 20)
        try:
            with open("/dev/shm/fill", "wb") as fh:
                while written < params.get("limit", 1 << 30):
                    written += fh.write(chunk)
                    fh.flush()
            obs["fill"] = "ok"
        except OSError as exc:
            obs["fill"] = err(exc)
        obs["filled"] = written
    return obs


# -- resources --------------------------------------------------------------------------------------


def probe_forkbomb(params: dict) -> dict:  # type: ignore[type-arg]
    children, result = [], "ok"
    for _ in range(params.get("max", 10000)):
        try:
            pid = os.fork()
        except OSError as exc:
            result = err(exc)
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return {"result": result, "forked": len(children)}


def probe_workers(params: dict) -> dict:  # type: ignore[type-arg]
    """An ordinary parallel tool: a few processes doing CPU work, each exiting 0."""
    children = []
    for _ in range(params.get("workers", 4)):
        pid = os.fork()
        if pid == 0:
            deadline = time.process_time() + params.get("cpu_s", 0.2)
            while time.process_time() < deadline:
                pass
            os._exit(0)
        children.append(pid)
    return {"exits": [os.waitpid(pid, 0)[1] for pid in children]}


def probe_threadbomb(params: dict) -> dict:  # type: ignore[type-arg]
    stop, threads, result = threading.Event(), [], "ok"
    for _ in range(params.get("max", 10000)):
        t = threading.Thread(target=stop.wait, daemon=True)
        try:
            t.start()
        except RuntimeError as exc:
            result = str(exc)
            break
        threads.append(t)
    stop.set()
    return {"result": result, "threads": len(threads)}


def probe_alloc(params: dict) -> dict:  # type: ignore[type-arg]
    blocks, total = [], 0
    print("allocating", flush=True)
    while total < params.get("bytes", 2 << 30):
        blocks.append(bytearray(b"\1" * (64 << 20)))  # written, so the pages are really used
        total += 64 << 20
    return {"result": "ok", "allocated": total}


def probe_fds(params: dict) -> dict:  # type: ignore[type-arg]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds, result = [], "ok"
    for _ in range(params.get("max", 1 << 20)):
        try:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            result = err(exc)
            break
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
        raise_hard = "ok"
    except ValueError:  # CPython's translation of the kernel's EPERM for this call
        raise_hard = "EPERM"
    except OSError as exc:
        raise_hard = err(exc)
    for fd in fds:
        os.close(fd)
    return {"result": result, "opened": len(fds), "soft": soft, "hard": hard, "raise hard limit": raise_hard}


def probe_spin(params: dict) -> dict:  # type: ignore[type-arg]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("spinning, SIGTERM ignored", flush=True)
    workers = params.get("workers", 1)
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    while True:
        pass


def probe_sleep(params: dict) -> dict:  # type: ignore[type-arg]
    print("going to sleep", flush=True)
    time.sleep(3600)
    return {}


def probe_drip(params: dict) -> dict:  # type: ignore[type-arg]
    i = 0
    while True:
        print(f"drip {i}", flush=True)
        i += 1
        time.sleep(params.get("interval", 0.2))


# -- output abuse -----------------------------------------------------------------------------------


def probe_flood(params: dict) -> dict:  # type: ignore[type-arg]
    total, mode = params.get("bytes", 100 << 20), params.get("mode", "lines")
    out = sys.stderr.buffer if params.get("stream") == "stderr" else sys.stdout.buffer
    other = sys.stdout if params.get("stream") == "stderr" else sys.stderr
    other.write("other stream: first\n")
    other.flush()
    line = (b"A" * 1023 + b"\n") if mode == "lines" else b"B" * (1 << 20)
    written = 0
    while written < total:
        out.write(line)
        written += len(line)
    if mode == "giant":
        out.write(b"\n")
    out.flush()
    other.write("other stream: last\n")
    other.flush()
    return {}


def probe_bigwrite(params: dict) -> dict:  # type: ignore[type-arg]
    """One write of ``bytes`` to stdout: ``text`` through Python's -u text layer, ``os`` one write(2)
    whose return value goes to stderr."""
    size = params.get("bytes", 200_000)
    if params.get("mode", "text") == "os":
        sys.stderr.write(f"write returned {os.write(1, b'x' * size)}\n")
    else:
        sys.stdout.write("x" * size)
        sys.stdout.flush()
    return {}


def probe_badutf8(params: dict) -> dict:  # type: ignore[type-arg]
    for stream in (sys.stdout.buffer, sys.stderr.buffer):
        stream.write(b"valid \xff\xfe\xc3 broken \xed\xa0\x80 surrogate \xf0\x9f\x98\n\x00nul\n")
        stream.flush()
    return {}


# -- host exposure ----------------------------------------------------------------------------------


def probe_host(params: dict) -> dict:  # type: ignore[type-arg]
    obs: dict[str, object] = {}
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                 "/var/run/containerd/containerd.sock", "/run/runc", "/var/lib/docker"):
        obs[f"exists {path}"] = os.path.exists(path)
    found = []
    for top in ("/run", "/var/run", "/tmp", "/dev", "/opt"):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    if (os.lstat(p).st_mode & 0o170000) == 0o140000:
                        found.append(p)
                except OSError:
                    pass
    obs["unix sockets found"] = found
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        try:
            with open(path, "rb") as fh:
                data = fh.read(4096)
            obs[f"read {path}"] = f"ok {len(data)} bytes"
        except OSError as exc:
            obs[f"read {path}"] = err(exc)
    for path in ("/sys/firmware", "/proc/acpi", "/proc/scsi"):
        try:
            obs[f"list {path}"] = f"ok {len(os.listdir(path))} entries"
        except OSError as exc:
            obs[f"list {path}"] = err(exc)
    obs["env"] = dict(os.environ)
    listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    obs["fds"] = sorted(fd for fd in listed if attempt(lambda fd=fd: os.fstat(fd) and None) == "ok")  # not listdir's
    obs["open /proc/self/exe for writing"] = attempt(lambda: os.close(os.open("/proc/self/exe", os.O_WRONLY)))
    obs["open /proc/1/exe for writing"] = attempt(lambda: os.close(os.open("/proc/1/exe", os.O_WRONLY)))
    with open("/proc/version") as fh:
        obs["kernel"] = fh.read().strip()
    return obs


# -- lingering --------------------------------------------------------------------------------------


def probe_linger(params: dict) -> dict:  # type: ignore[type-arg]
    """Double-fork daemons (new session, signals ignored) that outlive the tool's main process."""
    marker = params["marker"]
    for _ in range(params.get("daemons", 3)):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for fd in (0, 1, 2):
                    os.close(fd)
                os.execv("/usr/bin/python3", ["python3", "-c",
                                              "import signal,time\n"
                                              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                              "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
                                              "time.sleep(600)", marker])
            os._exit(0)
        os.wait()
    time.sleep(params.get("hold", 0))
    return {"daemons": params.get("daemons", 3)}


def probe_killall(params: dict) -> dict:  # type: ignore[type-arg]
    """kill(-1, SIGKILL): every process this uid may signal.  Inside the sandbox that is only the sandbox."""
    sibling = os.fork()
    if sibling == 0:
        time.sleep(60)
        os._exit(0)
    obs: dict[str, object] = {"kill(-1, SIGKILL)": attempt(lambda: os.kill(-1, signal.SIGKILL))}
    _, status = os.waitpid(sibling, 0)
    obs["sibling killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    obs["kill(1, SIGKILL)"] = attempt(lambda: os.kill(1, signal.SIGKILL))
    obs["visible pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return obs


PROBES = {name[len("probe_"):]: fn for name, fn in globals().items() if name.startswith("probe_")}


def main() -> int:
    args = globals()["PROBE_ARGS"]
    obs = PROBES[args["probe"]](args.get("params", {}))
    if obs:
        emit(obs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
