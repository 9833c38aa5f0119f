"""``toolcell client setup | list``: write an MCP client's configuration to start ``toolcell mcp``.

Each client keeps its servers in its own JSON file and shape:

=======  ===============================================  ==============================================
client   file (default)                                   shape
=======  ===============================================  ==============================================
claude   Claude Desktop's ``claude_desktop_config.json``  ``{"mcpServers": {NAME: {command, args}}}``
cursor   ``~/.cursor/mcp.json``                           ``{"mcpServers": {NAME: {command, args}}}``
vscode   ``.vscode/mcp.json`` (workspace) or the user     ``{"servers": {NAME: {"type": "stdio",
         profile's ``mcp.json`` (``--user``)              command, args}}}``
=======  ===============================================  ==============================================

Clients start the server with their own environment, not the caller's shell: no ``PATH`` entry for a
virtual environment, no ``TOOLCELL_LISTEN``, often no ``XDG_RUNTIME_DIR``. So the entry names the
toolcell executable by absolute path and the supervisor by an explicit ``--target``.

The merge functions are pure (document in, document out); ``read_document`` and ``write_atomic`` are the
only I/O. A file that is not a JSON object is refused, never rewritten: it may hold comments or settings
this tool would lose.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENTS",
    "Client",
    "ClientFileError",
    "client_paths",
    "has_entry",
    "merge",
    "read_document",
    "render",
    "server_entry",
    "toolcell_command",
    "write_atomic",
]

MAX_FILE_BYTES = 4 * 1024 * 1024  # a client's config is a few KiB; a bigger one is not ours to rewrite


class ClientFileError(Exception):
    """A client's file cannot be read or is not a JSON object we can merge into; nothing was written."""


@dataclass(frozen=True)
class Client:
    """One MCP client's file format: where its servers live in the document and what an entry holds."""

    name: str
    title: str
    section: str
    typed: bool  # VS Code requires "type": "stdio" in each entry


CLIENTS: dict[str, Client] = {c.name: c for c in (
    Client("claude", "Claude Desktop", "mcpServers", typed=False),
    Client("cursor", "Cursor", "mcpServers", typed=False),
    Client("vscode", "VS Code", "servers", typed=True),
)}


def toolcell_command(argv0: str, executable: str, which: str | None) -> list[str]:
    """The absolute command that starts toolcell: the running script, the one beside this Python, the one on
    PATH, or this Python with ``-m toolcell``.

    ``argv0`` is ``sys.argv[0]``: the console script when run as ``toolcell``, ``.../__main__.py`` under
    ``python -m toolcell`` (not executable by itself).
    """
    script = Path(argv0)
    if script.name != "__main__.py" and script.name and not script.name.endswith(".py"):
        resolved = Path(shutil.which(argv0) or argv0)
        if resolved.is_file() and os.access(resolved, os.X_OK):
            return [str(resolved.absolute())]
    beside = Path(executable).absolute().parent / "toolcell"  # the environment's own script (a venv's bin/)
    for candidate in (beside, Path(which) if which else None):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate.absolute())]
    return [str(Path(executable).absolute()), "-m", "toolcell"]


def server_entry(client: Client, command: list[str], target: str) -> dict[str, Any]:
    """The client's entry that runs ``toolcell mcp --target TARGET`` (stdio)."""
    entry: dict[str, Any] = {"type": "stdio"} if client.typed else {}
    entry["command"] = command[0]
    entry["args"] = [*command[1:], "mcp", "--target", target]
    return entry


def merge(document: Mapping[str, Any], client: Client, name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with ``entry`` as server ``name``: every other key and server kept as it was."""
    section = document.get(client.section, {})
    if not isinstance(section, dict):
        raise ClientFileError(f"its {client.section!r} is a {type(section).__name__}, not an object")
    return {**document, client.section: {**section, name: dict(entry)}}


def has_entry(document: Mapping[str, Any], client: Client, name: str) -> bool:
    """Whether ``document`` lists a server ``name`` for this client."""
    section = document.get(client.section)
    return isinstance(section, dict) and name in section


def render(document: Mapping[str, Any]) -> str:
    """The file's text: two-space indented JSON, as the clients write it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def parse_document(text: str) -> dict[str, Any]:
    """A client's file's text as a JSON object; empty text is an empty object."""
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientFileError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); comments "
                              "and trailing commas are not JSON: fix or move the file, or use --file") from None
    if not isinstance(document, dict):
        raise ClientFileError(f"its top level is a {type(document).__name__}, not a JSON object")
    return document


def read_document(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, or None when it does not exist."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientFileError(f"cannot read it: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ClientFileError(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        return parse_document(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ClientFileError("not UTF-8 text") from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a temporary file in the same directory, written and synced,
    given the old file's permissions (0600 for a new file), then renamed over it. Parent directories are
    created. A symbolic link is followed: its target is replaced, the link stays."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def client_paths(client: Client, *, home: Path, cwd: Path, environ: Mapping[str, str],
                 platform: str = sys.platform) -> dict[str, Path]:
    """Where the client reads its servers, by scope (``user``, and ``workspace`` for VS Code)."""
    if platform == "darwin":
        config_home = home / "Library" / "Application Support"
    elif platform.startswith("win"):
        config_home = Path(environ.get("APPDATA") or home / "AppData" / "Roaming")
    else:
        config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    if client.name == "claude":
        return {"user": config_home / "Claude" / "claude_desktop_config.json"}
    if client.name == "cursor":
        return {"user": home / ".cursor" / "mcp.json"}
    return {"workspace": cwd / ".vscode" / "mcp.json", "user": config_home / "Code" / "User" / "mcp.json"}
