"""The Docker backend's egress orchestration over a fake engine: order, isolation, cleanup on every path.

Enforcement itself is proven against the real engine (tests/integration/test_egress.py); this checks that
the backend wires it: upstream network, then the invocation's own network, then the proxy on both, its
program on stdin, the sandbox's place and environment; afterwards the accounting, the proxy and the network
gone, whatever failed on the way. Also the backend's refusals that need no engine.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Mapping

import pytest

from toolcell.backends.base import ExitInfo, StreamName
from toolcell.backends.docker import DockerBackend, DockerSandbox
from toolcell.backends.docker_egress import (
    LABEL_OWNER,
    LABEL_ROLE,
    PROGRAM,
    EgressSession,
    NetworkAttachment,
    NetworkSpec,
)
from toolcell.errors import BackendError, ConfigError
from toolcell.model import EgressDestination, Tool, Usage
from toolcell.policy.network import EgressGrant, EgressSettings
from toolcell.policy.profile import IsolationProfile
from toolcell.policy.spec import NO_SECRETS, ROLE_PROXY, Identity, SandboxSpec, Secrets, compile_spec

SUMMARY = [{"host": "allowed.test", "port": 443, "allowed": True, "reason": "", "connections": 2,
            "bytes_up": 10, "bytes_down": 20},
           {"host": "denied.test", "port": 443, "allowed": False, "reason": "not-granted", "connections": 1,
            "bytes_up": 0, "bytes_down": 0},
           {"host": "broken"}]  # a malformed entry is dropped, not fatal
GRANTS = (EgressGrant("allowed.test"),)
IDENTITY = Identity(owner="unit-egress", invocation_id="inv_1", tool="a")


class FakeProxy:
    """The sidecar as the session sees it: prints "listening", and its summary on SIGTERM."""

    def __init__(self, spec: SandboxSpec, *, starts: bool = True) -> None:
        self.spec = spec
        self.stdin = b""
        self.removed = False
        self.signals: list[int] = []
        self._starts = starts
        self._out: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue()

    @property
    def id(self) -> str:
        return "proxy0123456789"

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return ()

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        self.stdin = stdin
        if self._starts:
            self._out.put_nowait(("stdout", b'{"event":"listen'))  # a line split across chunks
            self._out.put_nowait(("stdout", b'ing"}\nnot json\n'))
        else:
            self._out.put_nowait(("stderr", b"Traceback ...\nOSError: cannot assign requested address\n"))
            self._out.put_nowait(None)

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        while (item := await self._out.get()) is not None:
            yield item

    async def signal(self, signum: int) -> None:
        self.signals.append(signum)
        line = json.dumps({"event": "summary", "destinations": SUMMARY}).encode() + b"\n"
        self._out.put_nowait(("stdout", line))
        self._out.put_nowait(None)

    async def wait(self) -> ExitInfo:
        raise AssertionError("the session never waits for the proxy")

    async def usage(self) -> Usage:
        return Usage()

    async def remove(self) -> None:
        self.removed = True


class FakeEngine:
    """Records every engine call in order; networks and proxies as the session asked for them."""

    def __init__(self, *, proxy_starts: bool = True, fail_remove_network: bool = False,
                 proxy_delay_s: float = 0.0) -> None:
        self.calls: list[str] = []
        self.networks: dict[str, Mapping[str, str]] = {}
        self.proxies: list[tuple[FakeProxy, NetworkAttachment]] = []
        self._proxy_starts = proxy_starts
        self._fail_remove_network = fail_remove_network
        self._proxy_delay_s = proxy_delay_s

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        self.calls.append(f"ensure {name}")
        self.networks.setdefault(name, dict(labels))

    async def create_network(self, spec: NetworkSpec) -> str:
        self.calls.append("create network")
        assert spec.internal and spec.host_isolated and spec.subnets
        self.networks[spec.name] = dict(spec.labels)
        return spec.subnets[0]

    async def remove_network(self, name: str) -> None:
        self.calls.append("remove network")
        if self._fail_remove_network:
            raise BackendError("network has active endpoints")
        del self.networks[name]

    async def create_attached(self, spec: SandboxSpec, attachment: NetworkAttachment) -> FakeProxy:
        self.calls.append("create proxy")
        await asyncio.sleep(self._proxy_delay_s)
        proxy = FakeProxy(spec, starts=self._proxy_starts)
        self.proxies.append((proxy, attachment))
        return proxy


def session(engine: FakeEngine, settings: EgressSettings | None = None,
            grants: tuple[EgressGrant, ...] = GRANTS, identity: Identity = IDENTITY) -> EgressSession:
    return EgressSession(engine, settings or EgressSettings(ready_timeout_s=2.0), grants, identity,
                         seccomp_json='{"defaultAction": "SCMP_ACT_ERRNO"}')


async def test_open_makes_network_then_proxy_and_close_removes_both_with_the_accounting() -> None:
    engine = FakeEngine()
    s = session(engine)
    place, env = await s.open()
    [(proxy, proxy_place)] = engine.proxies
    assert engine.calls == ["ensure toolcell-egress-unit-egress", "create network", "create proxy"]
    assert proxy.stdin == PROGRAM and b"def main" in PROGRAM
    policy = json.loads(proxy.spec.env["TOOLCELL_EGRESS_POLICY"])
    assert policy["grants"] == [{"host": "allowed.test", "ports": [443], "allow_private": False}]
    # .2 the proxy (internal network + upstream), .3 the sandbox (internal only), pointed at the proxy.
    assert proxy_place.network == place.network and place.network.startswith("toolcell-egress-")
    assert proxy_place.extra == ("toolcell-egress-unit-egress",) and place.extra == ()
    assert proxy_place.ip == policy["listen"] and place.ip.split(".")[:3] == policy["listen"].split(".")[:3]
    assert int(place.ip.rsplit(".", 1)[1]) == int(proxy_place.ip.rsplit(".", 1)[1]) + 1
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://{policy['listen']}:3128" and env["NO_PROXY"] == ""
    assert engine.networks[place.network][LABEL_OWNER] == "unit-egress"
    destinations = await s.close()
    assert proxy.signals == [signal.SIGTERM] and proxy.removed
    assert [(d.host, d.allowed, d.reason, d.connections, d.bytes_up, d.bytes_down) for d in destinations] == [
        ("allowed.test", True, "", 2, 10, 20), ("denied.test", False, "not-granted", 1, 0, 0)]
    assert engine.calls[-1] == "remove network"
    # The upstream network stays for the next call (swept with the owner's objects at shutdown).
    assert list(engine.networks) == ["toolcell-egress-unit-egress"]
    assert await s.close() == destinations and engine.calls.count("remove network") == 1  # idempotent


def test_the_proxy_is_contained_like_a_tool() -> None:
    from toolcell.backends.docker_egress import proxy_spec

    spec = proxy_spec(EgressSettings(), IDENTITY, policy_json="{}", seccomp_json="{...}")
    assert (spec.user, spec.isolation, spec.seccomp_json, spec.egress, spec.defer) == ("10001:10001", "runc",
                                                                                      "{...}", (), False)
    assert spec.identity == Identity("unit-egress", "inv_1", "a", role=ROLE_PROXY) and not spec.identity.serving
    assert [s.path for s in spec.scratch] == ["/tmp"] and spec.mounts == ()
    assert spec.memory_bytes == EgressSettings().proxy_memory_bytes and spec.pids == 16


async def test_an_admin_named_upstream_network_is_not_labelled_as_ours() -> None:
    engine = FakeEngine()
    s = session(engine, EgressSettings(network="corp-egress"))
    await s.open()
    await s.close()
    assert engine.calls[0] == "ensure corp-egress" and LABEL_OWNER not in engine.networks["corp-egress"]
    assert engine.networks["corp-egress"][LABEL_ROLE] == "egress-upstream"


async def test_concurrent_sessions_have_separate_networks_and_allowlists() -> None:
    engine = FakeEngine()
    a = session(engine)
    b = session(engine, grants=(EgressGrant("*.other.test", (80,)),))
    (place_a, _), (place_b, _) = await asyncio.gather(a.open(), b.open())
    assert place_a.network != place_b.network
    grants = sorted(json.dumps(json.loads(p.spec.env["TOOLCELL_EGRESS_POLICY"])["grants"]) for p, _ in engine.proxies)
    assert grants == [json.dumps([{"host": "*.other.test", "ports": [80], "allow_private": False}]),
                      json.dumps([{"host": "allowed.test", "ports": [443], "allow_private": False}])]
    await asyncio.gather(a.close(), b.close())
    assert list(engine.networks) == ["toolcell-egress-unit-egress"]


async def test_a_proxy_that_fails_to_start_fails_open_and_close_leaves_nothing() -> None:
    engine = FakeEngine(proxy_starts=False)
    s = session(engine)
    with pytest.raises(BackendError, match="egress proxy did not start: OSError: cannot assign"):
        await s.open()
    assert await s.close() == ()
    assert engine.proxies[0][0].removed and list(engine.networks) == ["toolcell-egress-unit-egress"]


async def test_close_after_a_cancelled_open_removes_what_was_created() -> None:
    engine = FakeEngine(proxy_delay_s=0.2)
    s = session(engine)
    opening = asyncio.ensure_future(s.open())
    while "create proxy" not in engine.calls:
        await asyncio.sleep(0.01)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await s.close()  # waits for the proxy still being created, then removes it and the network
    assert engine.proxies[0][0].removed and list(engine.networks) == ["toolcell-egress-unit-egress"]


async def test_close_never_raises_for_cleanup() -> None:
    engine = FakeEngine(fail_remove_network=True)
    s = session(engine)
    await s.open()
    destinations = await s.close()
    assert engine.proxies[0][0].removed and len(destinations) == 2


# -- the backend's refusals (no engine call is made) --------------------------------------------------


def _spec(egress: bool = False) -> SandboxSpec:
    tool = Tool(name="net.tool", description="", image="img", command=("run",))
    profile = IsolationProfile().with_network(*GRANTS) if egress else IsolationProfile()
    return compile_spec(tool, profile, invocation_id="inv_1", owner="unit", seccomp_json="{}", environ={})


async def test_egress_without_egress_settings_is_a_config_error_naming_the_tool() -> None:
    backend = DockerBackend("unix:///nonexistent.sock")
    try:
        backend.check(_spec())  # no egress: nothing to check
        with pytest.raises(ConfigError, match=r"net\.tool"):
            backend.check(_spec(egress=True))
        with pytest.raises(ConfigError, match=r"net\.tool"):
            await backend.create(_spec(egress=True))
        with pytest.raises(ConfigError, match="cannot be pooled"):
            await backend.create_warm(_spec(egress=True), lambda: None)
    finally:
        await backend.close()
    configured = DockerBackend("unix:///nonexistent.sock", egress=EgressSettings(), proxy_seccomp_json="{}")
    try:
        configured.check(_spec(egress=True))
    finally:
        await configured.close()


async def test_secrets_for_a_sandbox_not_created_to_take_them_are_refused() -> None:
    backend = DockerBackend("unix:///nonexistent.sock")
    try:
        sandbox = DockerSandbox(backend, "0123456789abcdef", defer=False)
        with pytest.raises(BackendError, match="not created to take secrets"):
            await sandbox.start(b"{}", Secrets(env={"TOKEN": "s3cret"}))
    finally:
        await backend.close()

