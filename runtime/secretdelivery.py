"""Deliver granted secrets into one sandbox: environment variables, or read-only files.

Files are written to a per-invocation directory on a tmpfs (never the host's disk), owned by the
sandbox's uid with mode 0400, bind-mounted read-only at the granted path, and deleted when the
invocation ends. If the configured directory is not on a tmpfs, the supervisor mounts one there
(as root) or refuses to start: a secret must not fall back to disk silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess  # nosec B404 - fixed argv, used to mount a tmpfs for secret files
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError
from runtime.model import SecretGrant
from runtime.policy.profile import Mount
from runtime.safepath import private_dir

log = logging.getLogger("toolcell.secrets")
_MEMORY_FS = {"tmpfs", "ramfs"}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` lives on, from /proc/self/mountinfo."""
    best, fstype = "", ""
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, right.split()[0]
    return fstype


@dataclass(frozen=True)
class Delivered:
    env: Mapping[str, str]
    mounts: tuple[Mount, ...]
    directory: Path | None
    # Path in the sandbox -> content: what a pooled sandbox's claim carries instead of ``mounts``.
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)


class SecretDelivery:
    def __init__(self, files_dir: str | os.PathLike[str]) -> None:
        self.files_dir = Path(files_dir)
        self._mounted = False

    def ensure_tmpfs(self) -> None:
        """Make sure secret files can only ever live in memory."""
        # Ours alone (no symlink, no other owner, no group/other write): nobody plants files for a tool.
        private_dir(self.files_dir, chmod=0o700, key="secrets.files_dir")
        if filesystem_type(self.files_dir) in _MEMORY_FS:
            return
        if os.geteuid() != 0:
            raise ConfigError(f"{self.files_dir} is not on a tmpfs and only root can mount one there",
                              key="secrets.files_dir")
        cmd = ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700,nosuid,nodev,noexec", "toolcell-secrets",
               str(self.files_dir)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)  # noqa: S603 # nosec B603
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise ConfigError(f"cannot mount a tmpfs at {self.files_dir}: {detail.strip()}",
                              key="secrets.files_dir") from exc
        self._mounted = True
        log.info("mounted a tmpfs for secret files at %s", self.files_dir)

    def prepare(self, invocation_id: str, grants: tuple[SecretGrant, ...], values: Mapping[str, str],
                user: str) -> Delivered:
        env = {g.env: values[g.name] for g in grants if g.env}
        files = [g for g in grants if g.file]
        contents = {str(g.file): values[g.name] for g in files}
        if not files:
            return Delivered(env=env, mounts=(), directory=None)
        uid, _, gid = user.partition(":")
        directory = self.files_dir / invocation_id
        directory.mkdir(mode=0o700)
        mounts = []
        try:
            for i, grant in enumerate(files):
                path = directory / f"{i}-{grant.name}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
                with os.fdopen(fd, "w") as fh:
                    fh.write(values[grant.name])
                os.chown(path, int(uid), int(gid or uid))
                mounts.append(Mount(source=str(path), target=str(grant.file)))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return Delivered(env=env, mounts=tuple(mounts), directory=directory, files=contents)

    def cleanup(self, delivered: Delivered) -> None:
        if delivered.directory is not None:
            shutil.rmtree(delivered.directory, ignore_errors=True)

    def close(self) -> None:
        if self._mounted:
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                subprocess.run(["umount", str(self.files_dir)], check=True, capture_output=True)  # noqa: S603,S607 # nosec
            self._mounted = False
