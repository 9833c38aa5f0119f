"""The OCI backend's image store: one unpacked, content-addressed root filesystem per image.

Layout (default ``/var/lib/toolcell/rootfs``, root's alone)::

    <store>/index.json               {"toolcell/python:bookworm": "sha256:<hex>", "sha256:<hex>": ...}
    <store>/<hex>/rootfs/            the image's files, ownership and modes kept
    <store>/<hex>/config.json        what a sandbox uses of the image's config (Env, User, WorkingDir, ...)

Every sandbox of an image shares its rootfs, mounted read-only (``bundle.py``): nothing is copied per
call. Writes are atomic: a rootfs is unpacked into a temporary directory under the store and renamed
into place; the index is rewritten through a temporary file and ``os.replace``, under a lock.

Producers (blocking; call them from a thread or the CLI):

- ``RootfsStore.unpack_docker_image(image)`` (module-level ``unpack_docker_image(image, store_dir)``,
  ``unpack_docker_image_async`` on an event loop): the ``docker`` CLI (``docker image inspect``, ``docker
  create`` + ``docker export``) streamed through the checked extraction; digest = the image id;
- ``RootfsStore.unpack_tar(path, reference)``: a plain root filesystem tarball (``docker export``
  output); digest = the tarball's sha256. A ``docker save`` archive is refused (layers, whiteouts).

Extraction refuses what could write outside the rootfs or give the sandbox a device: absolute names,
``..`` components, a path through a symlink that leads out, hard links out. Device nodes (a
debootstrap rootfs has /dev/null and friends) are skipped, never created: a sandbox's /dev is its own
tmpfs holding runc's allowlist. Set-id bits are cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess  # nosec B404 - the docker CLI, with fixed argument lists
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

from toolcell.backends.oci.bundle import ImageConfig
from toolcell.errors import BackendError, ConfigError, ImageMissing

__all__ = ["DEFAULT_STORE", "RootfsImage", "RootfsStore", "normalize_reference", "unpack_docker_image",
           "unpack_docker_image_async"]

DEFAULT_STORE: Final = "/var/lib/toolcell/rootfs"
_INDEX: Final = "index.json"
_LOCK: Final = ".lock"
_DIGEST: Final = re.compile(r"sha256:([0-9a-f]{64})")
_DOCKER_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class RootfsImage:
    """An unpacked image: its rootfs directory and config."""

    reference: str
    digest: str
    rootfs: Path
    config: ImageConfig


def normalize_reference(image: str) -> str:
    """``name`` -> ``name:latest`` (as Docker resolves it); digests and tagged names unchanged."""
    if _DIGEST.fullmatch(image) or "@" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last else f"{image}:latest"


class RootfsStore:
    """The content-addressed store at ``directory``; lookups are cached until the index changes."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_STORE, *, docker: str = "docker") -> None:
        self.directory = Path(directory)
        self._docker = docker
        self._index_stamp: tuple[int, int] | None = None
        self._index: dict[str, str] = {}
        self._configs: dict[str, ImageConfig] = {}

    # -- lookups (cheap: one stat when nothing changed) ----------------------------------------------

    def lookup(self, image: str) -> RootfsImage | None:
        digest = self._read_index().get(normalize_reference(image))
        if digest is None:
            return None
        base = self.directory / _hex(digest)
        rootfs = base / "rootfs"
        if not rootfs.is_dir():
            return None
        config = self._configs.get(digest)
        if config is None:
            config = _load_config(base / "config.json")
            self._configs[digest] = config
        return RootfsImage(reference=image, digest=digest, rootfs=rootfs, config=config)

    def get(self, image: str) -> RootfsImage:
        found = self.lookup(image)
        if found is None:
            raise ImageMissing(image)
        return found

    def has_image(self, image: str) -> bool:
        return self.lookup(image) is not None

    def references(self) -> dict[str, str]:
        return dict(self._read_index())

    def _read_index(self) -> dict[str, str]:
        path = self.directory / _INDEX
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._index_stamp, self._index = None, {}
            return self._index
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._index_stamp:
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise BackendError(f"the rootfs store index {path} is unreadable: {exc}") from exc
            self._index = {str(k): str(v) for k, v in raw.items() if isinstance(v, str) and _DIGEST.fullmatch(v)}
            self._index_stamp = stamp
        return self._index

    # -- producers (blocking) ------------------------------------------------------------------------

    def unpack_docker_image(self, image: str) -> str:
        """Unpack ``image`` from the local Docker engine (the CLI, never a pull); returns its digest."""
        if shutil.which(self._docker) is None:
            raise ConfigError(f"the docker CLI ({self._docker!r}) is not installed; it is needed to unpack {image!r}")
        inspected = self._docker_json(["image", "inspect", "--format", "{{json .}}", image], image)
        digest = str(inspected.get("Id", ""))
        if not _DIGEST.fullmatch(digest):
            raise BackendError(f"docker image inspect {image!r}: unexpected id {digest[:80]!r}")
        config = _image_config(inspected.get("Config") or {})
        if self._present(digest):
            self._index_add({normalize_reference(image): digest, digest: digest})
            return digest
        created = self._run([self._docker, "create", "--entrypoint", "/nonexistent", image, "x"], image)
        container = created.strip()
        try:
            with self._staging() as staging:
                proc = subprocess.Popen(  # noqa: S603 # nosec B603 - fixed arguments
                    [self._docker, "export", container], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                assert proc.stdout is not None  # nosec B101 - PIPE above
                try:
                    _extract(proc.stdout, staging / "rootfs")
                finally:
                    proc.stdout.close()
                    err = proc.stderr.read(4096) if proc.stderr else b""
                    status = proc.wait()
                if status != 0:
                    raise BackendError(f"docker export of {image!r} failed: {err.decode(errors='replace').strip()}")
                self._commit(staging, digest, config)
        finally:
            with contextlib.suppress(BackendError):
                self._run([self._docker, "rm", "-f", container], image)
        self._index_add({normalize_reference(image): digest, digest: digest})
        return digest

    def unpack_tar(self, path: str | os.PathLike[str], reference: str,
                   config: ImageConfig | None = None) -> str:
        """Unpack a plain root filesystem tarball as ``reference``; returns its digest (the file's sha256)."""
        source = Path(path)
        sha = hashlib.sha256()
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        digest = "sha256:" + sha.hexdigest()
        if not self._present(digest):
            with open(source, "rb") as fh, self._staging() as staging:
                _extract(fh, staging / "rootfs")
                if (staging / "rootfs" / "manifest.json").exists() and not (staging / "rootfs" / "etc").exists():
                    raise ConfigError(f"{source} is a `docker save` archive; unpack the image with "
                                      "unpack_docker_image or give a root filesystem tarball (`docker export`)")
                self._commit(staging, digest, config or ImageConfig())
        self._index_add({normalize_reference(reference): digest, digest: digest})
        return digest

    def remove(self, image: str) -> None:
        """Forget ``image``; its rootfs goes when no reference names its digest any more."""
        with self._locked():
            index = self._load_index_locked()
            digest = index.pop(normalize_reference(image), None)
            if digest is not None and not any(v == digest and k != digest for k, v in index.items()):
                index.pop(digest, None)
                shutil.rmtree(self.directory / _hex(digest), ignore_errors=True)
            self._write_index_locked(index)

    # -- internals ----------------------------------------------------------------------------------

    def _present(self, digest: str) -> bool:
        return (self.directory / _hex(digest) / "rootfs").is_dir()

    @contextlib.contextmanager
    def _staging(self) -> Any:
        self._ensure_dir()
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self.directory))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, digest: str, config: ImageConfig) -> None:
        (staging / "config.json").write_text(json.dumps(asdict(config), indent=1, sort_keys=True))
        os.chmod(staging, 0o755)  # noqa: S103 # nosec B103 - a directory runc and the sandbox's user must read
        try:
            os.rename(staging, self.directory / _hex(digest))
        except OSError:
            if not self._present(digest):  # not another unpack of the same image winning the race
                raise

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self._ensure_dir()
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load_index_locked(self) -> dict[str, str]:
        try:
            raw = json.loads((self.directory / _INDEX).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BackendError(f"the rootfs store index is unreadable: {exc}") from exc
        return {str(k): str(v) for k, v in raw.items()}

    def _write_index_locked(self, index: Mapping[str, str]) -> None:
        tmp = self.directory / f".{_INDEX}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dict(index), indent=1, sort_keys=True))
        os.replace(tmp, self.directory / _INDEX)

    def _index_add(self, entries: Mapping[str, str]) -> None:
        with self._locked():
            index = self._load_index_locked()
            index.update(entries)
            self._write_index_locked(index)

    def _run(self, argv: list[str], image: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=_DOCKER_TIMEOUT_S, check=False)  # noqa: S603 # nosec B603
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{' '.join(argv[:2])} failed: {exc}") from exc
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            if "no such image" in err.lower() or "no such object" in err.lower():
                raise ImageMissing(image)
            raise BackendError(f"{' '.join(argv[:2])} {image!r} failed: {err[-2000:]}")
        return done.stdout.decode(errors="replace")

    def _docker_json(self, args: list[str], image: str) -> dict[str, Any]:
        out = self._run([self._docker, *args], image)
        try:
            value = json.loads(out)
        except ValueError as exc:
            raise BackendError(f"docker {args[0]} {image!r}: unexpected output") from exc
        if not isinstance(value, dict):
            raise BackendError(f"docker {args[0]} {image!r}: unexpected output")
        return value


def unpack_docker_image(image: str, store_dir: str | os.PathLike[str] = DEFAULT_STORE) -> str:
    """Blocking: unpack the local Docker engine's ``image`` into the store; returns its digest."""
    return RootfsStore(store_dir).unpack_docker_image(image)


async def unpack_docker_image_async(image: str, store_dir: str | os.PathLike[str] = DEFAULT_STORE) -> str:
    """``unpack_docker_image`` in a thread, for callers on an event loop."""
    return await asyncio.to_thread(unpack_docker_image, image, store_dir)


def _hex(digest: str) -> str:
    m = _DIGEST.fullmatch(digest)
    if m is None:
        raise BackendError(f"not a sha256 digest: {digest[:80]!r}")
    return m.group(1)


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _image_config(raw: Mapping[str, Any]) -> ImageConfig:
    labels = raw.get("Labels") or {}
    return ImageConfig(env=_strings(raw.get("Env")), entrypoint=_strings(raw.get("Entrypoint")),
                       cmd=_strings(raw.get("Cmd")), user=str(raw.get("User") or ""),
                       working_dir=str(raw.get("WorkingDir") or ""),
                       labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {})


def _load_config(path: Path) -> ImageConfig:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return ImageConfig()
    except (OSError, ValueError) as exc:
        raise BackendError(f"unreadable image config {path}: {exc}") from exc
    labels = raw.get("labels") or {}
    return ImageConfig(env=_strings(raw.get("env")), entrypoint=_strings(raw.get("entrypoint")),
                       cmd=_strings(raw.get("cmd")), user=str(raw.get("user") or ""),
                       working_dir=str(raw.get("working_dir") or ""),
                       labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {})


class _Refused(tarfile.FilterError):
    pass


def _member_filter(dest: Path) -> Any:
    """A tarfile extraction filter that keeps ownership and modes but refuses escapes and devices."""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        return path == root or path.startswith(root + os.sep)

    def check(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo | None:
        name = member.name
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/") or ".." in parts:
            raise _Refused(member, f"refusing {name[:200]!r}: absolute or climbing path")
        if member.ischr() or member.isblk():
            return None  # never created: the sandbox's /dev is its own tmpfs with runc's allowlist
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            raise _Refused(member, f"refusing {name[:200]!r}: unsupported member type")
        # The directory it goes into, with the symlinks already extracted resolved, must be inside.
        parent = os.path.realpath(os.path.join(root, *parts[:-1])) if parts else root
        if not inside(parent):
            raise _Refused(member, f"refusing {name[:200]!r}: it would be written through a symlink out")
        if member.islnk():
            target = [p for p in member.linkname.split("/") if p not in ("", ".")]
            if member.linkname.startswith("/") or ".." in target or \
                    not inside(os.path.realpath(os.path.join(root, *target))):
                raise _Refused(member, f"refusing hard link {name[:200]!r} -> {member.linkname[:200]!r}")
        if member.isreg() and member.mode & 0o6000:
            # No set-id programs in a sandbox's root (noNewPrivileges already voids them: two locks).
            return member.replace(mode=member.mode & ~0o6000, deep=False)
        return member

    return check


def _extract(stream: IO[bytes], dest: Path) -> None:
    """Stream a tar into ``dest`` (created), checked member by member."""
    dest.mkdir(mode=0o755)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            tar.extractall(dest, numeric_owner=True, filter=_member_filter(dest))  # noqa: S202 # nosec B202 - filtered
    except (tarfile.TarError, OSError) as exc:
        raise BackendError(f"unpacking the image failed: {exc}") from exc
