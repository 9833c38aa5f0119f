"""Paths toolcell trusts: private directories, and files and sockets no other local user can have planted.

A local user who can create a path before toolcell does (``/tmp/toolcell-<uid>``), or swap one of its
directories, can plant a socket that receives a caller's arguments and token, or a symlink that turns an
append into a write elsewhere. So, before a path is used:

    directory   a real directory (never followed through a symlink), owned by the effective uid (the
                client also accepts root's system directories such as /run/toolcell), writable by no one
                else (no group or other write bit); created 0700 when absent
    ancestors   each owned by root or the effective uid, and not writable by group/others unless sticky
                (in /tmp others can neither rename nor remove what we own); a symlink among them must be
                root's or ours
    file        opened with O_NOFOLLOW (a planted symlink fails), then fstat: a regular file owned by the
                effective uid and writable by no one else
    socket      lstat: a socket owned by the effective uid (or root, where allowed)

Stdlib only; every refusal is an ``UnsafePath`` (a ``ConfigError``) naming the path, what is wrong and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from toolcell.errors import ConfigError

__all__ = ["UnsafePath", "open_private", "private_dir", "trusted_socket"]

_SHOWN = 160  # the longest path quoted in full; longer ones are cut (they come from config or environment)


def _show(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "..."


class UnsafePath(ConfigError):
    """A path another local user could control. ``path``, ``problem`` and ``fix`` say which and what to do."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str, *, what: str = "path",
                 key: str = "") -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.fix = fix
        self.what = what
        super().__init__(f"refusing {what} {_show(path)}: {problem}; {fix}", key=key)


def _owners(allow_root: bool) -> frozenset[int]:
    return frozenset({os.geteuid(), 0}) if allow_root else frozenset({os.geteuid()})


def _owner_problem(st: os.stat_result, owners: frozenset[int]) -> str | None:
    if st.st_uid in owners:
        return None
    expected = " or ".join(f"uid {u}" for u in sorted(owners, reverse=True))
    return f"it is owned by uid {st.st_uid}, not by {expected} (another local user may have created it)"


def _check_ancestors(path: Path, key: str) -> None:
    """Every directory above ``path`` is root's or ours and not writable by others (unless sticky)."""
    trusted = _owners(True)
    for ancestor in reversed(path.parents):  # the symlinks on the way as written
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(ancestor)
            if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
                raise UnsafePath(ancestor, f"it is a symlink owned by uid {st.st_uid}, who can point it elsewhere",
                                 "use a path that does not go through another user's symlink",
                                 what="parent directory", key=key)
    real = Path(os.path.realpath(path.parent))
    for ancestor in (*reversed(real.parents), real):  # the directories they lead to
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            return
        if st.st_uid not in trusted:
            raise UnsafePath(ancestor, f"it is owned by uid {st.st_uid}, so that user can replace what is in it",
                             "use a directory whose every parent belongs to root or to you",
                             what="parent directory", key=key)
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(ancestor, f"other users can write to it (mode {stat.S_IMODE(st.st_mode):04o}) "
                             "and it is not sticky, so they can replace what is in it",
                             "take group/other write away (chmod go-w), or use another directory",
                             what="parent directory", key=key)


def _check_dir(path: Path, owners: frozenset[int], chmod: int | None, key: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise  # only with create=False: the caller decides what an absent directory means
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symlink" if os.path.islink(path) else "not a directory"
            raise UnsafePath(path, f"it is {kind}", "remove it or configure another path",
                             what="directory", key=key) from exc
        raise UnsafePath(path, f"it cannot be opened ({exc.strerror})", "check its permissions",
                         what="directory", key=key) from exc
    try:
        st = os.fstat(fd)
        problem = _owner_problem(st, owners)
        if problem:
            raise UnsafePath(path, problem, f"remove it, or chown {os.geteuid()} it if it is yours",
                             what="directory", key=key)
        if st.st_mode & 0o022:
            raise UnsafePath(path, f"group or others can write to it (mode {stat.S_IMODE(st.st_mode):04o})",
                             "take group/other write away (chmod go-w)", what="directory", key=key)
        if chmod is not None and stat.S_IMODE(st.st_mode) != chmod and st.st_uid == os.geteuid():
            os.fchmod(fd, chmod)
    finally:
        os.close(fd)


def private_dir(path: str | os.PathLike[str], *, create: bool = True, allow_root: bool = False,
                chmod: int | None = None, key: str = "") -> Path:
    """``path`` as a directory no other local user controls; created 0700 (with missing parents) if absent.

    ``allow_root``: also accept a directory owned by root (a caller using a system path such as
    /run/toolcell). ``chmod``: set this mode on it (e.g. 0o700 where the directory is the only gate).
    ``key`` names the config setting in the error. Raises ``UnsafePath``; with ``create=False``,
    ``FileNotFoundError`` when it is absent.
    """
    return _private_dir(Path(os.path.abspath(path)), _owners(allow_root), create, chmod, key)


def _private_dir(p: Path, owners: frozenset[int], create: bool, chmod: int | None, key: str) -> Path:
    _check_ancestors(p, key)
    if create:
        if not p.parent.exists():
            _private_dir(p.parent, _owners(True), True, None, key)
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)
    _check_dir(p, owners, chmod, key)
    return p


def _placed_by_root(directory: Path) -> int | None:
    """The owner of ``directory`` when only root can have made it (its parent is root's, writable by root
    alone, not merely sticky): a system path such as /run/toolcell handed to a service account."""
    try:
        parent, st = os.stat(directory.parent), os.lstat(directory)
    except FileNotFoundError:
        return None
    if parent.st_uid == 0 and not parent.st_mode & 0o022 and stat.S_ISDIR(st.st_mode):
        return st.st_uid
    return None


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 mode: int = 0o600, *, key: str = "") -> int:
    """``os.open`` with O_NOFOLLOW and O_CLOEXEC, then refuse what is not our own regular file. Returns the fd.

    The caller owns the descriptor (``os.fdopen(fd, "a")``). The directory is not checked here: make it
    with ``private_dir`` first. Raises ``UnsafePath``; other ``OSError``s (ENOENT without O_CREAT, EACCES)
    pass through.
    """
    try:  # O_NONBLOCK: a FIFO put in the file's place must not hang the open (cleared again below)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UnsafePath(path, "it is not a regular file", "remove it or configure another path",
                             what="file", key=key) from exc
        if exc.errno == errno.ELOOP:
            raise UnsafePath(path, "it is a symlink", "remove the symlink or configure another path",
                             what="file", key=key) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(path, "it is not a regular file", "remove it or configure another path",
                             what="file", key=key)
        problem = _owner_problem(st, _owners(False))
        if problem:
            raise UnsafePath(path, problem, "remove it or configure another path", what="file", key=key)
        if st.st_mode & 0o022:
            raise UnsafePath(path, f"group or others can write to it (mode {stat.S_IMODE(st.st_mode):04o})",
                             "take group/other write away (chmod go-w)", what="file", key=key)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def trusted_socket(path: str | os.PathLike[str], *, allow_root: bool = True, create_dir: bool = True,
                   key: str = "") -> Path:
    """A Unix socket path a caller may connect to without talking to an impostor.

    Its directory must pass ``private_dir`` (made 0700 when absent, so nobody else can make it later); the
    socket, if present, must be a socket owned by us. An absent socket is fine: only the directory's owner
    (or root) can create one there. ``allow_root`` also trusts root, and a system directory only root can
    have placed (its parent root's and writable by root alone, e.g. /run/toolcell owned by the service
    account of a systemd unit) together with that directory's owner; never a directory in /tmp.
    """
    p = Path(os.path.abspath(path))
    owners = _owners(allow_root)
    service = _placed_by_root(p.parent) if allow_root else None
    if service is not None:
        owners |= {service}
    _private_dir(p.parent, owners, create_dir, None, key)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(p, "it is not a socket", "remove it, then start the supervisor", what="socket", key=key)
    problem = _owner_problem(st, owners)
    if problem:
        raise UnsafePath(p, problem, "remove it and start your own supervisor, or name the socket you mean "
                         "with --target / TOOLCELL_LISTEN", what="socket", key=key)
    return p
