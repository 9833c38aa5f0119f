"""The backend contract, run against the in-process fake, a real Docker engine and the OCI backend.

One behaviour table: each row is a tool written twice, as Python source run in the runner image
(docker, oci) and as a ``FakeProcess`` coroutine (fake). The contract tests run every row on every
backend in ``BACKENDS`` and expect the same observable result. Docker-only tests below check what only
the engine can show (hardening as the engine sees it, OOM, streaming memory, cgroup usage, errors, egress).

Engine tests fail (never skip) when no engine is reachable. Every sandbox is recorded as owner
``test-<session>-<n>``; each test's teardown checks its owner has nothing left, and the session's end
checks every Docker owner used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import engine
from toolcell.backends.base import Backend, ExitInfo, Sandbox
from toolcell.backends.docker import LABEL_OWNER, DockerBackend
from toolcell.backends.fake import Behaviour, FakeBackend, FakeProcess
from toolcell.errors import BackendError, ConfigError, EngineUnavailable, ImageMissing, RuntimeMissing
from toolcell.model import SecretGrant, Tool
from toolcell.policy.network import EgressGrant, EgressSettings
from toolcell.policy.profile import IsolationProfile, MiB
from toolcell.policy.spec import NO_SECRETS, SandboxSpec, Secrets, compile_spec, sandbox_pids

TEST_IMAGE = os.environ.get("TOOLCELL_TEST_IMAGE", "toolcell/python:bookworm")
MISSING_IMAGE = "toolcell-test/does-not-exist:never"
MISSING_RUNTIME = "toolcell-no-such-runtime"

_REPO = Path(__file__).resolve().parents[2]
_SECCOMP_FILES = (
    _REPO / "runtime" / "data" / "seccomp-default.json",  # the project's own profile, once it exists
    Path("/work/shared/reference/moby-seccomp-default.json"),
)
SESSION = f"test-{uuid.uuid4().hex[:8]}"
# The backends the contract runs on (oci: runc on bundles from a rootfs store unpacked from the Docker image).
BACKENDS = ["fake", pytest.param("docker", marks=pytest.mark.docker), pytest.param("oci", marks=pytest.mark.docker)]
ENGINE_KINDS = frozenset({"docker", "oci"})  # run the runner image's Python, not a fake behaviour
_owner_numbers = itertools.count(1)
_owners_used: set[str] = set()


def _seccomp_json() -> str:
    for path in _SECCOMP_FILES:
        if path.is_file():
            return path.read_text()
    raise AssertionError(f"no seccomp profile found at any of {_SECCOMP_FILES}")


SECCOMP_JSON = _seccomp_json()


# -- the behaviour table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Behave:
    """One tool, written for both backends."""

    code: str  # Python source for the docker runner image: python3 -c CODE
    fake: Behaviour


async def _echo(proc: FakeProcess) -> int:
    await proc.stdout(proc.stdin)
    return 0


async def _both_streams(proc: FakeProcess) -> int:
    await proc.stdout(b"to stdout\n")
    await proc.stderr(b"to stderr\n")
    return 0


async def _exit_7(proc: FakeProcess) -> int:
    await proc.stderr(b"failing\n")
    return 7


async def _large_write(proc: FakeProcess) -> int:
    await proc.stdout(b"x" * LARGE_WRITE)
    return 0


async def _sleeper(proc: FakeProcess) -> int:
    await proc.stdout(b"ready\n")
    await asyncio.sleep(60)
    return 0


async def _stubborn(proc: FakeProcess) -> int:
    proc.ignore(signal.SIGTERM)
    await proc.stdout(b"ready\n")
    await asyncio.sleep(60)
    return 0


async def _secrets(proc: FakeProcess) -> int:
    seen = {"env": proc.spec.env.get("TOKEN"), "file": proc.files.get(SECRET_FILE), "stdin": proc.stdin.decode()}
    await proc.stdout(json.dumps(seen, sort_keys=True).encode())
    return 0


SECRET_FILE = "/run/secrets/token"
SECRETS_CODE = (
    "import json, os, sys\n"
    "seen = {'env': os.environ.get('TOKEN'), 'stdin': sys.stdin.read()}\n"
    f"seen['file'] = open({SECRET_FILE!r}).read() if os.path.exists({SECRET_FILE!r}) else None\n"
    "sys.stdout.write(json.dumps(seen, sort_keys=True))"
)
SECRET_GRANTS = (SecretGrant("token-env", env="TOKEN"), SecretGrant("token-file", file=SECRET_FILE))
SECRETS = Secrets(env={"TOKEN": "s3cret-env"}, files={SECRET_FILE: "s3cret-file\n"})


# One write(2) bigger than a pipe's 64 KiB: under gVisor the container's own stdio answers it with 65,536.
LARGE_WRITE = 200_000
LARGE_WRITE_CODE = f"import os; n = os.write(1, b'x' * {LARGE_WRITE}); raise SystemExit(0 if n == {LARGE_WRITE} else 3)"

BEHAVIOURS: dict[str, Behave] = {
    "echo": Behave("import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())", _echo),
    "both-streams": Behave(
        "import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr)", _both_streams
    ),
    "exit-7": Behave("import sys; print('failing', file=sys.stderr); sys.exit(7)", _exit_7),
    "large-write": Behave(LARGE_WRITE_CODE, _large_write),
    "sleeper": Behave("import time; print('ready', flush=True); time.sleep(60)", _sleeper),
    "stubborn": Behave(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)",
        _stubborn,
    ),
    "secrets": Behave(SECRETS_CODE, _secrets),
}


@dataclass(frozen=True)
class Expect:
    stdin: bytes
    stdout: bytes
    stderr: bytes
    exit_code: int


RUNS: dict[str, Expect] = {
    "echo": Expect(b'{"text": "h\xc3\xa9llo"}', b'{"text": "h\xc3\xa9llo"}', b"", 0),
    "both-streams": Expect(b"{}", b"to stdout\n", b"to stderr\n", 0),
    "exit-7": Expect(b"{}", b"", b"failing\n", 7),
    "large-write": Expect(b"{}", b"x" * LARGE_WRITE, b"", 0),
}


# -- harness -------------------------------------------------------------------------------------


@dataclass
class Harness:
    kind: str
    backend: Backend
    owner: str

    def spec(
        self,
        behaviour: str,
        *,
        profile: IsolationProfile | None = None,
        image: str | None = None,
        code: str | None = None,
        owner: str | None = None,
        secrets: tuple[SecretGrant, ...] = (),
    ) -> SandboxSpec:
        if image is None:
            image = TEST_IMAGE if self.kind in ENGINE_KINDS else f"fake/{behaviour}"
        source = code if code is not None else BEHAVIOURS[behaviour].code
        tool = Tool(name=f"contract.{behaviour}", description="", image=image, command=("python3", "-c", source),
                    secrets=secrets)
        return compile_spec(
            tool,
            profile or IsolationProfile(),
            invocation_id=uuid.uuid4().hex,
            owner=owner or self.owner,
            seccomp_json=SECCOMP_JSON,
            environ={},
        )


def new_owner(kind: str) -> str:
    owner = f"{SESSION}-{next(_owner_numbers)}"
    if kind == "docker":
        _owners_used.add(owner)  # checked against the engine at session end
    return owner


async def _docker_backend() -> DockerBackend:
    backend = DockerBackend()
    await backend.ping()  # EngineUnavailable here fails the test: docker tests never skip
    return backend


async def _check_nothing_left(backend: Backend, owner: str) -> None:
    left = await backend.list_sandboxes(owner)
    if left:
        await backend.remove_orphans(owner)
        pytest.fail(f"sandboxes left behind by owner {owner}: {left}")


@pytest.fixture(scope="session", autouse=True)
def _session_leak_check() -> Iterator[None]:
    yield

    async def leftovers() -> dict[str, list[str]]:
        backend = DockerBackend()
        try:
            found = {owner: await backend.list_sandboxes(owner) for owner in sorted(_owners_used)}
            for owner, ids in found.items():
                if ids:
                    await backend.remove_orphans(owner)
            return {owner: ids for owner, ids in found.items() if ids}
        finally:
            await backend.close()

    if not _owners_used:
        return
    left = asyncio.run(leftovers())
    assert not left, f"sandboxes left at session end: {left}"


@pytest.fixture(scope="session")
def oci_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OCI backend's rootfs store, with the test image unpacked from the Docker engine (once a session)."""
    from toolcell.backends.oci.rootfs import unpack_docker_image

    store = tmp_path_factory.mktemp("oci-store")
    unpack_docker_image(TEST_IMAGE, store)
    return store


async def _oci_backend(request: pytest.FixtureRequest) -> Backend:
    from toolcell.backends.oci.backend import OciBackend

    store: Path = request.getfixturevalue("oci_store")
    state = Path(request.getfixturevalue("tmp_path")) / "oci-state"
    backend: Backend = OciBackend(runtime_path="runc", store_dir=str(store), state_dir=str(state))
    await backend.ping()  # a missing runtime binary fails the test: engine tests never skip
    return backend


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    owner = new_owner(request.param)
    backend: Backend
    if request.param == "fake":
        backend = FakeBackend(behaviours={f"fake/{name}": b.fake for name, b in BEHAVIOURS.items()})
    elif request.param == "oci":
        backend = await _oci_backend(request)
    else:
        backend = await _docker_backend()
    try:
        yield Harness(request.param, backend, owner)
        await _check_nothing_left(backend, owner)
    finally:
        await backend.close()


@pytest.fixture
async def docker() -> AsyncIterator[Harness]:
    owner = new_owner("docker")
    backend = await _docker_backend()
    try:
        yield Harness("docker", backend, owner)
        await _check_nothing_left(backend, owner)
    finally:
        await backend.close()


async def run_to_end(sandbox: Sandbox, stdin: bytes,
                     secrets: Secrets = NO_SECRETS) -> tuple[bytes, bytes, ExitInfo]:
    await sandbox.start(stdin, secrets)
    streams = {"stdout": bytearray(), "stderr": bytearray()}
    async for stream, data in sandbox.output():
        streams[stream] += data
    info = await sandbox.wait()
    return bytes(streams["stdout"]), bytes(streams["stderr"]), info


async def read_line(stream: AsyncIterator[tuple[str, bytes]]) -> bytes:
    seen = b""
    while b"\n" not in seen:
        _, data = await anext(stream)
        seen += data
    return seen


# -- the contract (every backend) ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RUNS))
async def test_runs_tool_and_collects_streams_and_exit_code(harness: Harness, name: str) -> None:
    expect = RUNS[name]
    sandbox = await harness.backend.create(harness.spec(name))
    try:
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, expect.stdin), 30)
        assert (stdout, stderr, info) == (expect.stdout, expect.stderr, ExitInfo(expect.exit_code, False))
        await sandbox.signal(signal.SIGTERM)  # already exited: not an error
    finally:
        await sandbox.remove()


async def test_sigterm_ends_a_sleeper(harness: Harness) -> None:
    sandbox = await harness.backend.create(harness.spec("sleeper"))
    try:
        await sandbox.start(b"{}")
        output = sandbox.output()
        assert await asyncio.wait_for(read_line(output), 30) == b"ready\n"
        await sandbox.signal(signal.SIGTERM)
        info = await asyncio.wait_for(sandbox.wait(), 10)
        assert info == ExitInfo(128 + signal.SIGTERM, False)
        assert [chunk async for chunk in output] == []
    finally:
        await sandbox.remove()


async def test_sigterm_then_sigkill_ends_a_sleeper_that_ignores_sigterm(harness: Harness) -> None:
    sandbox = await harness.backend.create(harness.spec("stubborn"))
    try:
        await sandbox.start(b"{}")
        output = sandbox.output()
        assert await asyncio.wait_for(read_line(output), 30) == b"ready\n"
        waiter = asyncio.ensure_future(sandbox.wait())
        await sandbox.signal(signal.SIGTERM)
        done, _ = await asyncio.wait({waiter}, timeout=0.5)
        assert not done, "a tool that ignores SIGTERM must survive it"
        await sandbox.signal(signal.SIGKILL)
        info = await asyncio.wait_for(waiter, 10)
        assert info == ExitInfo(128 + signal.SIGKILL, False)
    finally:
        await sandbox.remove()


async def test_remove_is_idempotent_and_leaves_nothing(harness: Harness) -> None:
    backend = harness.backend
    never_started = await backend.create(harness.spec("echo"))
    ran = await backend.create(harness.spec("echo"))
    assert sorted(await backend.list_sandboxes(harness.owner)) == sorted([never_started.id, ran.id])
    await run_to_end(ran, b"{}")
    for sandbox in (never_started, ran):
        await sandbox.remove()
        await sandbox.remove()
    assert await backend.list_sandboxes(harness.owner) == []


async def test_remove_orphans_removes_only_the_owners_sandboxes(harness: Harness) -> None:
    backend = harness.backend
    orphan_owner = new_owner(harness.kind)
    running = await backend.create(harness.spec("sleeper", owner=orphan_owner))
    await running.start(b"{}")
    await backend.create(harness.spec("echo", owner=orphan_owner))
    mine = await backend.create(harness.spec("echo"))
    try:
        assert len(await backend.remove_orphans(orphan_owner)) == 2
        assert await backend.list_sandboxes(orphan_owner) == []
        assert await backend.list_sandboxes(harness.owner) == [mine.id]
    finally:
        await mine.remove()


async def test_missing_image_is_image_missing(harness: Harness) -> None:
    with pytest.raises(ImageMissing) as caught:
        await harness.backend.create(harness.spec("echo", image=MISSING_IMAGE))
    assert caught.value.image == MISSING_IMAGE


async def test_missing_runtime_is_refused_naming_it(harness: Harness) -> None:
    """By ``check`` at configuration time where the backend knows its runtimes (oci), else by ``create``."""
    spec = harness.spec("echo", profile=IsolationProfile().with_runtime(MISSING_RUNTIME))
    try:
        harness.backend.check(spec)
    except ConfigError as exc:
        assert MISSING_RUNTIME in str(exc)
        with pytest.raises(ConfigError):
            await harness.backend.create(spec)
        return
    with pytest.raises(RuntimeMissing) as caught:
        await harness.backend.create(spec)
    assert caught.value.runtime == MISSING_RUNTIME


@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled"])
async def test_granted_secrets_arrive_with_start(harness: Harness, pooled: bool) -> None:
    """A deferred spec's tool is spawned by its start, with the start's secrets: env, and files in its scratch."""
    spec = harness.spec("secrets", secrets=SECRET_GRANTS)
    assert spec.defer and "/run/secrets" in [s.path for s in spec.scratch]
    await secrets_arrive(harness, spec, pooled)


async def secrets_arrive(harness: Harness, spec: SandboxSpec, pooled: bool) -> None:
    """Start ``spec`` (cold or pooled) with the test secrets: the tool sees them, and its stdin."""
    sandbox = await (harness.backend.create_warm(spec, lambda: None) if pooled else harness.backend.create(spec))
    try:
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b'{"a": 1}', SECRETS), 60)
    finally:
        await sandbox.remove()
    assert info == ExitInfo(0, False), stderr[-500:]
    assert json.loads(stdout) == {"env": "s3cret-env", "file": "s3cret-file\n", "stdin": '{"a": 1}'}


async def test_secrets_for_a_spec_without_defer_are_refused(harness: Harness) -> None:
    sandbox = await harness.backend.create(harness.spec("echo"))
    try:
        with pytest.raises(BackendError):
            await sandbox.start(b"{}", SECRETS)
    finally:
        await sandbox.remove()


# -- docker only ---------------------------------------------------------------------------------


@pytest.mark.docker
async def test_engine_sees_the_hardening(docker: Harness) -> None:
    spec = docker.spec("echo")
    sandbox = await docker.backend.create(spec)
    try:
        assert isinstance(docker.backend, DockerBackend)
        attrs = await docker.backend.inspect(sandbox.id)
        host, config = attrs["HostConfig"], attrs["Config"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert not host.get("CapAdd")
        # No egress: the engine allocates no network; the runtime's own namespace holds only loopback.
        assert config["NetworkDisabled"] is True and not attrs["NetworkSettings"]["Networks"]
        assert host["Memory"] == host["MemorySwap"] == spec.memory_bytes
        assert host["NanoCpus"] == int(spec.cpus * 1e9)
        assert host["PidsLimit"] == sandbox_pids("runc", spec.pids)[0] == spec.pids
        assert host["Init"] is True
        assert host["IpcMode"] == "none"  # own IPC namespace, no /dev/shm
        assert host["CgroupnsMode"] == "private"
        assert host["LogConfig"]["Type"] == "none"
        assert host["Runtime"] == "runc"
        assert host["AutoRemove"] is False
        assert host["Privileged"] is False
        assert host["Tmpfs"] == {
            "/tmp": f"rw,noexec,nosuid,nodev,size={IsolationProfile().tmpfs_bytes},mode=1777",
            "/dev/mqueue": "ro,noexec,nosuid,nodev,size=4k,mode=0555",  # the engine's writable mqueue, covered
        }
        ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
        assert ulimits == {"nofile": (spec.nofile, spec.nofile), "core": (0, 0)}
        security = host["SecurityOpt"]
        assert "no-new-privileges" in security
        seccomp = [opt.removeprefix("seccomp=") for opt in security if opt.startswith("seccomp=")]
        assert len(seccomp) == 1 and json.loads(seccomp[0]) == json.loads(SECCOMP_JSON)
        assert config["User"] == spec.user
        assert config["Tty"] is False and config["OpenStdin"] is True and config["StdinOnce"] is True
        assert config["Labels"] == {**config["Labels"], "io.toolcell.managed": "true", LABEL_OWNER: docker.owner,
                                    "io.toolcell.invocation": spec.identity.invocation_id,
                                    "io.toolcell.tool": "contract.echo", "io.toolcell.profile": "default"}
        env = dict(item.split("=", 1) for item in config["Env"])  # the spec's env over the image's
        assert env == {**env, **spec.env}
        assert not any("proxy" in name.lower() for name in env)
    finally:
        await sandbox.remove()


@pytest.mark.docker
@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled"])
async def test_secret_files_live_in_the_sandbox_only(docker: Harness, pooled: bool) -> None:
    """No host file, no bind mount: the launcher writes them (0400, the tool's user) into a 0700 tmpfs."""
    code = (f"import json, os; st, d = os.stat({SECRET_FILE!r}), os.stat('/run/secrets')\n"
            "print(json.dumps([oct(st.st_mode & 0o7777), st.st_uid, oct(d.st_mode & 0o7777), d.st_uid,"
            " os.listdir('/run/secrets')]))")
    spec = docker.spec("secret-files", code=code, secrets=SECRET_GRANTS)
    sandbox = await (docker.backend.create_warm(spec, lambda: None) if pooled else docker.backend.create(spec))
    try:
        assert isinstance(docker.backend, DockerBackend)
        attrs = await docker.backend.inspect(sandbox.id)
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b"{}", SECRETS), 60)
    finally:
        await sandbox.remove()
    assert info == ExitInfo(0, False), stderr[-500:]
    assert json.loads(stdout) == ["0o400", 10001, "0o700", 10001, ["token"]]
    assert [m for m in attrs["Mounts"] if m["Destination"].startswith("/run/secrets")] == []
    assert attrs["HostConfig"]["Tmpfs"]["/run/secrets"] == \
        "rw,noexec,nosuid,nodev,size=1048576,mode=700,uid=10001,gid=10001"
    assert "s3cret" not in json.dumps(attrs)  # not in the engine's record either (env, command, labels)


EGRESS_PROBE = r"""
import json, os, socket
phost, _, pport = os.environ["HTTPS_PROXY"].removeprefix("http://").partition(":")
s = socket.create_connection((phost, int(pport)), timeout=5)
s.sendall(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
print(json.dumps({"status": s.recv(100).split(b" ")[1].decode(), "ifaces": sorted(os.listdir("/sys/class/net"))}))
"""


@pytest.mark.docker
async def test_egress_is_the_sandboxs_own_network_and_proxy_gone_with_it(docker: Harness) -> None:
    """create() opens the network and proxy, remove() closes them and reports the proxy's accounting."""
    owner = new_owner("docker")
    backend = DockerBackend(egress=EgressSettings(image=TEST_IMAGE), proxy_seccomp_json=SECCOMP_JSON)
    try:
        profile = IsolationProfile().with_network(EgressGrant("allowed.test"))
        spec = docker.spec("egress", code=EGRESS_PROBE, profile=profile, owner=owner)
        sandbox = await backend.create(spec)
        try:
            attrs = await backend.inspect(sandbox.id)
            stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b"{}"), 60)
        finally:
            await sandbox.remove()
        assert info == ExitInfo(0, False), stderr[-500:]
        assert json.loads(stdout) == {"status": "403", "ifaces": ["eth0", "lo"]}
        [network] = attrs["NetworkSettings"]["Networks"]
        assert network.startswith("toolcell-egress-") and not attrs["Config"].get("NetworkDisabled")
        assert [(d.host, d.port, d.allowed, d.reason, d.connections) for d in sandbox.egress] == [
            ("denied.test", 443, False, "not-granted", 1)]
        client = engine()
        labelled = {"label": f"{LABEL_OWNER}={owner}"}
        assert client.containers.list(all=True, filters=labelled) == []  # the proxy went with the sandbox
        assert [n.name for n in client.networks.list(filters=labelled)] == [f"toolcell-egress-{owner}"]
        await backend.remove_orphans(owner)  # the upstream network is the owner's, swept with it
        assert client.networks.list(filters=labelled) == []
    finally:
        await backend.close()


@pytest.mark.docker
@pytest.mark.parametrize("network_disabled", [True, False], ids=["network-disabled", "network-none"])
async def test_the_baseline_cycle_runs_both_ways(docker: Harness, network_disabled: bool) -> None:
    """The bench's raw cycle, with NetworkDisabled and with the older ``network_mode: none``."""
    assert isinstance(docker.backend, DockerBackend)
    cycle = functools.partial(docker.backend.baseline_cycle, docker.spec("echo"), b"hello",
                              network_disabled=network_disabled)
    code, received = await asyncio.to_thread(cycle)
    assert (code, received) == (0, 8 + len(b"hello"))  # one frame: 8-byte header + the echo


@pytest.mark.docker
async def test_the_kernel_enforces_the_hardening(docker: Harness) -> None:
    """Probe from inside: the same checks would pass unhardened only if the probe were broken."""
    code = (
        "import json\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "try:\n"
        "    open('/probe', 'w')\n"
        "    root = 'writable'\n"
        "except OSError as e:\n"
        "    root = e.errno\n"
        "import os\n"
        "net = {'netns': os.readlink('/proc/self/ns/net'), 'ifaces': sorted(os.listdir('/sys/class/net'))}\n"
        "print(json.dumps({k: status[k].strip() for k in ('NoNewPrivs', 'Seccomp', 'CapEff', 'Uid')} | {'root': root}"
        " | net))"
    )
    sandbox = await docker.backend.create(docker.spec("probe", code=code))
    try:
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b""), 30)
    finally:
        await sandbox.remove()
    assert info.exit_code == 0, stderr
    seen = json.loads(stdout)
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2"  # filter mode
    assert int(seen["CapEff"], 16) == 0
    assert seen["Uid"].split()[0] == "10001"
    assert seen["root"] == 30  # EROFS
    # NetworkDisabled: the runtime's own new network namespace (not the host's), holding only loopback.
    assert seen["netns"] != os.readlink("/proc/self/ns/net") and seen["ifaces"] == ["lo"]


@pytest.mark.docker
async def test_memory_hog_is_oom_killed(docker: Harness) -> None:
    profile = IsolationProfile().with_memory(64 * MiB)
    sandbox = await docker.backend.create(docker.spec("hog", profile=profile, code="x = b'x' * (512 << 20)"))
    try:
        _, _, info = await asyncio.wait_for(run_to_end(sandbox, b""), 60)
    finally:
        await sandbox.remove()
    assert info == ExitInfo(128 + signal.SIGKILL, True)


@pytest.mark.docker
async def test_50_mib_streams_through_in_bounded_memory(docker: Harness) -> None:
    total = 50 * MiB
    code = "import sys\nb = b'x' * 65536\nfor _ in range(800):\n    sys.stdout.buffer.write(b)"
    sandbox = await docker.backend.create(docker.spec("flood", code=code))
    me = psutil.Process()
    try:
        await sandbox.start(b"")
        await asyncio.sleep(1.0)  # a slow consumer: the tool must block, not our memory grow
        baseline = me.memory_info().rss
        peak, received, chunks = baseline, 0, 0
        async for stream, data in sandbox.output():
            assert stream == "stdout"
            received += len(data)
            chunks += 1
            if chunks % 32 == 0:
                peak = max(peak, me.memory_info().rss)
                await asyncio.sleep(0)
        info = await sandbox.wait()
    finally:
        await sandbox.remove()
    assert info.exit_code == 0
    assert received == total
    assert peak - baseline < 8 * MiB, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"


@pytest.mark.docker
async def test_usage_reports_peak_memory_and_cpu(docker: Harness) -> None:
    # Spin on CPU time, not wall time: on a loaded machine wall time buys less CPU. Then idle briefly
    # so the 50 ms sampler sees the final figures before the cgroup disappears at exit.
    code = ("import time\nx = b'x' * (40 << 20)\nwhile time.process_time() < 1.0:\n    pass\n"
            "time.sleep(0.3)")
    sandbox = await docker.backend.create(docker.spec("busy", code=code))
    try:
        _, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b""), 30)
        usage = await sandbox.usage()
    finally:
        await sandbox.remove()
    assert info.exit_code == 0, stderr
    assert usage.peak_memory_bytes >= 40 * MiB
    assert usage.cpu_time_ns >= 500_000_000


@pytest.mark.docker
async def test_unreachable_engine_is_engine_unavailable_naming_the_socket(docker: Harness) -> None:
    backend = DockerBackend(base_url="unix:///nonexistent.sock")
    try:
        with pytest.raises(EngineUnavailable, match=r"/nonexistent\.sock"):
            await backend.ping()
        with pytest.raises(EngineUnavailable, match=r"/nonexistent\.sock"):
            await backend.create(docker.spec("echo"))
    finally:
        await backend.close()


@pytest.mark.docker
async def test_output_from_a_fast_tool_is_not_lost(docker: Harness) -> None:
    """Attach happens before start, so a tool that prints and exits at once loses nothing."""
    for _ in range(3):
        sandbox = await docker.backend.create(docker.spec("fast", code="print('x' * 100000)"))
        try:
            stdout, _, info = await asyncio.wait_for(run_to_end(sandbox, b""), 30)
        finally:
            await sandbox.remove()
        assert (info.exit_code, len(stdout)) == (0, 100001)


@pytest.mark.docker
async def test_calls_stay_off_the_event_loop(docker: Harness) -> None:
    """While a sandbox runs and is waited on, the loop keeps ticking (no blocking SDK call on it)."""
    sandbox = await docker.backend.create(docker.spec("sleeper"))
    try:
        await sandbox.start(b"")
        waiter = asyncio.ensure_future(sandbox.wait())
        worst, last = 0.0, time.monotonic()
        for _ in range(20):
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst, last = max(worst, now - last), now
        await sandbox.signal(signal.SIGKILL)
        await asyncio.wait_for(waiter, 10)
    finally:
        await sandbox.remove()
    assert worst < 0.1


@pytest.mark.docker
async def test_runsc_runs_the_tool_under_gvisor(docker: Harness) -> None:
    """A profile asking for runsc gets gVisor's kernel (its /proc/version is not the host's)."""
    code = "import sys; sys.stdout.write(open('/proc/version').read() + sys.stdin.read())"
    spec = docker.spec("gvisor", code=code, profile=IsolationProfile().with_runtime("runsc"))
    try:
        sandbox = await docker.backend.create(spec)
    except RuntimeMissing:
        pytest.skip("the engine has no runsc runtime (scripts/setup.sh registers it when installed)")
    try:
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b"{}"), 60)
    finally:
        await sandbox.remove()
    assert info.exit_code == 0, stderr
    version, _, echoed = stdout.decode().rpartition("\n")
    assert echoed == "{}"
    assert version.strip() != Path("/proc/version").read_text().strip()


@pytest.mark.docker
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda e, r: e.ImageNotFound("No such image: x", explanation="No such image: x"), ImageMissing),
        (lambda e, r: e.APIError("400", explanation="Unknown runtime specified x"), RuntimeMissing),
        (lambda e, r: e.APIError("500", explanation="read unix @->/run/x.sock: connection reset by peer"), None),
        (lambda e, r: r.ConnectionError("Connection aborted."), EngineUnavailable),
        (lambda e, r: r.ReadTimeout("Read timed out."), EngineUnavailable),
        (lambda e, r: ConnectionResetError(104, "Connection reset by peer"), EngineUnavailable),
        (lambda e, r: e.APIError("409", explanation="Conflict. The container name is in use"), BackendError),
    ],
)
async def test_engine_errors_are_translated_at_the_seam(make: Any, expected: type[Exception] | None) -> None:
    """The engine-gone cases can't be provoked safely on a shared engine, so the table is checked directly."""
    import docker.errors  # the SDK's own exceptions, as the backend (its only importer in runtime/) sees them
    import requests.exceptions

    backend = DockerBackend(base_url="unix:///run/toolcell-test.sock")
    try:
        exc = make(docker.errors, requests.exceptions)
        if expected is None:  # a 5xx "connection reset": the engine went away mid-call
            exc.response = type("R", (), {"status_code": 500, "reason": "Internal Server Error"})()
            expected = EngineUnavailable
        translated = backend._translate(exc, image="x", runtime="x")
        assert type(translated) is expected
        if expected is EngineUnavailable:
            assert "/run/toolcell-test.sock" in str(translated)
        if expected is BackendError:
            assert "name is in use" in str(translated)
    finally:
        await backend.close()


@pytest.mark.docker
async def test_a_sandbox_that_cannot_start_is_a_backend_error_and_still_removable(docker: Harness) -> None:
    spec = dataclasses.replace(docker.spec("echo"), user="toolcell-no-such-user")
    sandbox = await docker.backend.create(spec)
    try:
        with pytest.raises(BackendError, match="toolcell-no-such-user"):
            await sandbox.start(b"{}")
        assert [chunk async for chunk in sandbox.output()] == []
    finally:
        await sandbox.remove()
        await sandbox.remove()


@pytest.mark.docker
async def test_a_missing_command_is_exit_127_from_init(docker: Harness) -> None:
    """With ``init`` the container starts (tini is PID 1); tini reports the failed exec as 127."""
    spec = dataclasses.replace(docker.spec("echo"), command=("/nonexistent/tool",))
    sandbox = await docker.backend.create(spec)
    try:
        _, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b"{}"), 30)
    finally:
        await sandbox.remove()
    assert info == ExitInfo(127, False)
    assert b"/nonexistent/tool" in stderr


# -- both OCI runtimes -----------------------------------------------------------------------------


def _require_runtime(runtime: str) -> None:
    if runtime not in engine().info().get("Runtimes", {}):
        pytest.skip(f"the engine has no {runtime!r} runtime (scripts/setup.sh registers runsc where installed)")


# (python flags, code): one write(2) of 200,000 bytes, and sys.stdout.write with and without ``-u`` (as
# python.run runs): measured under runsc before the relay, all three delivered 65,536 bytes and exited 0.
LARGE_WRITERS = {
    "os.write": ((), LARGE_WRITE_CODE),
    "python -u sys.stdout.write": (("-u",), f"import sys; sys.stdout.write('x' * {LARGE_WRITE})"),
    "python sys.stdout.write": ((), f"import sys; sys.stdout.write('x' * {LARGE_WRITE})"),
}


@pytest.mark.docker
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
@pytest.mark.parametrize("writer", sorted(LARGE_WRITERS))
@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled"])
async def test_one_large_write_arrives_whole(docker: Harness, runtime: str, writer: str, pooled: bool) -> None:
    """Measured before the relay, under runsc: 65,536 of the 200,000 bytes arrived, and exit 0."""
    _require_runtime(runtime)
    flags, code = LARGE_WRITERS[writer]
    spec = dataclasses.replace(docker.spec("large-write", profile=IsolationProfile().with_runtime(runtime)),
                               command=("python3", *flags, "-c", code))
    assert isinstance(docker.backend, DockerBackend)
    sandbox: Sandbox = (await docker.backend.create_warm(spec, lambda: None) if pooled
                        else await docker.backend.create(spec))
    try:
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b"{}"), 60)
    finally:
        await sandbox.remove()
    assert (len(stdout), stdout.strip(b"x"), info) == (LARGE_WRITE, b"", ExitInfo(0, False)), stderr[-500:]


@pytest.mark.docker
async def test_without_the_relay_runsc_cuts_one_large_write(docker: Harness) -> None:
    """The deny side: the same tool on gVisor's own container stdio is told 65,536 and exits 0 (if this ever
    fails, this gVisor build writes whole and the relay is no longer needed)."""
    _require_runtime("runsc")
    spec = docker.spec("large-write", profile=IsolationProfile().with_runtime("runsc"))
    assert isinstance(docker.backend, DockerBackend)
    sandbox = await docker.backend._create(spec)  # the spec as it is, without the relay create() adds
    try:
        stdout, _, info = await asyncio.wait_for(run_to_end(sandbox, b"{}"), 60)
    finally:
        await sandbox.remove()
    assert len(stdout) < LARGE_WRITE and info.exit_code == 3  # the tool saw the short count


@pytest.mark.docker
@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled"])
async def test_secrets_arrive_under_gvisor_through_the_relay(docker: Harness, pooled: bool) -> None:
    """runsc: the deferred launcher also relays the tool's output (``--defer --relay``)."""
    _require_runtime("runsc")
    spec = docker.spec("secrets", secrets=SECRET_GRANTS, profile=IsolationProfile().with_runtime("runsc"))
    await secrets_arrive(docker, spec, pooled)


@pytest.mark.docker
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_exit_codes_and_signals_reach_us_through_the_relay(docker: Harness, runtime: str) -> None:
    """Under runsc the tool runs behind the launcher's relay: its status and its signals are unchanged."""
    _require_runtime(runtime)
    profile = IsolationProfile().with_runtime(runtime)
    failing = await docker.backend.create(docker.spec("exit-7", profile=profile))
    stubborn = await docker.backend.create(docker.spec("stubborn", profile=profile))
    try:
        assert await asyncio.wait_for(run_to_end(failing, b"{}"), 60) == (b"", b"failing\n", ExitInfo(7, False))
        await stubborn.start(b"{}")
        output = stubborn.output()
        assert await asyncio.wait_for(read_line(output), 60) == b"ready\n"
        waiter = asyncio.ensure_future(stubborn.wait())
        await stubborn.signal(signal.SIGTERM)  # forwarded to the tool, which ignores it
        done, _ = await asyncio.wait({waiter}, timeout=0.5)
        assert not done, "a tool that ignores SIGTERM must survive it"
        await stubborn.signal(signal.SIGKILL)
        assert await asyncio.wait_for(waiter, 10) == ExitInfo(128 + signal.SIGKILL, False)
    finally:
        await failing.remove()
        await stubborn.remove()


@pytest.mark.docker
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_the_engine_enforces_the_tools_own_pids_limit(docker: Harness, runtime: str) -> None:
    """The profile's pids bound the tool's tasks (fork fails with EAGAIN) and 4 processes run at 64."""
    _require_runtime(runtime)
    code = (
        "import json, os, time\n"
        "kids = []\n"
        "for _ in range(4):\n"  # four processes doing work: must run
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        sum(range(200000)); os._exit(0)\n"
        "    kids.append(pid)\n"
        "four = [os.waitpid(p, 0)[1] for p in kids]\n"
        "kids, result = [], 'ok'\n"
        "for _ in range(1000):\n"  # then a fork bomb: must fail forks, not the sandbox
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        result = e.strerror; break\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "    kids.append(pid)\n"
        "for p in kids: os.kill(p, 9)\n"
        "for p in kids: os.waitpid(p, 0)\n"
        "print(json.dumps({'four': four, 'forked': len(kids), 'result': result}))\n"
    )
    # gVisor charges each guest process ~5 MiB of host memory (64 forked Pythons peaked at ~320 MB): at the
    # default 256 MiB the memory cgroup stops the bomb first (status oom); here the pids limit must.
    profile = IsolationProfile().with_runtime(runtime).with_pids_limit(64).with_memory(512 * MiB)
    spec = docker.spec("pids", code=code, profile=profile)
    sandbox = await docker.backend.create(spec)
    try:
        assert isinstance(docker.backend, DockerBackend)
        host = (await docker.backend.inspect(sandbox.id))["HostConfig"]
        stdout, stderr, info = await asyncio.wait_for(run_to_end(sandbox, b""), 90)
    finally:
        await sandbox.remove()
    assert info == ExitInfo(0, False), stderr[-500:]
    seen = json.loads(stdout)
    assert seen["four"] == [0, 0, 0, 0]
    assert seen["result"] == "Resource temporarily unavailable" and 50 <= seen["forked"] < 64
    ulimits = {u["Name"]: u["Hard"] for u in host["Ulimits"]}
    pids_limit, nproc = sandbox_pids(runtime, spec.pids)
    assert (host["PidsLimit"], ulimits.get("nproc")) == (pids_limit, nproc or None)
