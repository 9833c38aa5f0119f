"""toolcell workspace: files into and out of a sandbox, run inside it (issue 18).

Runs as the tool's uid in the sandbox's scratch tmpfs; its source is put in front of the session host's
(``python3 -I -S -c``), so: standard library only, top-level imports, functions and constants, each name
prefixed ``ws_``/``WS_``, nothing done at import.

``ws_write_inputs(root, inputs)`` writes the caller's files under ``root`` and never outside it: every
directory is entered through a descriptor opened ``O_NOFOLLOW`` relative to its parent's, and each file is
created ``O_EXCL|O_NOFOLLOW``, so a symlink, FIFO or file already in the way (planted by the tool in an
earlier call of its session) is an error, not something written through. Names are checked again here.

``ws_collect(root, max_files, max_bytes, max_file_bytes)`` reads what the tool left under ``root``, the
same way: symlinks are never followed (not even to a directory), only regular files are read (opened
``O_NONBLOCK|O_NOFOLLOW`` and checked with ``fstat``: a file swapped for a FIFO or device after the listing
is not read), and every cost is bounded: files, bytes in all, bytes per file (a 1 TiB sparse file costs
one bounded read), directory entries visited, depth. Order is sorted by name. The payload (ASCII JSON)::

    {"files": [{"path": "a/b.txt", "size": 12, "data": "<base64>", "truncated": false}],
     "skipped": {"symlink": 1, "fifo": 1, ...}, "truncated": false}

``skipped`` counts by reason what was seen and not copied: ``symlink``, ``fifo``, ``socket``, ``device``,
``other``, ``bad_name`` (not UTF-8, control characters, backslash), ``too_deep``, ``too_many`` (over
``max_files``), ``unreadable``, ``vanished``, ``walk_limit`` (the entry budget ran out), ``root``
(``root`` is not a directory).
"""
import base64
import contextlib
import errno
import json
import os
import stat
import typing

WS_MAX_DEPTH = 16  # path components
WS_MAX_NAME_BYTES = 255  # per component (NAME_MAX)
# Control characters (C0, DEL, C1), the separator and backslash: never in a name this module writes or copies.
WS_BAD_CHARS = frozenset([chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)] + ["/", "\\"])
WS_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WS_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
WS_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
WS_READ_CHUNK = 1 << 20
# Directory entries one collection may visit: 10 per file it may keep, plus this.
WS_ENTRY_FACTOR = 10
WS_ENTRY_BASE = 1000


def ws_name_ok(name: str) -> bool:
    """One path component: not empty, not ``.``/``..``, UTF-8 (no lone surrogate), at most 255 bytes,
    no control character, separator or backslash."""
    if not name or name in (".", "..") or len(name) > WS_MAX_NAME_BYTES:
        return False
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(raw) <= WS_MAX_NAME_BYTES and WS_BAD_CHARS.isdisjoint(name)


def ws_split(path: object) -> list[str]:
    """The components of a caller's relative path; ValueError (naming no part of it) if it is not clean."""
    if not isinstance(path, str) or not path:
        raise ValueError("path is not a non-empty string")
    if len(path) > WS_MAX_DEPTH * (WS_MAX_NAME_BYTES + 1):
        raise ValueError("path is too long")
    if path.startswith("/"):
        raise ValueError("path is absolute")
    parts = path.split("/")
    if len(parts) > WS_MAX_DEPTH:
        raise ValueError("path is too deep")
    for part in parts:
        if not ws_name_ok(part):
            raise ValueError("path has an empty, '.', '..', over-long or control-character component")
    return parts


def ws_open_root(root: str, create: bool) -> int:
    """A descriptor on the directory ``root`` (its last component never a symlink)."""
    if create:
        os.makedirs(root, 0o700, exist_ok=True)
    return os.open(root, WS_DIR_FLAGS)


def ws_write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def ws_write_inputs(root: str, inputs: list[dict[str, typing.Any]]) -> None:
    """Write each ``{"path": "rel/path", "data": "<base64>"}`` under ``root`` (created 0700 if missing).

    Everything is checked before anything is written; a name already taken (file, directory, symlink,
    FIFO) is an error. Raises ValueError with a short message that names the input's index, never its data.
    """
    if not isinstance(inputs, list):
        raise ValueError("inputs is not a list")
    planned: list[tuple[list[str], bytes]] = []
    seen: set[str] = set()
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise ValueError(f"inputs[{i}] is not an object")
        try:
            parts = ws_split(item.get("path"))
        except ValueError as exc:
            raise ValueError(f"inputs[{i}]: {exc}") from None
        data = item.get("data")
        if not isinstance(data, str):
            raise ValueError(f"inputs[{i}]: data is not a string")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise ValueError(f"inputs[{i}]: data is not base64") from None
        key = "/".join(parts)
        if key in seen:
            raise ValueError(f"inputs[{i}]: duplicate path")
        seen.add(key)
        planned.append((parts, raw))
    try:
        top = ws_open_root(root, create=True)
    except OSError as exc:
        if not planned:
            return  # nothing to write: the tool finds out for itself
        raise ValueError(f"workspace directory unusable ({os.strerror(exc.errno or 0)})") from None
    try:
        for i, (parts, raw) in enumerate(planned):
            ws_write_one(top, parts, raw, i)
    finally:
        os.close(top)


def ws_write_one(top: int, parts: list[str], raw: bytes, index: int) -> None:
    """Create one file under the directory ``top``, entering each directory ``O_NOFOLLOW``."""
    fds: list[int] = []
    try:
        here = top
        for name in parts[:-1]:
            with contextlib.suppress(FileExistsError):  # an earlier input's (or call's): entered O_NOFOLLOW
                os.mkdir(name, 0o700, dir_fd=here)
            here = os.open(name, WS_DIR_FLAGS, dir_fd=here)
            fds.append(here)
        fd = os.open(parts[-1], WS_WRITE_FLAGS, 0o600, dir_fd=here)
        try:
            ws_write_fd(fd, raw)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            reason = "something is already at its path"
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            reason = "a directory on its path is a symlink or not a directory"
        else:
            reason = os.strerror(exc.errno or 0)
        raise ValueError(f"inputs[{index}]: not written: {reason}") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)


def ws_kind(mode: int) -> str:
    """The ``skipped`` reason for a file that is not regular."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def ws_skip(state: dict[str, typing.Any], reason: str, n: int = 1) -> None:
    skipped: dict[str, int] = state["skipped"]
    skipped[reason] = skipped.get(reason, 0) + n


def ws_read_bounded(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd`` (fewer at EOF), read in bounded chunks."""
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.read(fd, min(WS_READ_CHUNK, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def ws_copy_file(parent: int, name: str, path: str, state: dict[str, typing.Any]) -> None:
    """Copy one regular file (re-checked with fstat after an O_NOFOLLOW|O_NONBLOCK open)."""
    try:
        fd = os.open(name, WS_READ_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            ws_skip(state, "symlink")  # swapped for a symlink since the listing
        elif exc.errno == errno.ENOENT:
            ws_skip(state, "vanished")
        else:
            ws_skip(state, "unreadable")
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            ws_skip(state, ws_kind(info.st_mode))
            return
        room = max(0, min(state["max_file_bytes"], state["max_bytes"] - state["bytes"]))
        data = ws_read_bounded(fd, room) if room else b""
    except OSError:
        ws_skip(state, "unreadable")
        return
    finally:
        os.close(fd)
    size = max(info.st_size, len(data))
    truncated = len(data) < size
    state["bytes"] += len(data)
    state["truncated"] = state["truncated"] or truncated
    state["files"].append({"path": path, "size": size, "data": base64.b64encode(data).decode("ascii"),
                           "truncated": truncated})


def ws_list(fd: int, state: dict[str, typing.Any]) -> list[os.DirEntry[str]]:
    """The entries of the directory ``fd``, sorted by name; once the entry budget is spent, those listed
    so far (and no directory is entered after this one)."""
    entries: list[os.DirEntry[str]] = []
    with os.scandir(fd) as it:
        for entry in it:
            if state["entries"] >= state["max_entries"]:
                ws_skip(state, "walk_limit")
                state["truncated"] = True
                state["stopped"] = True
                break
            state["entries"] += 1
            entries.append(entry)
    entries.sort(key=lambda e: e.name)
    return entries


def ws_walk(fd: int, prefix: str, depth: int, state: dict[str, typing.Any]) -> None:
    """Copy the directory ``fd``'s regular files and walk its directories (``depth``: its components)."""
    for entry in ws_list(fd, state):
        name = entry.name
        if not ws_name_ok(name):
            ws_skip(state, "bad_name")
            continue
        path = prefix + name
        try:
            if entry.is_symlink():
                ws_skip(state, "symlink")
            elif entry.is_dir(follow_symlinks=False):
                ws_enter(fd, name, path, depth + 1, state)
            elif entry.is_file(follow_symlinks=False):
                if len(state["files"]) >= state["max_files"]:
                    ws_skip(state, "too_many")
                    state["truncated"] = True
                else:
                    ws_copy_file(fd, name, path, state)
            else:
                ws_skip(state, ws_kind(entry.stat(follow_symlinks=False).st_mode))
        except FileNotFoundError:
            ws_skip(state, "vanished")


def ws_enter(parent: int, name: str, path: str, depth: int, state: dict[str, typing.Any]) -> None:
    """Walk the subdirectory ``name`` of ``parent`` (``depth``: the components of its path)."""
    if state["stopped"]:
        return  # the entry budget is spent
    if depth >= WS_MAX_DEPTH:  # a file inside would have more than WS_MAX_DEPTH components
        ws_skip(state, "too_deep")
        return
    try:
        fd = os.open(name, WS_DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        ws_skip(state, "symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else
                "vanished" if exc.errno == errno.ENOENT else "unreadable")
        return
    try:
        ws_walk(fd, path + "/", depth, state)
    except OSError:
        ws_skip(state, "unreadable")
    finally:
        os.close(fd)


def ws_collect(root: str, max_files: int, max_bytes: int, max_file_bytes: int) -> bytes:
    """The regular files under ``root`` as the JSON payload (ASCII bytes); ``root`` missing: no files."""
    max_files, max_bytes, max_file_bytes = (max(0, int(v)) for v in (max_files, max_bytes, max_file_bytes))
    state: dict[str, typing.Any] = {
        "files": [], "skipped": {}, "truncated": False, "stopped": False, "entries": 0, "bytes": 0,
        "max_files": max_files, "max_bytes": max_bytes, "max_file_bytes": max_file_bytes,
        "max_entries": WS_ENTRY_FACTOR * max_files + WS_ENTRY_BASE,
    }
    try:
        top = ws_open_root(root, create=False)
    except FileNotFoundError:
        top = -1
    except OSError:
        ws_skip(state, "root")
        top = -1
    if top >= 0:
        try:
            ws_walk(top, "", 0, state)
        except OSError:
            ws_skip(state, "unreadable")
        finally:
            os.close(top)
    payload = {"files": state["files"], "skipped": state["skipped"], "truncated": state["truncated"]}
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")
