"""Secrets at rest: an encrypted file, managed with ``toolcell secrets set/list/rm``.

Each value is sealed with AES-256-GCM (``cryptography``'s AEAD: authenticated, so a tampered or
swapped ciphertext fails to open instead of yielding garbage). The secret's name is the associated
data, binding each ciphertext to its name. The key comes from a file or an environment variable,
never from the config file. The store file is written atomically with mode 0600.

Store format (JSON)::

    {"version": 1, "secrets": {"<name>": {"nonce": b64, "ciphertext": b64, "updated": iso8601}}}
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from toolcell.errors import ConfigError, SecretError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
KEY_BYTES = 32


@dataclass(frozen=True)
class SecretStoreSettings:
    store: str
    key_file: str | None = None
    key_env: str | None = "TOOLCELL_SECRETS_KEY"


def generate_key() -> str:
    """A new random key, base64-encoded (what a key file or the key variable holds)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def write_key_file(path: str | os.PathLike[str], key: str, *, force: bool = False) -> Path:
    """Write ``key`` to a new file ``path``, mode 0600, atomically; missing parent directories are made 0700.

    An existing file is never replaced unless ``force``: losing a key loses every secret sealed with it.
    The key is written to a temporary file beside ``path``, synced, then linked into place (``link``
    fails if the name exists, so two concurrent runs cannot both win) or, with ``force``, renamed over it.
    Raises ``SecretError`` when the file exists, ``OSError`` when it cannot be written.
    """
    target = Path(path).absolute()
    missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    for directory in reversed(missing):  # outermost first; each made private whatever the umask
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)
    if not force and (target.exists() or target.is_symlink()):
        raise SecretError(f"{str(target)!r} exists; not replaced (its key may seal secrets): use --force to "
                          "replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise SecretError(f"{str(target)!r} exists; not replaced (its key may seal secrets): use --force "
                                  "to replace it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def _decode_key(text: str, origin: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"secrets key from {origin} is not base64") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"secrets key from {origin} must be {KEY_BYTES} bytes, not {len(key)}")
    return key


def load_key(settings: SecretStoreSettings, environ: Mapping[str, str]) -> bytes:
    if settings.key_file:
        path = Path(settings.key_file)
        try:
            mode = path.stat().st_mode & 0o077
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read secrets key file {str(path)!r}: {exc.strerror}",
                              key="secrets.key_file") from exc
        if mode:
            raise ConfigError(f"secrets key file {str(path)!r} must not be readable by group or others (chmod 600)",
                              key="secrets.key_file")
        return _decode_key(text, str(path))
    if settings.key_env and environ.get(settings.key_env):
        return _decode_key(environ[settings.key_env], f"${settings.key_env}")
    raise ConfigError(f"no secrets key: set key_file or ${settings.key_env or 'TOOLCELL_SECRETS_KEY'}",
                      key="secrets")


class SecretStore:
    """Encrypted name -> value map in one file."""

    def __init__(self, path: str | os.PathLike[str], key: bytes) -> None:
        self.path = Path(path)
        self._aead = AESGCM(key)

    @classmethod
    def open(cls, settings: SecretStoreSettings, environ: Mapping[str, str]) -> SecretStore:
        return cls(settings.store, load_key(settings, environ))

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": 1, "secrets": {}}
        except (OSError, ValueError) as exc:
            raise SecretError(f"cannot read secret store {str(self.path)!r}: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("secrets"), dict):
            raise SecretError(f"secret store {str(self.path)!r} is malformed")
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def names(self) -> list[str]:
        return sorted(self._read()["secrets"])

    def set(self, name: str, value: str) -> None:
        if not NAME_PATTERN.match(name):
            raise SecretError(f"invalid secret name {name!r}: use 1-128 of [A-Za-z0-9_.-]")
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, value.encode(), name.encode())
        doc = self._read()
        doc["secrets"][name] = {
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
            "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        self._write(doc)

    def remove(self, name: str) -> bool:
        doc = self._read()
        if doc["secrets"].pop(name, None) is None:
            return False
        self._write(doc)
        return True

    def get(self, name: str) -> str:
        entry = self._read()["secrets"].get(name)
        if entry is None:
            raise SecretError(f"secret {name!r} is not in the store")
        try:
            nonce = base64.b64decode(entry["nonce"])
            sealed = base64.b64decode(entry["ciphertext"])
            return self._aead.decrypt(nonce, sealed, name.encode()).decode()
        except (InvalidTag, KeyError, ValueError, binascii.Error) as exc:
            raise SecretError(f"secret {name!r} cannot be decrypted (wrong key or tampered store)") from exc

    def get_many(self, names: list[str]) -> dict[str, str]:
        return {name: self.get(name) for name in names}
