"""The OCI backend against real runc: isolation, limits, signals, secrets, pools, clean-up and the crash sweep.

Needs root, runc, tini-static and the Docker engine's ``toolcell/python:bookworm`` (unpacked once per
session into a temporary rootfs store with ``unpack_docker_image``). Missing any of them FAILS the
test: containment is never mocked. Every test's sandboxes are recorded as an owner of its own; its
teardown checks nothing of that owner is left (bundles, runc state, cgroups, processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from toolcell.backends.attach import QUEUE_CHUNKS, RECV_BYTES
from toolcell.backends.base import ExitInfo
from toolcell.backends.oci import OciBackend, OciSandbox, unpack_docker_image
from toolcell.backends.oci.bundle import MASKED_PATHS
from toolcell.backends.oci.cgroups import TOP, safe_component
from toolcell.errors import BackendError, ConfigError, EngineUnavailable, ImageMissing
from toolcell.model import SecretGrant, Tool, Usage
from toolcell.policy.network import EgressGrant
from toolcell.policy.profile import IsolationProfile, MiB, Mount
from toolcell.policy.spec import NO_SECRETS, SandboxSpec, Secrets, compile_spec

IMAGE = os.environ.get("TOOLCELL_TEST_IMAGE", "toolcell/python:bookworm")
SECCOMP_JSON = (Path(__file__).resolve().parents[2] / "runtime" / "data" / "seccomp-default.json").read_text()
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for binary in ("runc", "docker"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is required for the OCI backend tests (run scripts/setup.sh)")
    if not os.access("/usr/bin/tini-static", os.X_OK):
        pytest.fail("/usr/bin/tini-static (Debian's tini) is required for the OCI backend tests")
    if os.geteuid() != 0:
        pytest.fail("the OCI backend tests need root (runc, cgroups)")
    directory = tmp_path_factory.mktemp("oci-store")
    try:
        unpack_docker_image(IMAGE, directory)
    except Exception as exc:
        pytest.fail(f"cannot unpack {IMAGE} from the Docker engine: {exc}")
    return directory


@dataclasses.dataclass
class Harness:
    backend: OciBackend
    owner: str
    state: Path
    store: Path

    def spec(self, code: str, *, profile: IsolationProfile | None = None,
             secrets: tuple[SecretGrant, ...] = (), command: tuple[str, ...] | None = None) -> SandboxSpec:
        tool = Tool(name="probe", description="", image=IMAGE, command=command or ("python3", "-c", code),
                    secrets=secrets)
        return compile_spec(tool, profile or IsolationProfile(), invocation_id=uuid.uuid4().hex,
                            owner=self.owner, seccomp_json=SECCOMP_JSON, environ={})

    def new_backend(self) -> OciBackend:
        return OciBackend(runtime_path="runc", store_dir=str(self.store), state_dir=str(self.state))


def leftovers(h: Harness, sandbox_ids: set[str] | None = None) -> list[str]:
    """Everything of the harness's owner still on the host."""
    owner_dirs = [p / TOP / safe_component(h.owner) for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    left = [str(d / e) for d in owner_dirs if d.is_dir() for e in os.listdir(d) if (d / e).is_dir()]
    for directory in (h.state / "bundles", h.state / "runc"):
        if directory.is_dir():
            left += [str(directory / e) for e in os.listdir(directory)]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if any(s in cmdline for s in (sandbox_ids or set())) or str(h.state) in cmdline:
            left.append(f"process {proc.pid}: {cmdline[:200]}")
    return left


@pytest.fixture
async def oci(store: Path, tmp_path: Path) -> AsyncIterator[Harness]:
    owner = f"test-oci-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    backend = OciBackend(runtime_path="runc", store_dir=str(store), state_dir=str(state))
    await backend.ping()
    harness = Harness(backend, owner, state, store)
    try:
        yield harness
        await asyncio.sleep(0)
        assert not leftovers(harness), f"left behind: {leftovers(harness)}"
    finally:
        await backend.remove_orphans(owner)
        await backend.close()


async def run(sandbox: OciSandbox, stdin: bytes = b"", secrets: Secrets = NO_SECRETS,
              remove: bool = True) -> tuple[bytes, bytes, ExitInfo, Usage]:
    try:
        await sandbox.start(stdin, secrets)
        out = {"stdout": bytearray(), "stderr": bytearray()}
        async for stream, data in sandbox.output():
            out[stream] += data
        info = await sandbox.wait()
        usage = await sandbox.usage()
        return bytes(out["stdout"]), bytes(out["stderr"]), info, usage
    finally:
        if remove:
            await sandbox.remove()


async def run_code(h: Harness, code: str, stdin: bytes = b"", **kw: Any) -> tuple[bytes, bytes, ExitInfo, Usage]:
    return await run(await h.backend.create(h.spec(code, **kw)), stdin)


# -- streams and exit statuses -----------------------------------------------------------------------------

async def test_stdin_to_stdout_both_streams_and_exit_code(oci: Harness) -> None:
    code = "import sys; d = sys.stdin.read(); print(d.upper()); print('to stderr', file=sys.stderr); sys.exit(7)"
    out, err, info, _ = await run_code(oci, code, b"hello oci")
    assert out == b"HELLO OCI\n"
    assert err == b"to stderr\n"
    assert info == ExitInfo(exit_code=7, oom_killed=False)


async def test_large_stdin_and_output_arrive_whole(oci: Harness) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    code = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d); sys.stdout.buffer.write(d)"
    out, _, info, _ = await run_code(oci, code, payload)
    assert info.exit_code == 0
    assert out == payload + payload


async def test_output_is_bounded_while_the_consumer_is_behind(oci: Harness) -> None:
    total = 64 * 1024 * 1024
    code = f"import os\nblock = b'x' * 65536\nfor _ in range({total // 65536}):\n    os.write(1, block)"
    sandbox = await oci.backend.create(oci.spec(code))
    try:
        await sandbox.start(b"")
        await asyncio.sleep(1.0)  # nobody reads: the tool must block, not the supervisor buffer it
        stream = sandbox._stream
        assert stream is not None and not stream.ended
        queued: list[Any] = list(getattr(stream._queue, "_queue"))  # noqa: B009 - asyncio.Queue's deque
        held = sum(len(item[1]) for item in queued if isinstance(item, tuple))
        assert held <= QUEUE_CHUNKS * RECV_BYTES
        received = 0
        async for _, data in sandbox.output():
            received += len(data)
        assert received == total
        assert (await sandbox.wait()).exit_code == 0
    finally:
        await sandbox.remove()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGSEGV])
async def test_a_tool_killed_by_a_signal_exits_128_plus_n(oci: Harness, signum: int) -> None:
    _, _, info, _ = await run_code(oci, f"import os; os.kill(os.getpid(), {int(signum)})")
    assert info == ExitInfo(exit_code=128 + signum, oom_killed=False)


async def test_the_tool_is_not_pid_1(oci: Harness) -> None:
    out, _, info, _ = await run_code(oci, "import os; print(os.getpid(), open('/proc/1/cmdline').read())")
    pid, init = out.decode().split(" ", 1)
    assert info.exit_code == 0 and int(pid) > 1 and init.startswith("/dev/init")


# -- limits --------------------------------------------------------------------------------------------------

async def test_oom_is_reported(oci: Harness) -> None:
    profile = IsolationProfile(memory_bytes=32 * MiB)
    _, _, info, usage = await run_code(oci, "x = bytearray(200 * 1024 * 1024); print('survived')", profile=profile)
    assert info == ExitInfo(exit_code=137, oom_killed=True)
    assert 16 * MiB < usage.peak_memory_bytes <= 32 * MiB


async def test_fork_bomb_is_stopped_by_the_pids_limit(oci: Harness) -> None:
    code = """
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as exc:
    print(n, exc.errno)
"""
    out, _, info, _ = await run_code(oci, code, profile=IsolationProfile(pids_limit=16))
    forked, errno_ = out.split()
    assert info.exit_code == 0
    assert int(errno_) == 11  # EAGAIN
    assert 0 < int(forked) < 16


async def test_usage_is_reported(oci: Harness) -> None:
    _, _, info, usage = await run_code(oci, "x = bytearray(20 * 1024 * 1024); sum(range(2_000_000))")
    assert info.exit_code == 0
    assert usage.peak_memory_bytes > 20 * MiB
    assert usage.cpu_time_ns > 10_000_000


# -- isolation ----------------------------------------------------------------------------------------------

PROBE = r"""
import errno, json, os, shutil, subprocess
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
result = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cap_eff": status["CapEff"].strip(),
          "cap_bnd": status["CapBnd"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
          "seccomp": status["Seccomp"].strip(), "net": sorted(os.listdir("/sys/class/net")),
          "lo_flags": open("/sys/class/net/lo/flags").read().strip(), "hostname": os.uname().nodename,
          "cwd": os.getcwd(), "home": os.environ.get("HOME"), "path": os.environ.get("PATH"),
          "mqueue": os.path.exists("/dev/mqueue"), "shm": os.path.exists("/dev/shm"),
          "devices": sorted(os.listdir("/dev")), "nofile": __import__("resource").getrlimit(7),
          "core": __import__("resource").getrlimit(4), "etc_hostname": open("/etc/hostname").read(),
          "localhost": __import__("socket").gethostbyname("localhost")}
try:
    open("/rootfile", "w")
except OSError as exc:
    result["write_root"] = exc.errno
shutil.copy("/bin/true", "/tmp/true")
os.chmod("/tmp/true", 0o755)
try:
    subprocess.run(["/tmp/true"])
except OSError as exc:
    result["exec_tmp"] = exc.errno
try:
    os.unshare = None
    import ctypes
    result["mount_syscall"] = ctypes.CDLL(None, use_errno=True).mount(b"none", b"/tmp", b"tmpfs", 0, None)
    result["mount_errno"] = ctypes.get_errno()
except Exception as exc:
    result["mount_exc"] = str(exc)
import stat
def masked(path):
    if not os.path.exists(path):
        return "absent"
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
        return "null"
    return "empty" if stat.S_ISDIR(st.st_mode) and not os.listdir(path) else "visible"
result["masked"] = {p: masked(p) for p in MASKED}
try:
    open("/proc/sys/kernel/hostname", "w").write("x")
except OSError as exc:
    result["proc_sys"] = exc.errno
print(json.dumps(result))
"""
PROBE = f"MASKED = {list(MASKED_PATHS)!r}\n" + PROBE


async def test_isolation_matches_the_docker_sandbox(oci: Harness) -> None:
    out, err, info, _ = await run_code(oci, PROBE)
    assert info.exit_code == 0, err
    r = json.loads(out)
    assert (r["uid"], r["gid"], r["groups"]) == (10001, 10001, [])
    assert r["cap_eff"] == r["cap_bnd"] == "0000000000000000"
    assert r["no_new_privs"] == "1"
    assert r["seccomp"] == "2"
    assert r["net"] == ["lo"]
    assert int(r["lo_flags"], 16) & 0x1  # loopback up, as under Docker's network "none"
    assert r["hostname"] == "sandbox"
    assert r["cwd"] == "/tmp" and r["home"] == "/tmp" and "/usr/bin" in r["path"]
    assert r["write_root"] == 30  # EROFS
    assert r["exec_tmp"] == 13  # EACCES: /tmp is noexec
    assert r["mount_syscall"] == -1 and r["mount_errno"] == 1  # EPERM (seccomp and no CAP_SYS_ADMIN)
    on_host = [p for p in MASKED_PATHS if os.path.exists(p)]
    assert on_host  # else the check below would prove nothing
    assert {p: r["masked"][p] for p in on_host} == {p: "null" if os.path.isfile(p) else "empty" for p in on_host}
    assert r["proc_sys"] == 30  # read-only
    assert not r["mqueue"] and not r["shm"]
    assert r["etc_hostname"] == "sandbox\n" and r["localhost"] == "127.0.0.1"  # as Docker's /etc files
    assert set(r["devices"]) >= {"null", "zero", "full", "random", "urandom", "tty", "pts", "init"}
    assert not {"sda", "vda", "kmsg", "mem"} & set(r["devices"])
    assert r["nofile"] == [IsolationProfile().nofile] * 2
    assert r["core"] == [0, 0]


async def test_read_only_mounts_and_a_missing_source(oci: Harness, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("ro data")
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o755)
    os.chmod(data / "f", 0o644)
    profile = IsolationProfile(mounts=(Mount(source=str(data), target="/data"),))
    code = "print(open('/data/f').read())\ntry:\n open('/data/g', 'w')\nexcept OSError as e:\n print(e.errno)"
    out, _, info, _ = await run_code(oci, code, profile=profile)
    assert info.exit_code == 0 and out.split() == [b"ro", b"data", b"30"]
    missing = IsolationProfile(mounts=(Mount(source=str(tmp_path / "nope"), target="/data"),))
    with pytest.raises(BackendError, match="does not exist"):
        await oci.backend.create(oci.spec("pass", profile=missing))
    assert not (tmp_path / "nope").exists()


# -- signals and kills --------------------------------------------------------------------------------------

async def test_kill_ends_a_running_tool(oci: Harness) -> None:
    sandbox = await oci.backend.create(oci.spec("import os, time; os.write(1, b'up\\n'); time.sleep(60)"))
    try:
        await sandbox.start(b"")
        chunks = sandbox.output()
        assert await anext(chunks) == ("stdout", b"up\n")
        started = time.monotonic()
        await sandbox.signal(signal.SIGKILL)
        info = await asyncio.wait_for(sandbox.wait(), 10)
        assert info == ExitInfo(exit_code=137, oom_killed=False)
        assert time.monotonic() - started < 5
        assert [c async for c in chunks] == []
    finally:
        await sandbox.remove()


async def test_sigterm_reaches_the_tool_then_kill(oci: Harness) -> None:
    code = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *a: os.write(1, b'got TERM\\n'))
os.write(1, b'ready\\n')
while True:
    time.sleep(1)
"""
    sandbox = await oci.backend.create(oci.spec(code))
    try:
        await sandbox.start(b"")
        chunks = sandbox.output()
        assert await anext(chunks) == ("stdout", b"ready\n")
        await sandbox.signal(signal.SIGTERM)
        assert await asyncio.wait_for(anext(chunks), 5) == ("stdout", b"got TERM\n")
        await sandbox.signal(signal.SIGKILL)
        assert (await asyncio.wait_for(sandbox.wait(), 10)).exit_code == 137
    finally:
        await sandbox.remove()
    await sandbox.signal(signal.SIGKILL)  # after the end: no error


async def test_remove_kills_what_runs_and_leaves_nothing(oci: Harness) -> None:
    code = "import os, time\nfor _ in range(3):\n    os.fork()\nos.write(1, b'.')\ntime.sleep(60)"
    sandbox = await oci.backend.create(oci.spec(code))
    await sandbox.start(b"")
    seen = b""
    async for _, data in sandbox.output():
        seen += data
        if len(seen) == 8:
            break
    cgroup = oci.backend.cgroup(oci.owner, sandbox.id)
    assert len(cgroup.pids()) == 9  # the init and the tool's 8 processes
    await sandbox.remove()
    await sandbox.remove()  # idempotent
    assert leftovers(oci, {sandbox.id}) == []


async def test_remove_of_a_never_started_sandbox(oci: Harness) -> None:
    sandbox = await oci.backend.create(oci.spec("pass"))
    assert await oci.backend.list_sandboxes(oci.owner) == [sandbox.id]
    await sandbox.remove()
    assert await oci.backend.list_sandboxes(oci.owner) == []


# -- secrets and pools ---------------------------------------------------------------------------------------

SECRET_CODE = "import os, sys; print(os.environ.get('TOKEN'), open('/run/secrets/key').read(), sys.stdin.read())"
GRANTS = (SecretGrant(name="token", env="TOKEN"), SecretGrant(name="key", file="/run/secrets/key"))


async def test_cold_sandbox_with_secrets(oci: Harness) -> None:
    spec = oci.spec(SECRET_CODE, secrets=GRANTS)
    assert spec.defer
    out, err, info, _ = await run(await oci.backend.create(spec), b'{"a": 1}',
                                  Secrets(env={"TOKEN": "t0k"}, files={"/run/secrets/key": "k3y"}))
    assert (out, err, info) == (b't0k k3y {"a": 1}\n', b"", ExitInfo(0, False))


async def test_secrets_for_a_tool_that_was_not_deferred_are_refused(oci: Harness) -> None:
    sandbox = await oci.backend.create(oci.spec("pass"))
    try:
        with pytest.raises(BackendError, match="secrets"):
            await sandbox.start(b"", Secrets(env={"A": "b"}))
    finally:
        await sandbox.remove()


async def test_warm_sandbox_claim_with_secrets(oci: Harness) -> None:
    ended: list[bool] = []
    sandbox = await oci.backend.create_warm(oci.spec(SECRET_CODE, secrets=GRANTS), lambda: ended.append(True))
    try:
        await asyncio.sleep(0.2)
        assert sandbox.alive
        claim = Secrets(env={"TOKEN": "w"}, files={"/run/secrets/key": "f"})
        out, err, info, usage = await run(sandbox, b"args", claim, remove=False)
        assert (out, err, info) == (b"w f args\n", b"", ExitInfo(0, False))
        assert usage.cpu_time_ns > 0
        assert not sandbox.alive and not ended
    finally:
        await sandbox.remove()


async def test_warm_sandbox_without_secrets_and_a_failing_tool(oci: Harness) -> None:
    sandbox = await oci.backend.create_warm(oci.spec("import sys; print(sys.stdin.read()); sys.exit(3)"), lambda: None)
    out, _, info, _ = await run(sandbox, b"claimed")
    assert (out, info) == (b"claimed\n", ExitInfo(3, False))


async def test_warm_sandbox_that_dies_before_its_claim(oci: Harness) -> None:
    ended = asyncio.Event()
    sandbox = await oci.backend.create_warm(oci.spec("pass"), ended.set)
    try:
        await sandbox.signal(signal.SIGKILL)
        await asyncio.wait_for(ended.wait(), 10)
        assert not sandbox.alive
        with pytest.raises(BackendError, match="ended before it was claimed"):
            await sandbox.start(b"x")
    finally:
        await sandbox.remove()


# -- configuration refusals and errors -----------------------------------------------------------------------

async def test_refusals_at_check_time(oci: Harness) -> None:
    egress = IsolationProfile(network=(EgressGrant(host="example.com"),))
    with pytest.raises(ConfigError, match=r"'probe'.*network grants need the docker engine"):
        oci.backend.check(oci.spec("pass", profile=egress))
    with pytest.raises(ConfigError, match=r"'probe'.*runsc"):
        oci.backend.check(oci.spec("pass", profile=IsolationProfile(runtime="runsc")))
    with pytest.raises(ConfigError, match="seccomp"):
        oci.backend.check(dataclasses.replace(oci.spec("pass"), seccomp_json=""))
    with pytest.raises(ConfigError, match="egress"):
        await oci.backend.create(oci.spec("pass", profile=egress))


async def test_missing_image_and_runtime(oci: Harness, tmp_path: Path) -> None:
    assert await oci.backend.has_image(IMAGE)
    assert not await oci.backend.has_image("toolcell-test/none:never")
    with pytest.raises(ImageMissing):
        await oci.backend.create(dataclasses.replace(oci.spec("pass"), image="toolcell-test/none:never"))
    broken = OciBackend(runtime_path="no-such-runc", store_dir=str(oci.store), state_dir=str(tmp_path / "s2"))
    try:
        with pytest.raises(EngineUnavailable, match="no-such-runc"):
            await broken.ping()
        with pytest.raises(EngineUnavailable, match="not installed"):
            await broken.create(oci.spec("pass"))
    finally:
        await broken.close()


# -- crash sweep --------------------------------------------------------------------------------------------

async def test_sweep_after_a_supervisor_crash(oci: Harness) -> None:
    first = oci.new_backend()
    spec = oci.spec("import os, time; os.write(1, b'up\\n'); time.sleep(60)")
    sandbox = await first.create(spec)
    await sandbox.start(b"")
    assert await anext(sandbox.output()) == ("stdout", b"up\n")
    pids = oci.backend.cgroup(oci.owner, sandbox.id).pids()
    assert pids
    # The supervisor is gone: its pipes close, nothing of it removes the sandbox.
    assert sandbox._stream is not None
    sandbox._stream.close()
    del sandbox
    await first.close()
    second = oci.new_backend()
    try:
        assert len(await second.list_sandboxes(oci.owner)) == 1
        removed = await second.remove_orphans(oci.owner)
        assert [(r.invocation_id, r.tool) for r in removed] == [(spec.identity.invocation_id, "probe")]
        assert await second.list_sandboxes(oci.owner) == []
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
        assert leftovers(oci) == []
    finally:
        await second.close()


async def test_parallel_sandboxes(oci: Harness) -> None:
    async def one(i: int) -> bytes:
        out, _, info, _ = await run_code(oci, f"print({i} * 2)")
        assert info.exit_code == 0
        return out

    started = time.monotonic()
    outs = await asyncio.gather(*(one(i) for i in range(24)))
    elapsed = time.monotonic() - started
    assert outs == [f"{i * 2}\n".encode() for i in range(24)]
    assert elapsed < 20

