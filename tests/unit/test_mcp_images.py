"""`toolcell images mcp` without an engine: spec checks, the generated context, hashes, error messages.

The engine half (the built toolcell/mcp-time image answering MCP over stdio) is
tests/integration/test_mcp_images.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from toolcell import cli
from toolcell.errors import BackendError, ConfigError
from toolcell.mcpimages.build import _docker_build, docker_build_argv
from toolcell.mcpimages.context import (
    BIN_DIR,
    NODE,
    choose_command,
    console_scripts,
    context_hash,
    inputs_text,
    node_wrapper,
    npm_bins,
    npm_dockerfile,
    platform_tags,
    pypi_dockerfile,
    request_hash,
    wheel_project,
)
from toolcell.mcpimages.fetch import npm_failure, npm_install_argv, pip_download_argv, pip_failure
from toolcell.mcpimages.process import Completed, run_logged
from toolcell.mcpimages.spec import (
    McpImageRequest,
    McpPackage,
    check_name,
    default_name,
    parse_package,
    parse_server_list,
    request,
    version_tag,
)

REPO = Path(__file__).resolve().parents[2]
TIME = request("pypi", "mcp-server-time==2026.10.19", "time")
EVERYTHING = request("npm", "@modelcontextprotocol/server-everything@2026.8.31")


# -- package specs -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "spec", "name", "version", "extras"), [
    ("pypi", "mcp-server-time", "mcp-server-time", None, ()),
    ("pypi", "mcp-server-time==2026.10.19", "mcp-server-time", "2026.10.19", ()),
    ("pypi", "Foo.Bar_baz==1.0rc1", "Foo.Bar_baz", "1.0rc1", ()),
    ("pypi", "pkg[cli,extra-2]==1!2.0.post1.dev3+local.7", "pkg", "1!2.0.post1.dev3+local.7", ("cli", "extra-2")),
    ("npm", "left-pad", "left-pad", None, ()),
    ("npm", "@modelcontextprotocol/server-everything@2026.8.31", "@modelcontextprotocol/server-everything",
     "2026.8.31", ()),
    ("npm", "x@1.0.0-beta.1+build.5", "x", "1.0.0-beta.1+build.5", ()),
])
def test_accepted_specs(source: str, spec: str, name: str, version: str | None, extras: tuple[str, ...]) -> None:
    """A plain registry name with at most an exact version is accepted and split."""
    package = parse_package(source, spec)
    assert (package.source, package.name, package.version, package.extras) == (source, name, version, extras)
    assert package.requirement == spec


@pytest.mark.parametrize(("source", "spec"), [
    ("pypi", "mcp-server-time; rm -rf /"),
    ("pypi", "$(id)"),
    ("pypi", "`id`"),
    ("pypi", "mcp-server-time==1.0; id"),
    ("pypi", "mcp-server-time==1.0 --hash=sha256:00"),
    ("pypi", "-r/etc/passwd"),
    ("pypi", "--index-url=http://evil.example/simple"),
    ("pypi", "--extra-index-url"),
    ("pypi", "git+https://github.com/x/y"),
    ("pypi", "x @ file:///tmp/x"),
    ("pypi", "./local"),
    ("pypi", "/abs/path.whl"),
    ("pypi", "../x"),
    ("pypi", "name>=1.0"),
    ("pypi", "name==1.*"),
    ("pypi", "name ==1"),
    ("pypi", "name==1.0\n--index-url=http://evil"),
    ("pypi", "name[extra;id]==1"),
    ("pypi", "name[../x]"),
    ("pypi", ""),
    ("pypi", "a" * 400),
    ("npm", "@scope/../x"),
    ("npm", "../x"),
    ("npm", "x@^1.0.0"),
    ("npm", "x@latest"),
    ("npm", "x@1.0.0 || 2.0.0"),
    ("npm", "git+ssh://git@github.com/x/y"),
    ("npm", "file:../x"),
    ("npm", "https://evil.example/x.tgz"),
    ("npm", "x; id"),
    ("npm", "x@1.0.0;id"),
    ("npm", "-g"),
    ("npm", "--registry=http://evil.example"),
    ("npm", "@Scope/Name"),
    ("npm", ".hidden"),
    ("npm", "_private"),
    ("npm", ""),
])
def test_refused_specs(source: str, spec: str) -> None:
    """URLs, paths, options, shell characters, ranges and tags never reach pip, npm or the Dockerfile."""
    with pytest.raises(ConfigError) as caught:
        parse_package(source, spec)
    message = str(caught.value)
    assert message.startswith("images mcp: invalid ") and "package spec" in message
    assert "\n" not in message  # the refused text is quoted, escaped and cut
    assert len(message) < 400


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown package source 'pip': expected one of pypi, npm"):
        parse_package("pip", "mcp-server-time")


@pytest.mark.parametrize(("source", "spec", "name"), [
    ("pypi", "mcp-server-time", "time"),
    ("pypi", "mcp_server_fetch", "fetch"),
    ("npm", "@modelcontextprotocol/server-everything", "everything"),
    ("pypi", "weather-mcp", "weather"),
    ("pypi", "Foo.Bar", "foo-bar"),
    ("pypi", "mcp", "mcp"),
    ("npm", "mcp-server", "server"),
])
def test_default_name(source: str, spec: str, name: str) -> None:
    """The short name drops the usual mcp/server affixes and the npm scope."""
    assert default_name(parse_package(source, spec)) == name


@pytest.mark.parametrize("name", ["Time", "a b", "../x", "x/y", "", "-x", "x-", "x--y", "a" * 33, "x;id", "x:1"])
def test_refused_image_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid image name"):
        check_name(name)


@pytest.mark.parametrize("command", ["../bin/sh", "/bin/sh", "x y", "x;id", "-x", ""])
def test_refused_commands(command: str) -> None:
    with pytest.raises(ConfigError, match="invalid command"):
        request("pypi", "mcp-server-time", None, command)


@pytest.mark.parametrize(("version", "tag"), [("2026.10.19", "2026.10.19"), ("1.0+local.1", "1.0_local.1"),
                                               ("1.0.0-beta.1", "1.0.0-beta.1")])
def test_version_tag(version: str, tag: str) -> None:
    assert version_tag(version) == tag


def test_version_tag_refuses_what_docker_would() -> None:
    with pytest.raises(ConfigError, match="can't be an image tag"):
        version_tag("-1")


# -- the servers list ---------------------------------------------------------------------------------

def test_the_default_servers_list() -> None:
    """images/mcp-servers.txt: the three servers set-up builds, pinned (so a re-run fetches nothing)."""
    listed = parse_server_list((REPO / "images" / "mcp-servers.txt").read_text())
    assert [(r.package.source, r.package.name, r.name, r.repository) for r in listed] == [
        ("pypi", "mcp-server-time", "time", "toolcell/mcp-time"),
        ("pypi", "mcp-server-fetch", "fetch", "toolcell/mcp-fetch"),
        ("npm", "@modelcontextprotocol/server-everything", "everything", "toolcell/mcp-everything"),
    ]
    assert all(r.package.version for r in listed)


@pytest.mark.parametrize(("text", "message"), [
    ("pypi\n", "line 1: expected SOURCE SPEC"),
    ("pypi a b c d e\n", "line 1: expected SOURCE SPEC"),
    ("# c\npypi mcp-server-time\npypi x;id\n", "line 3: .*invalid PyPI package spec"),
    ("pypi mcp-server-time time\nnpm server-time time\n", "listed twice: time"),
    ("pip mcp-server-time\n", "line 1: .*unknown package source"),
])
def test_bad_servers_lists(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_server_list(text)


# -- host commands ------------------------------------------------------------------------------------

def test_pip_download_argv() -> None:
    """Wheels only, for CPython 3.11 on the image's glibc; the requirement alone after '--'."""
    argv = pip_download_argv("/py", TIME.package, Path("/ctx/wheels"), "x86_64")
    assert argv[:4] == ["/py", "-m", "pip", "download"]
    assert argv[-2:] == ["--", "mcp-server-time==2026.10.19"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--abi") + 1] == "cp311"
    platforms = {argv[i + 1] for i, a in enumerate(argv) if a == "--platform"}
    assert {"manylinux_2_36_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= platforms
    assert "manylinux_2_37_x86_64" not in platforms and "linux_x86_64" not in platforms


def test_platform_tags_other_arch() -> None:
    assert platform_tags("arm64")[0] == "manylinux_2_36_aarch64"
    assert not any("manylinux1" in t for t in platform_tags("aarch64"))


def test_npm_install_argv() -> None:
    """No install scripts on the host, production dependencies, the exact version saved."""
    argv = npm_install_argv("/npm", EVERYTHING.package, Path("/ctx/app"))
    assert argv[:4] == ["/npm", "install", "--prefix", "/ctx/app"]
    assert {"--ignore-scripts", "--omit=dev", "--save-exact"} <= set(argv)
    assert argv[-2:] == ["--", "@modelcontextprotocol/server-everything@2026.8.31"]


def test_docker_build_argv() -> None:
    argv = docker_build_argv("/docker", Path("/ctx"), "toolcell/mcp-time:1", "s1", {"b": "2", "a": "1"})
    assert argv[:3] == ["/docker", "build", "--network=none"]
    assert argv[argv.index("--build-arg") + 1] == "TOOLCELL_STAGE=s1"
    assert argv[-3:] == ["--tag", "toolcell/mcp-time:1", "/ctx"]
    assert argv[argv.index("--label") + 1] == "a=1"


@pytest.mark.parametrize(("tail", "kind", "fragment"), [
    ("ERROR: No matching distribution found for mcp-server-time==1.0", ConfigError,
     "PyPI has no wheel of mcp-server-time==2026.10.19"),
    ("ERROR: No matching distribution found for lxml>=5", ConfigError, "needs lxml>=5, which has no wheel"),
    ("WARNING: Retrying ... NewConnectionError(...)\nERROR: No matching distribution found for mcp-server-time",
     BackendError, "the registry is unreachable"),
    ("Traceback ...\nOSError: disk full", BackendError, "failed (exit 1); last lines of its output:\nTraceback"),
])
def test_pip_failures(tail: str, kind: type[Exception], fragment: str) -> None:
    error = pip_failure(TIME.package, Completed(status=1, tail=tail))
    assert type(error) is kind and fragment in str(error)


@pytest.mark.parametrize(("tail", "kind", "fragment"), [
    ("npm error code E404\nnpm error 404 Not Found - GET https://registry", ConfigError,
     "the npm registry has no package @modelcontextprotocol/server-everything"),
    ("npm error code ETARGET\nnpm error notarget No matching version", ConfigError,
     "npm has no version 2026.8.31 of"),
    ("npm error code ECONNREFUSED", BackendError, "the registry is unreachable"),
    ("npm error code EACCES", BackendError, "failed (exit 1)"),
])
def test_npm_failures(tail: str, kind: type[Exception], fragment: str) -> None:
    error = npm_failure(EVERYTHING.package, Completed(status=1, tail=tail))
    assert type(error) is kind and fragment in str(error)


def test_run_logged_shows_a_bounded_tail(tmp_path: Path) -> None:
    """A command that floods its output: only the last lines, each cut, reach the message."""
    code = "import sys\nfor i in range(100000): print(i, 'x' * 1000)\nprint('\\x1b[31mlast')"
    done = run_logged([sys.executable, "-c", code], tmp_path / "log", timeout=60)
    lines = done.tail.splitlines()
    assert done.status == 0 and len(lines) == 25
    assert all(len(line) <= 300 for line in lines)
    assert lines[-1] == "?[31mlast" and lines[0].startswith("99976 ")


def test_a_failed_build_reports_the_last_lines(tmp_path: Path) -> None:
    """docker build failing: BackendError with the log's last lines, not its first."""
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nfor i in $(seq 1 500); do echo \"step $i\"; done\necho 'boom at the end'\nexit 7\n")
    fake.chmod(0o755)
    with pytest.raises(BackendError) as caught:
        _docker_build(str(fake), tmp_path, tmp_path / "build.log", "toolcell/mcp-x:1", {})
    message = str(caught.value)
    assert message.startswith("docker build toolcell/mcp-x:1 failed (exit 7)")
    assert message.endswith("boom at the end") and "step 1\n" not in message


# -- the generated context ----------------------------------------------------------------------------

@pytest.mark.parametrize(("filename", "project"), [
    ("mcp_server_time-2026.10.19-py3-none-any.whl", ("mcp-server-time", "2026.10.19")),
    ("pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.whl", ("pydantic-core", "2.50.5")),
    ("x-1.0-1build-py3-none-any.whl", ("x", "1.0")),
    ("x-1.0.tar.gz", None),
    ("x-1.0-py3.whl", None),
])
def test_wheel_project(filename: str, project: tuple[str, str] | None) -> None:
    assert wheel_project(filename) == project


@pytest.mark.parametrize(("text", "names"), [
    ("[console_scripts]\nmcp-server-time = mcp_server_time:main\n", ("mcp-server-time",)),
    ("[console_scripts]\nb = m:b\na = m:a\n[gui_scripts]\ng = m:g\n", ("a", "b")),
    ("[console_scripts]\n../evil = m:x\nx;id = m:y\nok = m:z\n", ("ok",)),
    ("[other]\nx = m:x\n", ()),
    ("not an ini file [[[", ()),
    ("", ()),
])
def test_console_scripts(text: str, names: tuple[str, ...]) -> None:
    assert console_scripts(text) == names


@pytest.mark.parametrize(("manifest", "bins"), [
    ({"name": "@modelcontextprotocol/server-everything", "bin": {"mcp-server-everything": "dist/index.js"}},
     {"mcp-server-everything": "dist/index.js"}),
    ({"name": "@scope/tool", "bin": "./cli.js"}, {"tool": "cli.js"}),
    ({"name": "x", "bin": {"a": "../../etc/passwd", "b": "/bin/sh", "c": "a b.js", "d;id": "x.js", "e": "ok/e.js"}},
     {"e": "ok/e.js"}),
    ({"name": "x", "bin": ["a.js"]}, {}),
    ({"name": "x"}, {}),
])
def test_npm_bins(manifest: dict[str, object], bins: dict[str, str]) -> None:
    assert npm_bins(manifest) == bins


@pytest.mark.parametrize(("names", "wanted", "chosen"), [
    (["mcp-server-time"], None, "mcp-server-time"),
    (["other", "mcp_server_time"], None, "mcp_server_time"),
    (["a", "b"], "b", "b"),
])
def test_choose_command(names: list[str], wanted: str | None, chosen: str) -> None:
    assert choose_command(names, TIME.package, wanted) == chosen


@pytest.mark.parametrize(("names", "wanted", "reason"), [
    ([], None, "declares no executable"),
    (["a", "b"], None, "several executables (a, b); pick one with --command"),
    (["a"], "b", "has no executable 'b' (it has: a)"),
])
def test_choose_command_refusals(names: list[str], wanted: str | None, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        choose_command(names, TIME.package, wanted)


def test_node_wrapper() -> None:
    assert node_wrapper("@modelcontextprotocol/server-everything", "dist/index.js") == (
        "#!/bin/sh\nexec /usr/local/bin/node "
        "/opt/mcp/app/node_modules/@modelcontextprotocol/server-everything/dist/index.js \"$@\"\n"
    )


def _hardened(dockerfile: str, command: str) -> list[str]:
    """The checks both Dockerfiles pass; returns the lines."""
    lines = dockerfile.splitlines()
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM toolcell/python:bookworm AS build", "FROM toolcell/python:bookworm"]
    assert not any(line.startswith("ENTRYPOINT") for line in lines)
    users = [line for line in lines if line.startswith("USER ")]
    assert users[-1] == "USER 10001:10001"
    assert lines[-1] == f'CMD ["{command}"]'
    assert "find / -xdev -perm /6000" in dockerfile
    assert "chown -R 0:0 /opt/mcp" in dockerfile and "chmod -R u=rwX,go=rX /opt/mcp" in dockerfile
    assert "COPY --from=build /opt/mcp/ /opt/mcp/" in dockerfile
    assert lines[2:4] == ["ARG TOOLCELL_STAGE", "LABEL io.toolcell.mcp-stage=$TOOLCELL_STAGE"]
    return lines


def test_pypi_dockerfile() -> None:
    """Installs from /wheels only (no index), the exact version; links every console script."""
    text = pypi_dockerfile(TIME, "2026.10.19", ["mcp-server-time", "extra-tool"], "mcp-server-time")
    _hardened(text, f"{BIN_DIR}/mcp-server-time")
    assert "--no-index --only-binary=:all: --find-links /wheels mcp-server-time==2026.10.19" in text
    assert "ln -s ../venv/bin/extra-tool /opt/mcp/bin/extra-tool" in text
    assert "ln -s ../venv/bin/mcp-server-time /opt/mcp/bin/mcp-server-time" in text
    assert "python3 -m venv --without-pip /opt/mcp/venv" in text
    assert "test -x /opt/mcp/bin/mcp-server-time" in text


def test_pypi_dockerfile_quotes_extras() -> None:
    req = request("pypi", "pkg[cli]==1.0", "pkg")
    assert " 'pkg[cli]==1.0'" in pypi_dockerfile(req, "1.0", ["pkg"], "pkg")


def test_npm_dockerfile() -> None:
    text = npm_dockerfile(EVERYTHING, "2026.8.31", "mcp-server-everything")
    _hardened(text, f"{BIN_DIR}/mcp-server-everything")
    assert f"COPY node {NODE}" in text and f"RUN {NODE} --version >/dev/null" in text
    assert "COPY app/ /opt/mcp/app/" in text


def test_inputs_text() -> None:
    text = inputs_text(TIME, "2026.10.19", "mcp-server-time", "b" * 64, ["wheel aa x.whl"])
    assert text.splitlines()[1:] == [
        "source pypi", "package mcp-server-time", "version 2026.10.19", "requirement mcp-server-time==2026.10.19",
        "image toolcell/mcp-time", "command /opt/mcp/bin/mcp-server-time", f"base toolcell/python:bookworm {'b' * 64}",
        "wheel aa x.whl",
    ]


def _context(root: Path) -> Path:
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "a.whl").write_bytes(b"one")
    (root / "Dockerfile").write_text("FROM x\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").symlink_to("../wheels/a.whl")
    return root


def _edit_content(root: Path) -> None:
    (root / "wheels" / "a.whl").write_bytes(b"two")


def _edit_mode(root: Path) -> None:
    (root / "Dockerfile").chmod(0o755)


def _edit_link(root: Path) -> None:
    (root / "bin" / "tool").unlink()
    (root / "bin" / "tool").symlink_to("../Dockerfile")


def _edit_add(root: Path) -> None:
    (root / "wheels" / "b.whl").write_bytes(b"")


@pytest.mark.parametrize("edit", [_edit_content, _edit_mode, _edit_link, _edit_add])
def test_context_hash_sees_every_change(tmp_path: Path, edit: object) -> None:
    """Same context, same hash (the skip works); any change to content, mode, link or files changes it."""
    first, second = _context(tmp_path / "a"), _context(tmp_path / "b")
    assert context_hash(first, "base") == context_hash(second, "base")
    assert context_hash(first, "base") != context_hash(first, "other base")
    assert callable(edit)
    edit(second)
    assert context_hash(first, "base") != context_hash(second, "base")


@pytest.mark.parametrize("changed", [
    McpImageRequest(McpPackage("pypi", "mcp-server-time", "2026.10.20"), "time"),
    McpImageRequest(McpPackage("pypi", "mcp-server-time", "2026.10.19"), "clock"),
    McpImageRequest(McpPackage("pypi", "mcp-server-time", "2026.10.19"), "time", "mcp-server-time"),
    McpImageRequest(McpPackage("pypi", "mcp-server-time", "2026.10.19", ("x",)), "time"),
])
def test_request_hash(changed: McpImageRequest) -> None:
    """The pre-fetch skip key covers version, name, command and extras, and the base and node binary."""
    same = McpImageRequest(McpPackage("pypi", "mcp-server-time", "2026.10.19"), "time")
    assert request_hash(TIME, "base") == request_hash(same, "base")
    assert request_hash(changed, "base") != request_hash(TIME, "base")
    assert request_hash(TIME, "base") != request_hash(TIME, "base2")
    assert request_hash(TIME, "base", "node1") != request_hash(TIME, "base", "node2")


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "fragment"), [
    (["--pypi", "mcp-server-time;id"], "invalid PyPI package spec 'mcp-server-time;id'"),
    (["--pypi=--index-url=http://evil.example"], "invalid PyPI package spec '--index-url=http://evil.example'"),
    (["--npm", "x@latest"], "an exact version after '@'"),
    (["--pypi", "mcp-server-time", "--name", "Bad/Name"], "invalid image name 'Bad/Name'"),
    (["--pypi", "mcp-server-time", "--command", "../sh"], "invalid command '../sh'"),
])
def test_cli_refuses_before_any_host_command(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 3 with a clear message; no pip, npm or docker is run (PATH holds none of them)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["images", "mcp", *argv, "--store", ""]) == 3
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("toolcell: ")


def test_cli_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["images", "mcp", "--pypi", "a", "--npm", "b"])
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_servers_list_takes_no_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "servers.txt"
    listing.write_text("pypi mcp-server-time\n")
    assert cli.main(["images", "mcp", "--from", str(listing), "--name", "x", "--store", ""]) == 3
    assert "--name and --command apply to one package" in capsys.readouterr().err
