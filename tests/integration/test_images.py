"""Real-engine checks of the runner image toolcell/python:bookworm (built by images/build.sh).

These tests FAIL, never skip, when the Docker engine or the image is missing.  Every container they start
carries the label io.toolcell.test=<run id> and `--rm`; a module teardown removes leftovers and asserts
there were none.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from toolcell.errors import ConfigError
from toolcell.images import BASE_IMAGE, INPUTS_HASH_LABEL, PYTHON_IMAGE, TOOLS_DIR, build_images

pytestmark = pytest.mark.docker

TEST_LABEL = "io.toolcell.test"
RUN_ID = f"images-{uuid.uuid4().hex[:12]}"
WORDCOUNT = f"{TOOLS_DIR}/wordcount.py"
PYRUN = f"{TOOLS_DIR}/pyrun.py"

# What the supervisor does to every container (the subset that matters for the image), so the tools are
# proven to work with a read-only root, no capabilities and a noexec tmpfs.
HARDENED = (
    "--read-only",
    "--tmpfs",
    "/tmp:rw,noexec,nosuid,nodev,size=16m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--pids-limit",
    "64",
    "--memory",
    "256m",
)


def docker(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        pytest.fail("the docker CLI is not installed (run scripts/setup.sh)")
    return subprocess.run([docker_cli, *args], input=input, capture_output=True, timeout=timeout, check=False)


def run(
    *command: str,
    stdin: bytes | None = None,
    image: str = PYTHON_IMAGE,
    options: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """`docker run -i --rm --network none` one labelled throwaway container."""
    name = f"toolcell-test-{uuid.uuid4().hex[:12]}"
    argv = ["run", "-i", "--rm", "--network", "none", "--name", name, "--label", f"{TEST_LABEL}={RUN_ID}"]
    try:
        return docker(*argv, *options, image, *command, input=stdin if stdin is not None else b"", timeout=timeout)
    except subprocess.TimeoutExpired:
        docker("rm", "--force", name)
        raise


def tool(path: str, args: object, options: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    return run("python3", "-u", path, stdin=json.dumps(args).encode(), options=options)


def pyrun(code: str, options: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    return tool(PYRUN, {"code": code}, options)


@pytest.fixture(scope="module", autouse=True)
def engine_and_image() -> Iterator[None]:
    info = docker("info", "--format", "{{ .ServerVersion }}", timeout=30)
    if info.returncode != 0:
        pytest.fail(f"Docker engine not reachable (run scripts/setup.sh): {info.stderr.decode().strip()}")
    for image in (BASE_IMAGE, PYTHON_IMAGE):
        if docker("image", "inspect", image, timeout=30).returncode != 0:
            pytest.fail(f"image {image} is missing: build it with images/build.sh or `toolcell images build`")
    yield
    left = docker("ps", "--all", "--quiet", "--filter", f"label={TEST_LABEL}={RUN_ID}").stdout.split()
    if left:
        docker("rm", "--force", *(c.decode() for c in left))
    assert not left, f"containers left behind: {left}"


def inspect(image: str) -> dict[str, object]:
    out = docker("image", "inspect", image)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)[0]["Config"]
    assert isinstance(config, dict)
    return config


# --- the image itself -----------------------------------------------------------------------------------


def test_images_carry_inputs_hash_label() -> None:
    for image in (BASE_IMAGE, PYTHON_IMAGE):
        labels = inspect(image)["Labels"]
        assert isinstance(labels, dict)
        assert len(labels.get(INPUTS_HASH_LABEL, "")) == 64, f"{image}: {labels}"


def test_runs_as_uid_10001_in_tmp_by_default() -> None:
    config = inspect(PYTHON_IMAGE)
    assert config["User"] == "10001:10001"
    assert not config.get("Entrypoint")
    out = run("sh", "-c", "id -u; id -g; pwd; id -un")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == ["10001", "10001", "/tmp", "tool"]


def test_no_setuid_or_setgid_files() -> None:
    # As root so that find can see everything (and errors count: -xdev keeps it to the image's filesystem).
    out = run("find", "/", "-xdev", "-perm", "/6000", options=("--user", "0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == []


def test_setuid_probe_detects_a_planted_file() -> None:
    """The same probe with a setuid file planted finds it, so the test above cannot pass vacuously."""
    script = "touch /var/tmp/probe && chmod u+s /var/tmp/probe && find / -xdev -perm /6000"
    out = run("sh", "-c", script, options=("--user", "0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == ["/var/tmp/probe"]


def test_tools_are_root_owned_and_read_only() -> None:
    script = f"stat -c '%U:%G %a %n' {TOOLS_DIR} {WORDCOUNT} {PYRUN}"
    script += f"; if touch {WORDCOUNT} 2>/dev/null; then echo writable; fi"
    out = run("sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().splitlines() == [
        f"root:root 755 {TOOLS_DIR}",
        f"root:root 644 {WORDCOUNT}",
        f"root:root 644 {PYRUN}",
    ]


STDLIB_PROBE = r"""
import importlib, json, sys, warnings
warnings.simplefilter("ignore")
mods = sys.argv[1:]
failed = {}
for name in mods:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
import sqlite3, ssl, hashlib, lzma, bz2, zlib, decimal, zoneinfo, ctypes
checks = {
    "sqlite3": sqlite3.connect(":memory:").execute("select 6 * 7").fetchone()[0] == 42,
    "ssl_ca": ssl.create_default_context().cert_store_stats()["x509_ca"] > 0,
    "sha3": hashlib.sha3_256(b"x").hexdigest() != "",
    "lzma": lzma.decompress(lzma.compress(b"x")) == b"x",
    "bz2": bz2.decompress(bz2.compress(b"x")) == b"x",
    "zlib": zlib.decompress(zlib.compress(b"x")) == b"x",
    "decimal": str(decimal.Decimal("0.1") + decimal.Decimal("0.2")) == "0.3",
    "zoneinfo": str(zoneinfo.ZoneInfo("Europe/Berlin")) == "Europe/Berlin",
    "ctypes": ctypes.CDLL(None).getpid() > 0,
}
print(json.dumps({"failed": failed, "checks": checks}))
"""

STDLIB_MODULES = (  # noqa: SIM905 - a word list reads better than 90 quoted items
    "json asyncio venv ensurepip ctypes decimal zlib lzma bz2 gzip zipfile tarfile hashlib hmac secrets "
    "ssl sqlite3 unittest unittest.mock xml.etree.ElementTree xml.dom.minidom xml.sax email "
    "email.mime.text http.client http.server urllib.request html.parser csv pickle shelve dbm dbm.gnu "
    "dbm.ndbm zoneinfo multiprocessing concurrent.futures subprocess socket selectors uuid statistics "
    "fractions random datetime calendar locale gettext logging.handlers argparse configparser tomllib "
    "dataclasses typing enum functools itertools collections re difflib textwrap unicodedata codecs "
    "struct array mmap readline curses pydoc doctest inspect ast dis tracemalloc cProfile pstats lib2to3 "
    "distutils.core sysconfig importlib.metadata importlib.resources wsgiref.simple_server xmlrpc.client "
    "ipaddress shutil tempfile glob fnmatch pathlib queue sched contextvars graphlib"
).split()


def test_python_has_the_full_standard_library() -> None:
    out = run("python3", "-c", STDLIB_PROBE, *STDLIB_MODULES)
    assert out.returncode == 0, out.stderr.decode()
    report = json.loads(out.stdout)
    assert report["failed"] == {}
    assert all(report["checks"].values()), report["checks"]


def test_python_can_create_a_venv_with_pip() -> None:
    out = run("sh", "-c", "python3 -m venv /tmp/v && /tmp/v/bin/python -m pip --version", timeout=180)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.startswith(b"pip ")


def test_no_compilers_or_network_tools() -> None:
    names = "gcc cc c++ make curl wget nc ping ssh"
    out = run("sh", "-c", f"for n in {names}; do command -v $n; done; true")
    assert out.stdout.decode().split() == []


# --- wordcount.py ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world\nsecond line\n", {"lines": 2, "words": 4, "chars": 24}),
        ("", {"lines": 0, "words": 0, "chars": 0}),
        ("grüße  aus\tKöln", {"lines": 1, "words": 3, "chars": 15}),
    ],
)
def test_wordcount_counts(text: str, expected: dict[str, int]) -> None:
    out = tool(WORDCOUNT, {"text": text}, options=HARDENED)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout) == expected
    assert out.stderr == b""


@pytest.mark.parametrize("stdin", [b"", b"not json", b"[1]", b'{"text": 3}', b'{"txt": "a"}'])
def test_wordcount_rejects_bad_arguments(stdin: bytes) -> None:
    out = run("python3", "-u", WORDCOUNT, stdin=stdin)
    assert out.returncode == 2
    assert out.stdout == b""
    assert b"invalid arguments" in out.stderr


# --- pyrun.py (python.run) ------------------------------------------------------------------------------


def test_pyrun_prints_and_exits_zero() -> None:
    out = pyrun("import math\nprint(sum(range(10)), math.pi > 3)", options=HARDENED)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"45 True\n"
    assert out.stderr == b""


def test_pyrun_runs_code_as_a_fresh_main() -> None:
    code = (
        "import sys\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class P:\n"
        "    x: int\n"
        "print(__name__, sys.modules['__main__'].P is P, P(1))\n"
        "print(sorted(k for k in globals() if not k.startswith('__')))\n"
    )
    out = pyrun(code, options=HARDENED)
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stdout.decode().splitlines()
    assert lines[0] == "__main__ True P(x=1)"
    assert lines[1] == "['P', 'dataclass', 'sys']"  # nothing of pyrun's own namespace leaks in


def test_pyrun_uncaught_exception_gives_traceback_and_exit_1() -> None:
    out = pyrun("print('before')\ndef f():\n    return 1 / 0\nf()\n", options=HARDENED)
    assert out.returncode == 1
    assert out.stdout == b"before\n"
    err = out.stderr.decode()
    assert err.startswith("Traceback (most recent call last):")
    assert 'File "<code>", line 4, in <module>' in err
    assert "return 1 / 0" in err  # source lines are shown
    assert err.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "pyrun.py" not in err  # the wrapper's own frame is hidden


def test_pyrun_syntax_error_exits_1() -> None:
    out = pyrun("def f(:\n")
    assert out.returncode == 1
    assert "SyntaxError" in out.stderr.decode()


@pytest.mark.parametrize(("code", "status"), [("raise SystemExit(3)", 3), ("import sys; sys.exit(0)", 0)])
def test_pyrun_system_exit_status_propagates(code: str, status: int) -> None:
    out = pyrun(code)
    assert out.returncode == status, out.stderr.decode()


def test_pyrun_sys_exit_message_goes_to_stderr_with_status_1() -> None:
    out = pyrun("import sys; sys.exit('bye')")
    assert out.returncode == 1
    assert out.stderr == b"bye\n"


@pytest.mark.parametrize("stdin", [b"", b"{", b'"code"', b'{"code": 1}'])
def test_pyrun_rejects_bad_arguments(stdin: bytes) -> None:
    out = run("python3", "-u", PYRUN, stdin=stdin)
    assert out.returncode == 2
    assert b"invalid arguments" in out.stderr


def test_pyrun_output_streams_as_it_happens() -> None:
    """The first line reaches the caller while the code is still running."""
    docker_cli = shutil.which("docker")
    assert docker_cli is not None
    name = f"toolcell-test-{uuid.uuid4().hex[:12]}"
    code = "import time\nprint('first')\ntime.sleep(3)\nprint('second')\n"
    argv = [docker_cli, "run", "-i", "--rm", "--network", "none", "--name", name]
    argv += ["--label", f"{TEST_LABEL}={RUN_ID}", PYTHON_IMAGE, "python3", "-u", PYRUN]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"code": code}).encode())
        proc.stdin.close()
        first = proc.stdout.readline()
        first_at = time.monotonic()
        rest = proc.stdout.read()
        done_at = time.monotonic()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            docker("rm", "--force", name)
            proc.kill()
            proc.wait()
    assert (first, rest) == (b"first\n", b"second\n")
    assert done_at - first_at > 2, "first line arrived only at exit: output is buffered"


def test_pyrun_cannot_reach_the_network() -> None:
    code = "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=3)\n"
    out = pyrun(code, options=HARDENED)
    assert out.returncode == 1
    assert "OSError" in out.stderr.decode() or "unreachable" in out.stderr.decode()


def test_tools_work_under_gvisor_when_the_engine_has_it() -> None:
    runtimes = docker("info", "--format", "{{ range $n, $_ := .Runtimes }}{{ $n }} {{ end }}").stdout.split()
    if b"runsc" not in runtimes:
        pytest.skip("engine has no runsc runtime (optional; scripts/setup.sh registers it when installed)")
    out = tool(WORDCOUNT, {"text": "a b c"}, options=("--runtime", "runsc", *HARDENED))
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout) == {"lines": 1, "words": 3, "chars": 5}


# --- toolcell.images (no engine needed) ------------------------------------------------------------------


def test_build_images_without_script_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="build script not found"):
        build_images(tmp_path)


def test_build_images_without_docker_cli_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "build.sh").write_text("exit 0\n")
    real_which = shutil.which
    monkeypatch.setattr("toolcell.images.shutil.which", lambda cmd: None if cmd == "docker" else real_which(cmd))
    with pytest.raises(ConfigError, match="docker CLI is not installed"):
        build_images(tmp_path)


def test_build_images_runs_the_script_and_returns_its_status(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "build.sh").write_text("echo built >&2\nexit 7\n")
    assert build_images(tmp_path) == 7
