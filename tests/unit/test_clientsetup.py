"""``toolcell client setup | list``: each client's format, merging, refusals, atomic writes, dry runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from toolcell.clientsetup import (
    CLIENTS,
    ClientFileError,
    client_paths,
    has_entry,
    merge,
    parse_document,
    server_entry,
    toolcell_command,
    write_atomic,
)

TARGET = "unix:///run/toolcell/toolcell.sock"
CMD = ["/opt/venv/bin/toolcell"]


@pytest.mark.parametrize(("client", "expected"), [
    ("claude", {"mcpServers": {"toolcell": {"command": CMD[0], "args": ["mcp", "--target", TARGET]}}}),
    ("cursor", {"mcpServers": {"toolcell": {"command": CMD[0], "args": ["mcp", "--target", TARGET]}}}),
    ("vscode", {"servers": {"toolcell": {"type": "stdio", "command": CMD[0], "args": ["mcp", "--target", TARGET]}}}),
])
def test_each_client_gets_its_own_format(client: str, expected: dict[str, Any]) -> None:
    c = CLIENTS[client]
    assert merge({}, c, "toolcell", server_entry(c, CMD, TARGET)) == expected


@pytest.mark.parametrize(("client", "before", "kept"), [
    ("claude", {"mcpServers": {"fs": {"command": "npx", "args": ["x"]}}, "globalShortcut": "Ctrl+Space"},
     {"globalShortcut": "Ctrl+Space"}),
    ("cursor", {"mcpServers": {"fs": {"command": "npx"}, "toolcell": {"command": "old"}}}, {}),
    ("vscode", {"servers": {"fs": {"type": "stdio", "command": "npx"}}, "inputs": [{"id": "key"}]},
     {"inputs": [{"id": "key"}]}),
])
def test_merge_keeps_other_servers_and_keys_and_replaces_ours(client: str, before: dict[str, Any],
                                                               kept: dict[str, Any]) -> None:
    c = CLIENTS[client]
    snapshot = json.loads(json.dumps(before))
    after = merge(before, c, "toolcell", server_entry(c, CMD, TARGET))
    assert before == snapshot  # pure: the input is not changed
    assert after[c.section]["fs"] == before[c.section]["fs"]
    assert after[c.section]["toolcell"]["args"] == ["mcp", "--target", TARGET]
    assert {k: v for k, v in after.items() if k != c.section} == kept
    assert has_entry(after, c, "toolcell") and not has_entry(before if client != "cursor" else {}, c, "toolcell")


@pytest.mark.parametrize(("text", "problem"), [
    ('{"mcpServers": {}, }', "not valid JSON"),
    ('// comment\n{"servers": {}}', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('"text"', "not a JSON object"),
])
def test_invalid_documents_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ClientFileError, match=problem):
        parse_document(text)


def test_a_section_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ClientFileError, match="not an object"):
        merge({"mcpServers": ["x"]}, CLIENTS["claude"], "toolcell", {"command": "x"})


@pytest.mark.parametrize(("text", "expected"), [("", {}), ("  \n", {}), ('{"a": 1}', {"a": 1})])
def test_empty_and_valid_documents_parse(text: str, expected: dict[str, Any]) -> None:
    assert parse_document(text) == expected


@pytest.mark.parametrize(("platform", "environ", "claude", "vscode_user"), [
    ("linux", {}, ".config/Claude/claude_desktop_config.json", ".config/Code/User/mcp.json"),
    ("linux", {"XDG_CONFIG_HOME": "/x"}, "/x/Claude/claude_desktop_config.json", "/x/Code/User/mcp.json"),
    ("darwin", {}, "Library/Application Support/Claude/claude_desktop_config.json",
     "Library/Application Support/Code/User/mcp.json"),
    ("win32", {"APPDATA": "/appdata"}, "/appdata/Claude/claude_desktop_config.json", "/appdata/Code/User/mcp.json"),
])
def test_client_paths(platform: str, environ: dict[str, str], claude: str, vscode_user: str) -> None:
    home, cwd = Path("/home/u"), Path("/work/p")

    def paths(name: str) -> dict[str, Path]:
        return client_paths(CLIENTS[name], home=home, cwd=cwd, environ=environ, platform=platform)

    assert paths("claude") == {"user": home / claude}
    assert paths("cursor") == {"user": home / ".cursor/mcp.json"}
    assert paths("vscode") == {"workspace": cwd / ".vscode/mcp.json", "user": home / vscode_user}


def test_toolcell_command_is_absolute(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "toolcell"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    python = tmp_path / "bin" / "python"
    assert toolcell_command(str(script), "/usr/bin/python3", None) == [str(script)]
    assert toolcell_command("/src/runtime/__main__.py", str(python), None) == [str(script)]  # beside the venv's Python
    assert toolcell_command("/src/runtime/__main__.py", "/nowhere/python", str(script)) == [str(script)]
    assert toolcell_command("-c", "/nowhere/python", None) == ["/nowhere/python", "-m", "toolcell"]


def test_write_atomic_keeps_permissions_creates_parents_and_follows_links(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b" / "mcp.json"
    write_atomic(new, "{}\n")
    assert new.read_text() == "{}\n" and stat.S_IMODE(new.stat().st_mode) == 0o600
    old = tmp_path / "old.json"
    old.write_text("{}")
    old.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(old)
    write_atomic(link, '{"x": 1}\n')
    assert link.is_symlink() and old.read_text() == '{"x": 1}\n' and stat.S_IMODE(old.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "link.json", "old.json"]  # no temporary left


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"keep": true}')

    def broken(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write_atomic(path, "{}")
    assert path.read_text() == '{"keep": true}' and [p.name for p in tmp_path.iterdir()] == ["mcp.json"]


def run_cli(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("TOOLCELL_LISTEN", None)
    return subprocess.run([sys.executable, "-m", "toolcell", "client", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize(("argv", "relative", "section"), [
    (["setup", "claude"], ".config/Claude/claude_desktop_config.json", "mcpServers"),
    (["setup", "cursor"], ".cursor/mcp.json", "mcpServers"),
    (["setup", "vscode"], "work/.vscode/mcp.json", "servers"),
    (["setup", "vscode", "--user"], ".config/Code/User/mcp.json", "servers"),
])
def test_cli_setup_merges_and_dry_run_writes_nothing(tmp_path: Path, argv: list[str], relative: str,
                                                    section: str) -> None:
    (tmp_path / "work").mkdir()
    path = tmp_path / relative
    dry = run_cli(*argv, "--target", TARGET, "--dry-run", cwd=tmp_path / "work", home=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)[section]["toolcell"]["args"][-2:] == ["--target", TARGET]
    assert not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({section: {"other": {"command": "npx"}}, "theme": "dark"}))
    done = run_cli(*argv, "--target", TARGET, cwd=tmp_path / "work", home=tmp_path)
    assert done.returncode == 0, done.stderr
    written = json.loads(path.read_text())
    entry = written[section]["toolcell"]
    assert written["theme"] == "dark" and written[section]["other"] == {"command": "npx"}
    assert Path(entry["command"]).is_absolute() and entry["args"][-3:] == ["mcp", "--target", TARGET]
    listed = run_cli("list", cwd=tmp_path / "work", home=tmp_path)
    assert f"{path}  (toolcell: yes)" in listed.stdout


def test_cli_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / ".cursor" / "mcp.json"
    path.parent.mkdir()
    path.write_text('{"mcpServers": {} // mine\n}')
    result = run_cli("setup", "cursor", "--target", TARGET, cwd=tmp_path, home=tmp_path)
    assert result.returncode == 3 and "not valid JSON" in result.stderr and "not changed" in result.stderr
    assert path.read_text() == '{"mcpServers": {} // mine\n}'


def test_cli_default_target_is_an_explicit_socket_address(tmp_path: Path) -> None:
    result = run_cli("setup", "cursor", "--dry-run", cwd=tmp_path, home=tmp_path)
    args = json.loads(result.stdout)["mcpServers"]["toolcell"]["args"]
    assert args[-2] == "--target" and args[-1].startswith("unix:///") and args[-1].endswith("toolcell.sock")
