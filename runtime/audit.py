"""The audit trail: append-only JSON Lines, one record per decision and per invocation end.

Each record carries ``seq`` (1, 2, ...), ``prev`` (the previous record's hash; 64 zeros for the
first record ever) and ``hash`` (SHA-256 of the record's canonical JSON without ``hash``). Editing a
record breaks its own hash; deleting, inserting or reordering breaks the next record's ``prev`` and
the ``seq`` run. When the file reaches ``max_bytes`` it is renamed ``FILE.000001``, ``FILE.000002``,
... and the chain continues in a fresh ``FILE``: ``verify`` over the files in order checks it end to end.

Records hold sizes and SHA-256 hashes of arguments and output, never the payloads. Every write is
flushed and fsynced before the caller gets its answer; a failed write fails the call (fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import AuditUnavailable, ConfigError

GENESIS = "0" * 64
_ROTATED = re.compile(r"\.(\d{6})$")


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record without its own ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rotated_files(path: Path) -> list[Path]:
    """``FILE.000001`` ... in chain order (oldest first)."""
    found = [p for p in path.parent.glob(path.name + ".*") if _ROTATED.search(p.name)]
    return sorted(found, key=lambda p: int(_ROTATED.search(p.name).group(1)))  # type: ignore[union-attr]


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last record of a file (reads backwards from the end; files can be large)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 4096, b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                last = lines[-1]
                if not last:
                    return None
                try:
                    rec: dict[str, Any] = json.loads(last)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"the last record of {path} is not valid JSON; run `toolcell audit verify` "
                                      "and move the file aside", key="audit.file") from exc
                return rec
    return None


class AuditLog:
    """Appends hash-chained records; ``append`` returns once the record is on disk."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 64 * 2**20, keep: int = 10,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.clock = clock
        self._lock = asyncio.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.seq, self.last_hash = 0, GENESIS
        for candidate in [self.path, *reversed(rotated_files(self.path))]:
            if candidate.exists():
                last = _last_record(candidate)
                if last is not None:
                    self.seq, self.last_hash = int(last.get("seq", 0)), str(last.get("hash", GENESIS))
                    break
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            try:
                return await asyncio.to_thread(self._append, dict(fields))
            except OSError as exc:
                raise AuditUnavailable(f"audit trail unavailable: {exc.strerror}") from exc

    def _append(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = {"seq": self.seq + 1, "time": round(self.clock(), 6), **fields, "prev": self.last_hash}
        record["hash"] = record_hash(record)
        line = canonical(record) + b"\n"
        if self._fd < 0:
            raise OSError(9, "audit log is closed")
        if os.fstat(self._fd).st_size > 0 and os.fstat(self._fd).st_size + len(line) > self.max_bytes:
            self._rotate()
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.seq, self.last_hash = record["seq"], record["hash"]
        return record

    def _rotate(self) -> None:
        existing = rotated_files(self.path)
        number = int(_ROTATED.search(existing[-1].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]
        os.close(self._fd)
        self._fd = -1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{number:06d}"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in rotated_files(self.path)[:-self.keep] if self.keep > 0 else []:
            old.unlink()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    first_seq: int = 0
    last_seq: int = 0
    anchored: bool = True  # the chain starts at the genesis record (not mid-way, after rotation pruning)
    file: str = ""
    line: int = 0
    reason: str = ""

    def describe(self) -> str:
        if self.ok:
            start = "from the first record" if self.anchored else f"from seq {self.first_seq} (earlier files absent)"
            return f"ok: {self.records} records, seq {self.first_seq}..{self.last_seq}, chain intact {start}"
        return f"{self.file}:{self.line}: {self.reason}"


def verify(paths: Iterable[str | os.PathLike[str]]) -> Verdict:
    """Check the chain across ``paths`` in order; report the first broken record."""
    prev_hash: str | None = None
    prev_seq = 0
    first_seq, count, anchored = 0, 0, True
    for path in map(Path, paths):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                def broken(reason: str, p: Path = path, n: int = lineno, c: int = count, f: int = first_seq,
                           last: int = prev_seq, a: bool = anchored) -> Verdict:
                    return Verdict(False, c, f, last, a, str(p), n, reason)

                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return broken("not a valid JSON record")
                if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str) or "prev" not in rec:
                    return broken("not an audit record (no hash/prev)")
                seq = rec.get("seq")
                if not isinstance(seq, int):
                    return broken("record has no sequence number")
                if record_hash(rec) != rec["hash"]:
                    return broken(f"seq {seq}: record was modified (its hash does not match its content)")
                if prev_hash is None:
                    first_seq = seq
                    anchored = rec["prev"] == GENESIS
                    if anchored and seq != 1:
                        return broken(f"seq {seq}: first record of the chain should be seq 1")
                else:
                    if seq != prev_seq + 1:
                        return broken(f"seq {seq}: expected seq {prev_seq + 1} (a record was deleted, inserted "
                                      "or reordered before this one)")
                    if rec["prev"] != prev_hash:
                        return broken(f"seq {seq}: does not chain to the previous record (prev hash mismatch)")
                prev_hash, prev_seq = rec["hash"], seq
                count += 1
    return Verdict(True, count, first_seq, prev_seq, anchored)
