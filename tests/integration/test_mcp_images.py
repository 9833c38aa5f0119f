"""Real-engine checks of toolcell/mcp-time:latest, built by `toolcell images mcp` from images/build.sh.

These tests FAIL, never skip, when the Docker engine or the image is missing. Every container carries the
label io.toolcell.test=<run id> and `--rm`; a module teardown removes leftovers and asserts there were none.
The server is spoken to by hand (newline-delimited JSON-RPC over stdio), bounded in size and time.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from toolcell.images import INPUTS_HASH_LABEL
from toolcell.mcpimages.build import COMMAND_LABEL, REQUEST_LABEL
from toolcell.mcpimages.spec import parse_server_list

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
IMAGE = "toolcell/mcp-time:latest"
COMMAND = "/opt/mcp/bin/mcp-server-time"
TEST_LABEL = "io.toolcell.test"
RUN_ID = f"mcp-images-{uuid.uuid4().hex[:12]}"
MAX_MESSAGE = 1 << 20
HARDENED = ("--network", "none", "--read-only", "--tmpfs", "/tmp:rw,noexec,nosuid,nodev,size=16m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "64", "--memory", "256m")
PROTOCOLS = {"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"}


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        pytest.fail("the docker CLI is not installed (run scripts/setup.sh)")
    return found


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([docker_cli(), *args], capture_output=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def run_argv(*command: str, options: tuple[str, ...] = HARDENED) -> tuple[str, list[str]]:
    name = f"toolcell-test-{uuid.uuid4().hex[:12]}"
    return name, [docker_cli(), "run", "-i", "--rm", "--name", name, "--label", f"{TEST_LABEL}={RUN_ID}",
                  *options, IMAGE, *command]


def run(*command: str, options: tuple[str, ...] = HARDENED) -> subprocess.CompletedProcess[bytes]:
    name, argv = run_argv(*command, options=options)
    try:
        return subprocess.run(argv, capture_output=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        docker("rm", "--force", name)
        raise


@pytest.fixture(scope="module", autouse=True)
def engine_and_image() -> Iterator[dict[str, Any]]:
    info = docker("info", "--format", "{{ .ServerVersion }}", timeout=30)
    if info.returncode != 0:
        pytest.fail(f"Docker engine not reachable (run scripts/setup.sh): {info.stderr.decode().strip()}")
    found = docker("image", "inspect", IMAGE, timeout=30)
    if found.returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: build it with images/build.sh (or `toolcell images mcp --from "
                    "images/mcp-servers.txt`)")
    yield json.loads(found.stdout)[0]
    left = docker("ps", "--all", "--quiet", "--filter", f"label={TEST_LABEL}={RUN_ID}").stdout.split()
    if left:
        docker("rm", "--force", *(c.decode() for c in left))
    assert not left, f"containers left behind: {left}"


class Stdio:
    """A server in a container: send JSON-RPC lines, receive one by id within a deadline, bounded."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.seen: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, want_id: int, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                message = json.loads(line)
                self.seen.append(message)
                if message.get("id") == want_id:
                    return dict(message)
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to request {want_id} within {timeout} s; got {self.seen!r:.500}"
            if not self.selector.select(left):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"the server closed stdout before answering {want_id}"
            self.buffer += chunk
            assert len(self.buffer) <= MAX_MESSAGE, "a message over 1 MiB"


# --- the image --------------------------------------------------------------------------------------------


def test_image_config(engine_and_image: dict[str, Any]) -> None:
    """User 10001, no entrypoint, the labels that make re-runs skip, the command recorded."""
    config = engine_and_image["Config"]
    assert config["User"] == "10001:10001"
    assert not config.get("Entrypoint")
    assert config["Cmd"] == [COMMAND]
    labels = config["Labels"]
    assert len(labels[INPUTS_HASH_LABEL]) == 64 and len(labels[REQUEST_LABEL]) == 64
    assert labels[COMMAND_LABEL] == COMMAND


def test_runs_as_uid_10001_with_a_read_only_root() -> None:
    """The same write probe: it succeeds as root on a writable root (so the probe works), fails otherwise."""
    probe = "id -u; if touch /opt/mcp/probe 2>/dev/null; then echo wrote; else echo refused; fi"
    cases = [
        (("--network", "none", "--user", "0"), ["0", "wrote"]),
        (("--network", "none"), ["10001", "refused"]),  # files are root-owned, read-only for the tool user
        (HARDENED, ["10001", "refused"]),
        ((*HARDENED, "--user", "0"), ["0", "refused"]),  # read-only root: not even root writes
    ]
    for options, expected in cases:
        out = run("sh", "-c", probe, options=options)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().split() == expected, options


def test_no_setid_files() -> None:
    """As root, so find sees everything; -xdev keeps it to the image's own filesystem."""
    out = run("find", "/", "-xdev", "-perm", "/6000", options=(*HARDENED, "--user", "0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == []


def test_nothing_writable_everything_compiled() -> None:
    """Nothing under /opt/mcp the tool user may write (even without --read-only); every module byte-compiled."""
    script = (
        "import os, importlib.util\n"
        "def walk(top):\n"
        "    for d, dirs, files in os.walk(top):\n"
        "        yield from (os.path.join(d, f) for f in dirs + files)\n"
        "writable = [p for p in walk('/opt/mcp') if not os.path.islink(p) and os.access(p, os.W_OK)]\n"
        "sources = [p for p in walk('/opt/mcp/venv/lib') if p.endswith('.py')]\n"
        "missing = [p for p in sources if not os.path.exists(importlib.util.cache_from_source(p))]\n"
        "print(len(writable), len(missing), len(sources), writable[:3], missing[:3])\n"
    )
    out = run("python3", "-c", script, options=("--network", "none"))
    assert out.returncode == 0, out.stderr
    writable, missing, sources = out.stdout.decode().split()[:3]
    assert (writable, missing) == ("0", "0"), out.stdout
    assert int(sources) > 100


def test_inputs_record_matches_the_image(engine_and_image: dict[str, Any]) -> None:
    """/opt/mcp/inputs.txt names the version the image is tagged with and every wheel with its sha256."""
    version = engine_and_image["Config"]["Labels"]["org.opencontainers.image.version"]
    out = run("cat", "/opt/mcp/inputs.txt", "/opt/mcp/installed.txt")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert f"version {version}" in lines and f"command {COMMAND}" in lines
    assert any(line.startswith("wheel ") and f"mcp_server_time-{version}-" in line for line in lines)
    assert f"mcp-server-time=={version}" in lines


def test_answers_initialize_and_tools_list_over_stdio() -> None:
    """Hardened (no network, read-only root, no capabilities): initialize, then tools/list, then a clean exit."""
    name, argv = run_argv(COMMAND)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        server = Stdio(proc)
        client = {"name": "toolcell-test", "version": "0"}
        server.send({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                     "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client}})
        init = server.receive(0)["result"]
        assert init["protocolVersion"] in PROTOCOLS
        assert init["serverInfo"]["name"] == "mcp-time"
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        server.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        tools = server.receive(1)["result"]["tools"]
        assert {"get_current_time", "convert_time"} <= {tool["name"] for tool in tools}
        server.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "get_current_time", "arguments": {"timezone": "Etc/UTC"}}})
        result = server.receive(2)["result"]
        assert result.get("isError") is not True and '"timezone": "Etc/UTC"' in result["content"][0]["text"]
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            docker("rm", "--force", name)
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_rerun_is_skipped_without_fetching() -> None:
    """The pinned entry of images/mcp-servers.txt: up to date by label, no pip run (PATH has no pip), fast."""
    listed = [r for r in parse_server_list((REPO / "images" / "mcp-servers.txt").read_text()) if r.name == "time"]
    assert len(listed) == 1
    env = {**os.environ, "PATH": str(Path(docker_cli()).parent), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "toolcell", "images", "mcp", "--pypi", listed[0].package.requirement, "--name", "time",
         "--store", ""], capture_output=True, timeout=120, check=False, env=env, cwd=REPO,
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    first = out.stdout.decode().splitlines()[0]
    assert first.startswith(f"toolcell/mcp-time:{listed[0].package.version} up-to-date"), first
    assert f"command: [{COMMAND}]" in out.stdout.decode()
    assert b"fetching" not in out.stderr
    assert elapsed < 10
