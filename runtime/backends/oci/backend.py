"""``OciBackend``: each sandbox is one ``runc run`` on a bundle of its own, with no daemon in between.

One sandbox's life, and what it costs::

    create   (one thread hop) the image's unpacked rootfs looked up in the store (``rootfs.py``), the
             spec translated (``bundle.py``, seccomp by ``policy.seccomp_oci``, cached per profile),
             <state>/bundles/<id>/{identity.json,config.json} written, the parent cgroups made with
             the limits (``cgroups.py``: a few mkdir/writes)
    start    ``runc --root <state>/runc run --bundle <bundle> <id>`` spawned with three host pipes as its
             stdio, which runc hands to the container (``stream.py``); stdin written and closed. The
             only process spawned per call is runc itself (its own ``runc init`` aside)
    output   the pipes, read on the event loop, bounded
    wait     a pidfd on ``runc run`` (no thread): its exit status is the init's (tini: the tool's,
             128+N for signal N); then the parent cgroups' OOM count and usage (one thread hop)
    remove   runc has already deleted its container and cgroup when ``runc run`` ends; the parents and
             the bundle go (one thread hop); ``runc delete --force`` only when runc's state survived

Every sandbox has tini (static, bind-mounted read-only at /dev/init) as pid 1: it reaps, and forwards
signals to the tool's process group. ``signal(SIGKILL)`` kills the pid namespace's init through a pidfd
(checked to be in our cgroup, so a recycled pid is never hit), then anything left in the cgroups;
other signals go to ``runc run``, which forwards them to the init.

Secrets (``spec.defer``) and pooled sandboxes use the in-sandbox launcher exactly as the Docker
backend's attach transport: the claim envelope on stdin, the status as a trailer on stdout and stderr.

A crashed supervisor leaves runc's state, bundles, cgroups and possibly running sandboxes; each
sandbox's id carries its owner's tag and its bundle its ``Identity``, so ``remove_orphans(owner)``
finds and removes all of them.

Not (yet) offered, refused by ``check`` with a ``ConfigError`` naming the tool: egress (network grants
need the Docker backend's networks and proxy), and the runsc isolation (measured with Debian's runsc
2022-12-19: it runs a bundle with ``--network=none``, but behind tini the tool's stdout is lost, and its
state, kill and sweep differ from runc's).

runc reports its own failures (a bad mount, a missing binary of its own) on the stderr it hands to the
tool, so such a message reaches the caller as tool output; ``wait`` tells a runc failure from a tool's
exit by runc's log in the bundle (which the tool cannot write) and raises ``BackendError`` with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import secrets as token
import shutil
import signal as signals
import subprocess  # nosec B404 - runc, with fixed argument lists
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, TypeVar

from toolcell.backends.base import ExitInfo, Removed, StreamName
from toolcell.backends.launcher import envelope, launch_command, new_nonce
from toolcell.backends.oci.bundle import oci_config
from toolcell.backends.oci.cgroups import CgroupLimits, CgroupTree, SandboxCgroup
from toolcell.backends.oci.rootfs import DEFAULT_STORE, RootfsStore
from toolcell.backends.oci.stream import PipeStream
from toolcell.errors import BackendError, ConfigError, EngineUnavailable
from toolcell.model import EgressDestination, Usage
from toolcell.policy.seccomp_oci import to_oci_seccomp
from toolcell.policy.spec import NO_SECRETS, Identity, SandboxSpec, Secrets, sandbox_pids, stamped
from toolcell.safepath import private_dir
from toolcell.sessions.host import host_command

__all__ = ["DEFAULT_STATE", "OciBackend", "OciSandbox"]

DEFAULT_STATE: Final = "/run/toolcell/oci"
_T = TypeVar("_T")
log = logging.getLogger("toolcell.oci")

# What Docker writes into /etc/hosts of a sandbox without network: names for loopback only.
ETC_HOSTS: Final = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
                    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
_HOSTNAME_OK: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_IDENTITY: Final = "identity.json"
_CONFIG: Final = "config.json"
_LOG: Final = "runc.log"
# How long a killed sandbox's ``runc run`` may take to tear down before runc itself is killed.
_KILL_WAIT_S: Final = 10.0
# A kill during start-up waits this long for runc to record its init's pid, polling.
_INIT_WAIT_S: Final = 3.0
_INIT_POLL_S: Final = 0.01
_RMDIR_TRIES: Final = 50
_RMDIR_PAUSE_S: Final = 0.02
_RUNC_CALL_TIMEOUT_S: Final = 30.0
_ERROR_BYTES: Final = 2000  # of runc's error messages quoted in a BackendError
# A pooled sandbox's launcher says it waits for its claim on this descriptor (``launcher.py --ready-fd``).
_READY_FD: Final = 3
_READY_TIMEOUT_S: Final = 30.0
_TOOL_READY_TIMEOUT_S: Final = 130.0


def owner_tag(owner: str) -> str:
    """The short tag every sandbox id of ``owner`` starts with (after ``tc-``)."""
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:8]


class OciBackend:
    """Runs sandboxes with an OCI runtime CLI (``runc``) on per-call bundles; no daemon."""

    name = "oci"
    # No daemon in between: a creation is a runc process and a launcher starting, CPU work the kernel
    # schedules beside live calls' own; a few per CPU keep a pool full under load.
    refill_concurrency = max(2, 2 * (os.cpu_count() or 1))

    def __init__(
        self,
        runtime_path: str = "runc",
        store_dir: str = DEFAULT_STORE,
        state_dir: str = DEFAULT_STATE,
        cgroup_root: str = "/sys/fs/cgroup",
        init_path: str = "/usr/bin/tini-static",
        *,
        max_workers: int = 16,
    ) -> None:
        self._runtime_path = runtime_path
        self._init_path = init_path
        self._store = RootfsStore(store_dir)
        self._state_dir = Path(state_dir)
        self._bundles = self._state_dir / "bundles"
        self._etc = self._state_dir / "etc"
        self._runc_root = self._state_dir / "runc"
        self._cgroup_root = cgroup_root
        self._tree: CgroupTree | None = None
        self._runtime: str | None = None  # resolved path, once checked
        self._dirs_ready = False
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="toolcell-oci")
        self._closed = False
        self._seccomp_cache: dict[str, dict[str, Any]] = {}
        self.live: set[OciSandbox] = set()

    # -- the Backend protocol --------------------------------------------------------------------------

    def check(self, spec: SandboxSpec) -> None:
        tool = spec.identity.tool
        if spec.egress:
            raise ConfigError(f"tool {tool!r}: network grants need the docker engine; the oci backend has no "
                              "egress yet", key=f"profiles.{spec.identity.profile}.network")
        if spec.isolation == "runsc":
            raise ConfigError(f"tool {tool!r}: isolation runsc (gVisor) needs the docker engine here; the oci "
                              "backend runs runc only", key=f"profiles.{spec.identity.profile}.runtime")
        if spec.isolation != "runc":
            raise ConfigError(f"tool {tool!r}: unknown isolation {spec.isolation!r}",
                              key=f"profiles.{spec.identity.profile}.runtime")
        if not spec.seccomp_json.strip():
            raise ConfigError(f"tool {tool!r}: no seccomp profile; refusing to run without one")
        self._seccomp(spec.seccomp_json)
        try:
            uid, gid = spec.uid_gid
        except ValueError:
            raise ConfigError(f"tool {tool!r}: user must be numeric uid:gid, got {spec.user!r}") from None
        if uid <= 0 or gid < 0:
            raise ConfigError(f"tool {tool!r}: refusing to run as uid {uid}")

    async def create(self, spec: SandboxSpec) -> OciSandbox:
        self.check(spec)
        command = launch_command(spec.command, defer=True) if spec.defer else spec.command
        sandbox = await self._create(spec, command)
        sandbox._defer = spec.defer
        return sandbox

    async def create_session(self, spec: SandboxSpec) -> OciSandbox:
        """A session's sandbox, started: the session host in front of the tool, waiting for its first claim
        on the sandbox's stdin pipe."""
        if spec.host is None:
            raise BackendError("a session's sandbox needs a host spec")
        self.check(spec)
        sandbox = await self._create(dataclasses.replace(spec, defer=False), host_command(spec.command, spec.host))
        sandbox._hosted = True
        try:
            sandbox._spawn()
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        return sandbox

    async def create_warm(self, spec: SandboxSpec, on_exit: Callable[[], None]) -> OciSandbox:
        """Create and start a pooled sandbox; return once its launcher waits for the claim (its tool spawned,
        unless deferred), which it says on an inherited descriptor: a pool counts only sandboxes that are."""
        self.check(spec)
        sandbox = await self._create(spec, launch_command(spec.command, defer=spec.defer, ready_fd=_READY_FD,
                                                          tool_ready=spec.ready_signal))
        sandbox._warm, sandbox._defer, sandbox._on_exit = True, spec.defer, on_exit
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                sandbox._spawn(ready_w)
            finally:
                os.close(ready_w)
            # A tool that says when it is ready (an MCP server initializing) gets the launcher's 120 s and more.
            await sandbox._until_ready(ready_r, _TOOL_READY_TIMEOUT_S if spec.ready_signal else _READY_TIMEOUT_S)
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        finally:
            os.close(ready_r)
        return sandbox

    async def remove_orphans(self, owner: str) -> list[Removed]:
        # Our own live sandboxes of ``owner`` first, each the way remove() does it: killed, and its
        # ``runc run`` waited for, so runc cannot recreate (unlimited) the cgroups the sweep removes.
        live = [s for s in list(self.live) if s._identity.owner == owner and not s._removed]
        await asyncio.gather(*(s.remove() for s in live))
        removed = [_removed(s.id, s._identity, owner) for s in live]
        return removed + await self._call(functools.partial(self._sweep, owner))

    async def list_sandboxes(self, owner: str) -> list[str]:
        return await self._call(functools.partial(self._owned, owner))

    async def ping(self) -> None:
        await self._call(self._check_host)

    async def has_image(self, image: str) -> bool:
        return await self._call(functools.partial(self._store.has_image, image))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._tree is not None:  # owners this backend made cgroup directories for: empty ones go
            for owner in self._tree.owners_used():
                await asyncio.to_thread(self._tree.remove_owner, owner)

    # -- not part of Backend ---------------------------------------------------------------------------

    @property
    def store(self) -> RootfsStore:
        """The image store (``toolcell images build`` unpacks into it)."""
        return self._store

    @property
    def runc_root(self) -> Path:
        return self._runc_root

    @property
    def bundles_dir(self) -> Path:
        return self._bundles

    def cgroup(self, owner: str, sandbox_id: str) -> SandboxCgroup:
        return self._cgroups().sandbox(owner, sandbox_id)

    # -- internals ---------------------------------------------------------------------------------------

    def _seccomp(self, text: str) -> dict[str, Any]:
        found = self._seccomp_cache.get(text)
        if found is None:
            found = to_oci_seccomp(text)
            if len(self._seccomp_cache) > 32:
                self._seccomp_cache.clear()
            self._seccomp_cache[text] = found
        return found

    def _cgroups(self) -> CgroupTree:
        if self._tree is None:
            self._tree = CgroupTree(self._cgroup_root)
        return self._tree

    def _check_host(self) -> str:
        """The runtime binary's path; raises EngineUnavailable when runc or the init is missing."""
        if self._runtime is None:
            found = shutil.which(self._runtime_path)
            if found is None:
                raise EngineUnavailable(f"the OCI runtime {self._runtime_path!r} is not installed (Debian "
                                        "package `runc`); the oci backend cannot run sandboxes")
            if not os.access(self._init_path, os.X_OK):
                raise EngineUnavailable(f"the sandbox init {self._init_path!r} is missing (Debian package "
                                        "`tini`, its static build); the oci backend cannot run sandboxes")
            self._cgroups()
            self._runtime = found
        return self._runtime

    def _ensure_dirs(self) -> None:
        if not self._dirs_ready:
            private_dir(self._state_dir, allow_root=True)
            private_dir(self._bundles, allow_root=True)
            private_dir(self._runc_root, allow_root=True)
            private_dir(self._etc, allow_root=True)
            _replace_file(self._etc / "hosts", ETC_HOSTS)
            self._dirs_ready = True

    async def _create(self, spec: SandboxSpec, command: tuple[str, ...]) -> OciSandbox:
        spec = stamped(spec, time.time())
        sandbox_id = f"tc-{owner_tag(spec.identity.owner)}-{token.token_hex(10)}"
        runtime, cgroup = await self._call(functools.partial(self._prepare, spec, sandbox_id, command))
        sandbox = OciSandbox(self, sandbox_id, spec.identity, runtime, cgroup)
        self.live.add(sandbox)
        return sandbox

    def _prepare(self, spec: SandboxSpec, sandbox_id: str, command: tuple[str, ...]) -> tuple[str, SandboxCgroup]:
        """Blocking: the bundle and the parent cgroups of one sandbox; nothing is left on failure."""
        runtime = self._check_host()
        self._ensure_dirs()
        image = self._store.get(spec.image)
        for mount in spec.mounts:
            if not os.path.exists(mount.source):  # never a created directory in its place
                raise BackendError(f"mount source {mount.source!r} does not exist")
        tree = self._cgroups()
        config = oci_config(spec, rootfs=str(image.rootfs), image=image.config, command=command,
                            seccomp=self._seccomp(spec.seccomp_json),
                            cgroups_path=tree.runc_path(spec.identity.owner, sandbox_id),
                            init_path=self._init_path,
                            etc_files=(("/etc/hosts", str(self._etc / "hosts")),
                                       ("/etc/hostname", self._hostname_file(spec.hostname))),
                            swap_limit=tree.swap_limit)
        bundle = self._bundles / sandbox_id
        os.mkdir(bundle, 0o700)
        cgroup = tree.sandbox(spec.identity.owner, sandbox_id)
        try:
            # The identity first: a crash from here on leaves something the sweep recognizes.
            _write_file(bundle / _IDENTITY, json.dumps({"identity": asdict(spec.identity), "runtime": runtime}))
            _write_file(bundle / _CONFIG, json.dumps(config, separators=(",", ":")))
            pids, _nproc = sandbox_pids(spec.isolation, spec.pids)
            cgroup.create(CgroupLimits(memory_bytes=spec.memory_bytes, pids=pids, cpus=spec.cpus))
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        return runtime, cgroup

    def _hostname_file(self, hostname: str) -> str:
        """A file holding ``hostname``, shared by every sandbox of that name (written once)."""
        if not _HOSTNAME_OK.fullmatch(hostname):
            raise BackendError(f"invalid hostname {hostname[:64]!r}")
        path = self._etc / f"hostname-{hostname}"
        if not path.exists():
            _replace_file(path, hostname + "\n")
        return str(path)

    def _owned(self, owner: str) -> list[str]:
        prefix = f"tc-{owner_tag(owner)}-"
        found: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._bundles):
                if entry.name.startswith(prefix) and self._identity(entry.name).owner == owner:
                    found.append(entry.name)
        return sorted(found)

    def _identity(self, sandbox_id: str) -> Identity:
        try:
            raw = json.loads((self._bundles / sandbox_id / _IDENTITY).read_text())
            return Identity(**raw["identity"])
        except (OSError, ValueError, KeyError, TypeError):
            return Identity(owner="", invocation_id="")

    def _sweep(self, owner: str) -> list[Removed]:
        """Blocking: kill and remove every sandbox of ``owner`` (runc state, processes, cgroups, bundles)."""
        prefix = f"tc-{owner_tag(owner)}-"
        ids: set[str] = set(self._cgroups().orphans(owner))
        for directory in (self._bundles, self._runc_root):
            with contextlib.suppress(FileNotFoundError):
                ids.update(e.name for e in os.scandir(directory) if e.name.startswith(prefix))
        removed: list[Removed] = []
        for sandbox_id in sorted(ids):
            identity = self._identity(sandbox_id)
            if identity.owner not in ("", owner):
                continue  # another owner's, whose tag collides: not ours to touch
            self._stop_runc(sandbox_id)  # a ``runc run`` left running by a supervisor that died
            self._destroy(owner, sandbox_id, self._cgroups().sandbox(owner, sandbox_id))
            removed.append(_removed(sandbox_id, identity, owner))
        for sandbox in list(self.live):
            if sandbox._identity.owner == owner:
                sandbox._removed = True
                self.live.discard(sandbox)
        self._cgroups().remove_owner(owner)  # empty now: an owner's directories do not pile up
        return removed

    async def remove_expired(self, now: float) -> list[Removed]:
        return await self._call(functools.partial(self._sweep_expired, now))

    def _sweep_expired(self, now: float) -> list[Removed]:
        """Blocking: remove every sandbox in our state directory, of any owner, whose lease ended before ``now``
        (the same steps as an owner's sweep, for that one sandbox)."""
        removed: list[Removed] = []
        entries: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            entries = [e.name for e in os.scandir(self._bundles) if e.name.startswith("tc-")]
        for sandbox_id in sorted(entries):
            identity = self._identity(sandbox_id)
            if not identity.owner or not 0 < identity.lease_until < now:
                continue
            self._stop_runc(sandbox_id)
            self._destroy(identity.owner, sandbox_id, self._cgroups().sandbox(identity.owner, sandbox_id))
            removed.append(_removed(sandbox_id, identity, identity.owner))
            for sandbox in list(self.live):
                if sandbox.id == sandbox_id:
                    sandbox._removed = True
                    self.live.discard(sandbox)
        return removed

    def _stop_runc(self, sandbox_id: str) -> None:
        """Blocking: SIGKILL every ``runc ... run ... <sandbox_id>`` of our state dir (not our children:
        a dead supervisor's), and wait for them to go, so none of them is still setting up the sandbox."""
        root = str(self._runc_root)
        found: list[int] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                args = [a.decode(errors="replace") for a in argv if a]
                if len(args) > 3 and args[-1] == sandbox_id and "run" in args and root in args:
                    found.append(int(entry.name))
        for pid in found:  # through a pidfd, re-checked: the pid may have been reused since the scan
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if sandbox_id.encode() in argv and root.encode() in argv:
                        signals.pidfd_send_signal(pidfd, signals.SIGKILL)
                finally:
                    os.close(pidfd)
        deadline = time.monotonic() + _KILL_WAIT_S
        while found and time.monotonic() < deadline:
            found = [p for p in found if _running(p)]
            if found:
                time.sleep(_INIT_POLL_S)

    def _destroy(self, owner: str, sandbox_id: str, cgroup: SandboxCgroup) -> None:
        """Blocking: whatever of one sandbox is left -- runc's state, processes, cgroups, the bundle."""
        if (self._runc_root / sandbox_id).exists():
            self._runc(["delete", "--force", sandbox_id], check=False)
        for _ in range(_RMDIR_TRIES):
            cgroup.kill_all()
            if cgroup.remove():
                break
            time.sleep(_RMDIR_PAUSE_S)
        else:
            log.warning("sandbox %s: cgroups still busy after its removal; the next sweep retries", sandbox_id)
        if (self._runc_root / sandbox_id).exists():  # a ``runc run`` that was mid-way: once more
            self._runc(["delete", "--force", sandbox_id], check=False)
        shutil.rmtree(self._bundles / sandbox_id, ignore_errors=True)

    def _runc(self, args: list[str], *, check: bool = True) -> str:
        runtime = self._runtime or shutil.which(self._runtime_path) or self._runtime_path
        try:
            done = subprocess.run(  # noqa: S603 # nosec B603 - fixed arguments
                [runtime, "--root", str(self._runc_root), *args], capture_output=True,
                timeout=_RUNC_CALL_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            if check:
                raise BackendError(f"runc {args[0]} failed: {exc}") from exc
            return ""
        if done.returncode != 0 and check:
            raise BackendError(f"runc {args[0]} failed: {_tail(done.stderr)}")
        return done.stdout.decode(errors="replace")

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise BackendError("the oci backend is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except BackendError:
            raise
        except OSError as exc:
            raise BackendError(f"oci backend: {exc}") from exc


class OciSandbox:
    """One ``runc run``. Single use: start once, then remove."""

    def __init__(self, backend: OciBackend, sandbox_id: str, identity: Identity, runtime: str,
                 cgroup: SandboxCgroup) -> None:
        self._backend = backend
        self._id = sandbox_id
        self._identity = identity
        self._runtime = runtime
        self._cgroup = cgroup
        self._bundle = backend._bundles / sandbox_id
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._exited: asyncio.Future[int] | None = None
        self._stream: PipeStream | None = None
        self._started = False
        self._closing = False
        self._removed = False
        self._exit: ExitInfo | None = None
        self._warm = False
        self._defer = False
        self._claimed = False
        self._on_exit: Callable[[], None] = lambda: None
        self._hosted = False  # a session's sandbox: the session host serves several claims (``send``)
        # A signal of ours was sent: a failing ``runc run`` is then our kill's doing (e.g. a timeout that
        # fell while runc was still starting the container), not an engine error.
        self._signalled = 0

    @property
    def id(self) -> str:
        return self._id

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return ()

    @property
    def alive(self) -> bool:
        """A pooled sandbox that is running and unclaimed, or a session's that is running."""
        stream = self._stream
        if stream is None or stream.ended or self._closing:
            return False
        return self._hosted or (self._warm and not self._claimed)

    def oom_kills(self) -> int:
        return self._cgroup.oom_kills()

    async def send(self, data: bytes) -> None:
        """A session's claim, queued on the host's stdin after the ones before (never an EOF)."""
        stream = self._stream
        if not self._hosted or stream is None or stream.ended:
            raise BackendError(f"sandbox {self._id} takes no claims now")
        stream.send(data, half_close=False)

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        if secrets and not self._defer:
            raise BackendError(f"sandbox {self._id} cannot take secrets: its tool was not deferred")
        if self._warm:
            self._claim(stdin, secrets)
            return
        if self._started:
            raise BackendError(f"sandbox {self._id} was already started")
        if self._closing:
            raise BackendError(f"sandbox {self._id} was removed")
        self._spawn()
        if self._defer:
            self._claim(stdin, secrets)
        elif self._stream is not None:
            self._stream.send(stdin)

    def _claim(self, stdin: bytes, secrets: Secrets) -> None:
        """Deliver the claim envelope (nonce + arguments [+ secrets]) to the waiting launcher."""
        if self._claimed:
            raise BackendError(f"sandbox {self._id} was already claimed")
        self._claimed = True
        stream = self._stream
        if stream is None or stream.ended:
            raise BackendError(f"pooled sandbox {self._id} ended before it was claimed")
        nonce = new_nonce()
        stream.expect_trailer(nonce, lambda status: status)
        stream.send(envelope(nonce, stdin, secrets.env, secrets.files), half_close=False)

    async def _until_ready(self, ready_r: int, timeout_s: float) -> None:
        """Wait for the launcher's byte on ``ready_r``; a sandbox that ends first, or is silent, fails."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(ready_r, readable)
        try:
            exited = self._exited
            waiting: list[asyncio.Future[Any]] = [ready] if exited is None else [ready, exited]
            await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(ready_r)
        try:
            got = os.read(ready_r, 1) if ready.done() else b""
        except BlockingIOError:
            got = b""
        if got != b"r":
            why = "ended" if self._exited is not None and self._exited.done() else f"was not ready in {timeout_s:g} s"
            failure = await self._backend._call(self._runc_failure)
            raise BackendError(f"pooled sandbox {self._id} {why} before waiting for its claim"
                               + (f": {failure}" if failure else ""))

    def _spawn(self, ready_w: int = -1) -> None:
        """Start ``runc run`` with three fresh pipes as its (and so the tool's) stdio; ``ready_w`` (a pooled
        sandbox's readiness pipe) becomes the container's fd 3 (``--preserve-fds 1``)."""
        self._started = True
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            fds += [in_r, in_w]
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w]
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += [err_r, err_w]
            argv = [self._runtime, "--root", str(self._backend._runc_root), "--log", str(self._bundle / _LOG),
                    "--log-format", "json", "run", *(("--preserve-fds", "1") if ready_w >= 0 else ()),
                    "--bundle", str(self._bundle), self._id]
            pass_fds: tuple[int, ...] = ()
            if ready_w >= 0:
                # runc passes its fd 3 on: put the readiness pipe there (a shell's dup2, then exec: same pid).
                # bash, not sh: dash reads only single-digit descriptors in a redirection.
                argv = ["/bin/bash", "-c", f'exec {_READY_FD}>&{ready_w} {ready_w}>&-; exec "$@"', "bash", *argv]
                pass_fds = (ready_w,)
            # A session of its own: a terminal's ^C reaches the supervisor, which decides, not the sandbox.
            self._proc = subprocess.Popen(  # noqa: S603 # nosec B603 - fixed arguments
                argv, stdin=in_r, stdout=out_w, stderr=err_w, close_fds=True, pass_fds=pass_fds,
                start_new_session=True)
        except OSError as exc:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise BackendError(f"cannot start {self._runtime}: {exc}") from exc
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        self._exited = loop.create_future()
        self._pidfd = os.pidfd_open(self._proc.pid)
        loop.add_reader(self._pidfd, self._on_process_exit)
        self._stream = PipeStream(in_w, out_r, err_r, on_end=self._stream_ended)

    def _on_process_exit(self) -> None:
        proc, exited = self._proc, self._exited
        if proc is None or exited is None:
            return
        code = proc.poll()
        if code is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        if not exited.done():
            exited.set_result(128 - code if code < 0 else code)

    def _stream_ended(self) -> None:
        if self._warm and not self._claimed and not self._closing:
            self._on_exit()

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        if not self._started:
            raise BackendError("output() called before start()")
        if self._stream is None:
            return
        async for item in self._stream.chunks():
            yield item

    async def wait(self) -> ExitInfo:
        if self._exit is not None:
            return self._exit
        if self._exited is None or self._stream is None:
            raise BackendError(f"sandbox {self._id} was never started")
        if self._claimed:
            # The launcher's trailer is the tool's status; a clean run's launcher waits for our EOF.
            status = await asyncio.shield(self._stream.trailer)
            if status is not None:
                # A few reads of cgroupfs's in-memory files (tens of µs), on the loop: a warm call's end
                # needs no thread hop (the Docker backend judges its trailer the same way).
                oom = self._after_exit()
                self._exit = ExitInfo(exit_code=status, oom_killed=oom)
                return self._exit
        code = await asyncio.shield(self._exited)
        oom = await self._backend._call(self._after_exit)
        if code != 0 and not self._closing:
            failure = await self._backend._call(self._runc_failure)
            if failure and self._signalled:  # runc lost the race with our signal: the sandbox died of it
                log.info("sandbox %s: killed while runc was starting it (%s)", self._id, failure[:200])
                code = 128 + self._signalled if code < 128 else code
            elif failure:
                raise BackendError(f"runc could not run sandbox {self._id}: {failure}")
        self._exit = ExitInfo(exit_code=code, oom_killed=oom)
        return self._exit

    def _after_exit(self) -> bool:
        """Blocking: sample usage and tell whether the kernel OOM-killed in the sandbox."""
        self._cgroup.sample()
        return self._cgroup.oom_kills() > 0

    def _runc_failure(self) -> str:
        """Blocking: runc's own error for this run (from its log), if it failed rather than the tool."""
        try:
            with open(self._bundle / _LOG, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        errors = []
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal"):
                    errors.append(str(entry.get("msg", "")))
        return "; ".join(errors)[-_ERROR_BYTES:]

    async def signal(self, signum: int) -> None:
        proc = self._proc
        if proc is None or self._exited is None or self._exited.done():
            return
        self._signalled = signals.SIGKILL if signum == signals.SIGKILL else (self._signalled or signum)
        if signum == signals.SIGKILL:
            await self._backend._call(self._kill)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)  # runc forwards it to the init, which forwards it to the tool

    def _kill(self) -> None:
        """Blocking: SIGKILL the pid namespace's init (the kernel then kills everything in it), then any
        process still in the sandbox's cgroups (a runc that had not started the init yet)."""
        exited = self._exited
        deadline = time.monotonic() + _INIT_WAIT_S
        while True:
            # runc records the init's pid a moment after starting it: a kill during start-up waits for it.
            init = _init_pid(self._backend._runc_root / self._id / "state.json")
            if init:
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(init)
                    try:
                        # The pidfd pins this process: if the pid was recycled, it is not in our cgroup.
                        if self._id in Path(f"/proc/{init}/cgroup").read_text():
                            signals.pidfd_send_signal(pidfd, signals.SIGKILL)
                    finally:
                        os.close(pidfd)
                break
            self._cgroup.kill_all()
            if (exited is not None and exited.done()) or time.monotonic() > deadline:
                break
            time.sleep(_INIT_POLL_S)
        self._cgroup.kill_all()
        if not init and self._proc is not None and exited is not None and not exited.done():
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()  # runc never got as far as an init: stop runc itself; remove() deletes

    async def usage(self) -> Usage:
        if self._exit is None and self._started and not self._removed:
            with contextlib.suppress(BackendError):
                return await self._backend._call(self._cgroup.sample)
        return self._cgroup.last_usage

    async def remove(self) -> None:
        self._closing = True
        if self._removed:
            return
        if self._stream is not None:
            self._stream.close()
        exited = self._exited
        if exited is not None and not exited.done():
            await self._backend._call(self._kill)
            try:
                await asyncio.wait_for(asyncio.shield(exited), _KILL_WAIT_S)
            except TimeoutError:
                proc = self._proc
                if proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), _KILL_WAIT_S)
        await self._backend._call(self._teardown)
        self._removed = True
        self._backend.live.discard(self)

    def _teardown(self) -> None:
        if self._exit is None:
            with contextlib.suppress(OSError):
                self._cgroup.sample()
        self._backend._destroy(self._identity.owner, self._id, self._cgroup)


def _removed(sandbox_id: str, identity: Identity, owner: str) -> Removed:
    """What a swept sandbox served (a pooled or helper sandbox served no known invocation)."""
    serving = identity.serving and identity.owner == owner
    return Removed(sandbox_id=sandbox_id, invocation_id=identity.invocation_id if serving else "",
                   tool=identity.tool if serving else "", owner=identity.owner)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _init_pid(state: Path) -> int:
    try:
        return int(json.loads(state.read_text()).get("init_process_pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _write_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _replace_file(path: Path, text: str) -> None:
    """Write ``path`` whole, atomically (0644: the sandbox's user reads it through a bind mount)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{token.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _tail(data: bytes) -> str:
    return data.decode(errors="replace").strip()[-_ERROR_BYTES:]

