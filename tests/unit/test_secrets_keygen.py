"""``toolcell secrets keygen --out FILE``: a new key file, 0600, in directories made 0700, never clobbered."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from toolcell.errors import SecretError
from toolcell.secretstore import SecretStoreSettings, generate_key, load_key, write_key_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_missing_directories_are_made_private_and_the_key_loads(tmp_path: Path) -> None:
    existing = tmp_path / "root"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        path = write_key_file(existing / "etc" / "toolcell" / "secrets.key", generate_key())
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert mode(existing) == 0o755  # a directory that was there is left as it was
    assert len(load_key(SecretStoreSettings(store="unused", key_file=str(path)), {})) == 32
    assert os.listdir(path.parent) == ["secrets.key"]  # no temporary file left


@pytest.mark.parametrize(("existing", "force", "replaced"), [
    ("file", False, False),
    ("file", True, True),
    ("symlink", False, False),
])
def test_an_existing_key_is_kept_unless_forced(tmp_path: Path, existing: str, force: bool, replaced: bool) -> None:
    path = tmp_path / "secrets.key"
    old = generate_key()
    if existing == "file":
        path.write_text(old + "\n")
    else:
        path.symlink_to(tmp_path / "elsewhere")
    new = generate_key()
    if replaced:
        write_key_file(path, new, force=force)
        assert path.read_text() == new + "\n" and mode(path) == 0o600
    else:
        with pytest.raises(SecretError, match="exists; not replaced"):
            write_key_file(path, new, force=force)
        assert (path.read_text() == old + "\n") if existing == "file" else path.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["secrets.key"]


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolcell", "secrets", "keygen", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "code", "stdout", "stderr"), [
    (["--out", "{dir}/new/secrets.key"], 0, "wrote a new key to {dir}/new/secrets.key (mode 0600)", ""),
    (["--out", "{dir}/exists.key"], 3, "", "exists; not replaced"),
    (["--out", "{dir}/exists.key", "--force"], 0, "wrote a new key to {dir}/exists.key", ""),
    (["--out", "{dir}/file/secrets.key"], 2, "", "cannot write {dir}/file/secrets.key"),
])
def test_cli(tmp_path: Path, args: list[str], code: int, stdout: str, stderr: str) -> None:
    (tmp_path / "exists.key").write_text("old\n")
    (tmp_path / "file").write_text("a file, not a directory")
    result = keygen(*(a.format(dir=tmp_path) for a in args))
    assert result.returncode == code, result.stderr
    assert stdout.format(dir=tmp_path) in result.stdout and stderr.format(dir=tmp_path) in result.stderr
    out = Path(args[1].format(dir=tmp_path))
    if code == 0:
        key = out.read_text().strip()
        assert len(base64.b64decode(key)) == 32 and key not in result.stdout + result.stderr  # never echoed
    elif out.name == "exists.key":
        assert out.read_text() == "old\n"


def test_without_out_the_key_is_printed() -> None:
    result = keygen()
    assert result.returncode == 0 and len(base64.b64decode(result.stdout.strip())) == 32
