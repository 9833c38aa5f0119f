"""safepath: the same probe on a path we own (accepted) and on one another local user could control (refused,
with a message naming the path, the problem and the fix). Runs as root: "another user" is uid 65534."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from toolcell.errors import ConfigError
from toolcell.safepath import UnsafePath, open_private, private_dir, trusted_socket

NOBODY = 65534


def _dir(mode: int, uid: int | None = None) -> Callable[[Path], Path]:
    def make(base: Path) -> Path:
        path = base / "d"
        path.mkdir()
        os.chmod(path, mode)
        if uid is not None:
            os.chown(path, uid, uid)
        return path
    return make


def _symlink_to_own_dir(base: Path) -> Path:
    (base / "real").mkdir(mode=0o700)
    (base / "d").symlink_to(base / "real")
    return base / "d"


def _plain_file(base: Path) -> Path:
    (base / "d").write_text("x")
    return base / "d"


def _absent(base: Path) -> Path:
    return base / "d"


def _absent_with_parents(base: Path) -> Path:
    return base / "a" / "b" / "d"


def _under(parent_mode: int, parent_uid: int | None = None) -> Callable[[Path], Path]:
    """A directory of ours inside a parent with the given mode / owner."""
    def make(base: Path) -> Path:
        parent = base / "p"
        parent.mkdir()
        os.chmod(parent, parent_mode)
        (parent / "d").mkdir(mode=0o700)
        if parent_uid is not None:
            os.chown(parent, parent_uid, parent_uid)
        return parent / "d"
    return make


def _through_foreign_symlink(base: Path) -> Path:
    (base / "real").mkdir(mode=0o755)
    (base / "real" / "d").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    os.lchown(base / "link", NOBODY, NOBODY)
    return base / "link" / "d"


def _through_own_symlink(base: Path) -> Path:
    (base / "real").mkdir(mode=0o755)
    (base / "real" / "d").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    return base / "link" / "d"


# (name, how the path is made, refused?, words the refusal must contain)
DIR_CASES = [
    ("absent: created 0700", _absent, False, ""),
    ("absent parents: created", _absent_with_parents, False, ""),
    ("ours 0700", _dir(0o700), False, ""),
    ("ours 0755 (others may read, not write)", _dir(0o755), False, ""),
    ("ours but group-writable", _dir(0o770), True, "group or others can write"),
    ("ours but other-writable", _dir(0o703), True, "chmod go-w"),
    ("planted by another uid", _dir(0o700, NOBODY), True, f"owned by uid {NOBODY}"),
    ("planted by another uid, 0777", _dir(0o777, NOBODY), True, f"owned by uid {NOBODY}"),
    ("a symlink to a directory of ours", _symlink_to_own_dir, True, "it is a symlink"),
    ("a regular file", _plain_file, True, "not a directory"),
    ("parent root's and sticky (/tmp)", _under(0o1777), False, ""),
    ("parent writable by others, not sticky", _under(0o777), True, "not sticky"),
    ("parent group-writable, not sticky", _under(0o775), True, "not sticky"),
    ("parent owned by another uid", _under(0o755, NOBODY), True, "so that user can replace"),
    ("through a symlink of ours", _through_own_symlink, False, ""),
    ("through another uid's symlink", _through_foreign_symlink, True, "symlink owned by uid"),
]


@pytest.mark.parametrize(("make", "refused", "words"), [c[1:] for c in DIR_CASES], ids=[c[0] for c in DIR_CASES])
def test_private_dir_accepts_only_directories_no_one_else_controls(
        tmp_path: Path, make: Callable[[Path], Path], refused: bool, words: str) -> None:
    path = make(tmp_path)
    if refused:
        with pytest.raises(UnsafePath) as caught:
            private_dir(path, key="server.listen")
        message = str(caught.value)
        assert message.startswith("server.listen: refusing ") and words in message
        assert isinstance(caught.value, ConfigError) and caught.value.fix
    else:
        got = private_dir(path)
        st = os.lstat(got)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def test_a_directory_made_by_private_dir_is_0700(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "new")
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700


def test_chmod_tightens_an_existing_directory_of_ours(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o755)
    os.chmod(tmp_path / "d", 0o755)
    private_dir(tmp_path / "d", chmod=0o700)
    assert stat.S_IMODE(os.lstat(tmp_path / "d").st_mode) == 0o700


def test_create_false_leaves_an_absent_directory_absent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        private_dir(tmp_path / "never", create=False)
    assert not (tmp_path / "never").exists()


def test_a_very_long_path_is_quoted_only_as_a_prefix(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 200)
    deep.mkdir(mode=0o777)
    os.chmod(deep, 0o777)
    with pytest.raises(UnsafePath) as caught:
        private_dir(deep)
    assert len(str(caught.value)) < 400 and str(caught.value).count("x" * 200) <= 1


# --- files ---------------------------------------------------------------------------------------------

def _file(mode: int, uid: int | None = None) -> Callable[[Path], Path]:
    def make(base: Path) -> Path:
        path = base / "f"
        path.write_text("old\n")
        os.chmod(path, mode)
        if uid is not None:
            os.chown(path, uid, uid)
        return path
    return make


def _symlink_to_own_file(base: Path) -> Path:
    (base / "real").write_text("")
    (base / "f").symlink_to(base / "real")
    return base / "f"


def _fifo(base: Path) -> Path:
    os.mkfifo(base / "f", 0o600)
    return base / "f"


FILE_CASES = [
    ("absent: created 0600", lambda b: b / "f", False, ""),
    ("ours 0600", _file(0o600), False, ""),
    ("ours 0644", _file(0o644), False, ""),
    ("ours but group-writable", _file(0o660), True, "group or others can write"),
    ("another uid's", _file(0o600, NOBODY), True, f"owned by uid {NOBODY}"),
    ("a symlink to a file of ours", _symlink_to_own_file, True, "it is a symlink"),
    ("a FIFO (would block a writer)", _fifo, True, "not a regular file"),
    ("a directory", lambda b: (b / "f").mkdir() or b / "f", True, ""),
]


@pytest.mark.parametrize(("make", "refused", "words"), [c[1:] for c in FILE_CASES],
                         ids=[c[0] for c in FILE_CASES])
def test_open_private_opens_only_our_own_regular_files(
        tmp_path: Path, make: Callable[[Path], Path], refused: bool, words: str) -> None:
    path = make(tmp_path)
    if refused:
        with pytest.raises((UnsafePath, IsADirectoryError)) as caught:
            open_private(path, key="telemetry.span_file")
        assert words in str(caught.value)
        if (tmp_path / "real").exists():
            assert (tmp_path / "real").read_text() == ""  # nothing written through the link
    else:
        fd = open_private(path)
        try:
            os.write(fd, b"new\n")
            assert os.get_blocking(fd)
        finally:
            os.close(fd)
        assert path.read_text().endswith("new\n")
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 in (0, 0o044)


# --- sockets -------------------------------------------------------------------------------------------

def _listen(path: Path, uid: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    if uid is not None:
        os.chown(path, uid, uid)
    return sock


def test_trusted_socket_accepts_ours_and_an_absent_one_and_makes_the_directory(tmp_path: Path) -> None:
    assert trusted_socket(tmp_path / "run" / "tc.sock") == tmp_path / "run" / "tc.sock"
    assert stat.S_IMODE(os.lstat(tmp_path / "run").st_mode) == 0o700
    with _listen(tmp_path / "run" / "tc.sock"):
        assert trusted_socket(tmp_path / "run" / "tc.sock") == tmp_path / "run" / "tc.sock"


def test_trusted_socket_refuses_another_uids_socket_and_a_non_socket(tmp_path: Path) -> None:
    with _listen(tmp_path / "tc.sock", uid=NOBODY), pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        trusted_socket(tmp_path / "tc.sock")
    (tmp_path / "plain").write_text("")
    with pytest.raises(UnsafePath, match="not a socket"):
        trusted_socket(tmp_path / "plain")


@pytest.mark.parametrize(("parent_mode", "refused"), [(0o1777, True), (0o755, False)],
                         ids=["planted in a sticky shared dir (/tmp)", "a system dir only root can have placed"])
def test_a_caller_trusts_another_uids_socket_directory_only_where_root_placed_it(
        tmp_path: Path, parent_mode: int, refused: bool) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, parent_mode)
    planted = parent / "toolcell"
    planted.mkdir(mode=0o750)
    with _listen(planted / "toolcell.sock", uid=NOBODY):
        os.chown(planted, NOBODY, NOBODY)
        if refused:
            with pytest.raises(UnsafePath, match=f"refusing directory .*owned by uid {NOBODY}"):
                trusted_socket(planted / "toolcell.sock")
        else:  # e.g. /run/toolcell, given by systemd to the service account that runs the supervisor
            assert trusted_socket(planted / "toolcell.sock") == planted / "toolcell.sock"
        with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):  # a supervisor never serves from it
            private_dir(planted)
