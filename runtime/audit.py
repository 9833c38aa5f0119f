"""The audit trail: append-only JSON Lines, one record per decision and per invocation end.

Each record carries ``seq`` (1, 2, ...), ``prev`` (the previous record's hash; 64 zeros for the
first record ever) and ``hash`` (SHA-256 of the record's canonical JSON without ``hash``). Editing a
record breaks its own hash; deleting, inserting or reordering breaks the next record's ``prev`` and
the ``seq`` run. When the file reaches ``max_bytes`` it is renamed ``FILE.000001``, ``FILE.000002``,
... and the chain continues in a fresh ``FILE``: ``verify`` over the files in order checks it end to end.

Records hold sizes and SHA-256 hashes of arguments and output, never the payloads. Every write is
flushed and fsynced before the caller gets its answer; a failed write fails the call (fail closed).

Callers cannot flush the trail:
- every string in a record is bounded (``quote``: an escaped prefix plus the SHA-256 of the whole),
  lists and maps are cut, and the whole record is capped at ``MAX_RECORD_BYTES``;
- each rotation writes an ``audit_rotated`` record first in the new file: the rotated file's name and
  the time of its newest *real* record (an invocation or an allowed decision, not a refusal);
- rotation deletes files beyond ``keep`` oldest first, but never one that holds real records younger
  than ``protect_s`` (it keeps more files instead, with a warning); every deletion is a WARNING and is
  named in the ``audit_rotated`` record (files and seq range), so ``verify`` says where the chain was pruned;
- one supervisor per file: a hidden sibling ``.FILE.lock`` is held with ``flock``; the directory must pass
  ``safepath.private_dir`` (ours, no group/other write, no symlink) and files ``open_private`` (O_NOFOLLOW).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolcell.errors import AuditUnavailable, ConfigError
from toolcell.safepath import open_private, private_dir

log = logging.getLogger("toolcell.audit")

GENESIS = "0" * 64
_ROTATED = re.compile(r"\.(\d{6})$")

# Bounds of one record: characters kept of a string, entries of a list or map, nesting, bytes in all.
MAX_STRING = 120
MAX_KEY = 48
MAX_ITEMS = 32
MAX_DEPTH = 4
MAX_RECORD_BYTES = 4096
# Room for seq, time, prev and hash, added after the fields are bounded.
_ENVELOPE_BYTES = 220
# How far into a file its first record is looked for (records are capped far below this).
_FIRST_LINE_MAX = 64 * 1024
ROTATED_EVENT = "audit_rotated"
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record without its own ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def sha256_text(text: str) -> str:
    return hashlib.sha256(_utf8(text)).hexdigest()


def _escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def quote(text: str, limit: int = MAX_STRING) -> str:
    """``text`` when short and printable; else an escaped prefix, its length and its SHA-256.

    Linear in ``len(text)`` (one hash); looks at no more than ``limit`` characters otherwise.
    Non-printable characters (controls, bidi overrides, lone surrogates, ...) become ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``; any change is marked with the SHA-256 of the original, so the
    record never claims a value it did not see.
    """
    out: list[str] = []
    size = 0
    for ch in text[:limit]:
        piece = _escape(ch)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    kept = "".join(out)
    if kept == text:
        return text
    return f"{kept}...[{len(text)} chars, sha256:{sha256_text(text)}]"


def _bound(value: Any, depth: int = 0) -> Any:
    """A JSON value no caller can make large: strings quoted, containers cut, odd types named."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else quote(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return quote(value)
    if depth >= MAX_DEPTH:
        return f"[nested {type(value).__name__} omitted]"
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(value.items()):
            if n == MAX_ITEMS:
                out["..."] = f"{len(value) - MAX_ITEMS} more entries omitted"
                break
            out[quote(str(k), MAX_KEY)] = _bound(v, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        bounded = [_bound(v, depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            bounded.append(f"{len(items) - MAX_ITEMS} more items omitted")
        return bounded
    return quote(str(value))


def bound_fields(fields: Mapping[str, Any], max_bytes: int = MAX_RECORD_BYTES) -> dict[str, Any]:
    """The record's fields with every value bounded; the largest values omitted until it fits."""
    bounded = _bound(fields)
    if not isinstance(bounded, dict):  # pragma: no cover - a Mapping always bounds to a dict
        raise TypeError("audit fields must be a mapping")
    budget = max_bytes - _ENVELOPE_BYTES
    size = len(canonical(bounded))
    if size <= budget:
        return bounded
    sizes = sorted(((len(canonical({k: v})), k) for k, v in bounded.items() if k != "event"), reverse=True)
    for value_size, key in sizes:
        digest = hashlib.sha256(canonical({key: bounded[key]})).hexdigest()
        bounded[key] = f"[omitted: {value_size} bytes, sha256:{digest}]"
        size = len(canonical(bounded))
        if size <= budget:
            break
    bounded["record_cut"] = True
    return bounded


def is_real(fields: Mapping[str, Any]) -> bool:
    """A record worth protecting from rotation: an invocation's end or an allowed decision."""
    event = fields.get("event")
    if event == "invocation_end":
        return fields.get("ending") != "rejected"
    return event == "decision" and fields.get("decision") == "allow"


def rotated_files(path: Path) -> list[Path]:
    """``FILE.000001`` ... in chain order (oldest first)."""
    found = [p for p in path.parent.glob(path.name + ".*") if _ROTATED.search(p.name)]
    return sorted(found, key=lambda p: int(_ROTATED.search(p.name).group(1)))  # type: ignore[union-attr]


def with_rotated(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``paths`` with each live file's rotated files (``FILE.000001`` ...) just before it, oldest first,
    named or not: ``audit verify audit.jsonl`` checks the whole chain, before and after rotation."""
    named = [Path(p) for p in paths]
    families = {p: rotated_files(p) for p in named if not _ROTATED.search(p.name)}
    grouped = {r for rotated in families.values() for r in rotated}
    out: list[Path] = []
    for path in named:
        if path in grouped:
            continue  # listed with its live file, in chain order
        out += families.get(path, [])
        out.append(path)
    return list(dict.fromkeys(out))


def _open_read(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last record of a file: blocks are read backwards (linear) until the last line's start."""
    try:
        fd = _open_read(path)
    except OSError as exc:
        raise ConfigError(f"cannot read audit file {str(path)!r}: {exc.strerror} (a symlink is refused)",
                          key="audit.file") from exc
    try:
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) == b"\n":
            end -= 1
        start, block = end, 4096
        while start > 0:
            lo = max(0, start - block)
            chunk = os.pread(fd, start - lo, lo)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = lo + cut + 1
                break
            start, block = lo, min(block * 2, 1 << 24)
        last = os.pread(fd, end - start, start) if end > start else b""
    finally:
        os.close(fd)
    if not last:
        return None
    try:
        rec: dict[str, Any] = json.loads(last)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the last record of {path} is not valid JSON; run `toolcell audit verify` "
                          "and move the file aside", key="audit.file") from exc
    return rec


def _first_record(path: Path) -> dict[str, Any] | None:
    """The first record of a file, or None when it can't be read (absent, empty, oversized, not JSON)."""
    try:
        fd = _open_read(path)
    except OSError:
        return None
    try:
        head = os.pread(fd, _FIRST_LINE_MAX, 0)
    finally:
        os.close(fd)
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return None
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _lock(path: Path) -> int:
    """Hold ``.FILE.lock`` (flock, exclusive) for the life of the log; refuse when another process holds it."""
    lock_path = path.with_name(f".{path.name}.lock")  # hidden: ``FILE.*`` globs (verify's arguments) skip it
    fd = open_private(lock_path, os.O_RDWR | os.O_CREAT, key="audit.file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = quote(os.pread(fd, 200, 0).decode(errors="replace").strip(), 80) or "unknown"
        os.close(fd)
        raise ConfigError(f"audit file {str(path)!r} is in use by another supervisor ({holder}; lock "
                          f"{str(lock_path)!r}): give each supervisor its own audit.file", key="audit.file") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


class AuditLog:
    """Appends hash-chained records; ``append`` returns once the record is on disk."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 64 * 2**20, keep: int = 10,
                 protect_s: float = 24 * 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.protect_s = protect_s
        self.clock = clock
        self._lock = asyncio.Lock()
        self._fd = self._lock_fd = -1
        private_dir(self.path.parent, key="audit.file")
        self._lock_fd = _lock(self.path)
        try:
            self._fd = open_private(self.path, _OPEN_FLAGS, key="audit.file")  # a planted symlink fails here
            self.seq, self.last_hash = 0, GENESIS
            for candidate in [self.path, *reversed(rotated_files(self.path))]:
                last = _last_record(candidate)
                if last is not None:
                    self.seq, self.last_hash = int(last.get("seq", 0)), str(last.get("hash", GENESIS))
                    break
        except BaseException:
            self.close()
            raise
        # Real records already in the live file are no younger than now (an upper bound: errs to keeping).
        self._newest_real: float | None = self.clock() if os.fstat(self._fd).st_size > 0 else None

    def close(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    async def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            try:
                return await asyncio.to_thread(self._append, fields)
            except OSError as exc:
                raise AuditUnavailable(f"audit trail unavailable: {exc.strerror}") from exc

    def _append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        if self._fd < 0:
            raise OSError(9, "audit log is closed")
        bounded = bound_fields(fields)
        record, line = self._seal(bounded)
        size = os.fstat(self._fd).st_size
        if size > 0 and size + len(line) > self.max_bytes:
            self._rotate()
            record, line = self._seal(bounded)
        self._write(record, line)
        if is_real(bounded):
            self._newest_real = record["time"]
        return record

    def _seal(self, fields: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
        record = {"seq": self.seq + 1, "time": round(self.clock(), 6), **fields, "prev": self.last_hash}
        record["hash"] = record_hash(record)
        return record, canonical(record) + b"\n"

    def _write(self, record: dict[str, Any], line: bytes) -> None:
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.seq, self.last_hash = record["seq"], record["hash"]

    def _rotate(self) -> None:
        existing = rotated_files(self.path)
        number = int(_ROTATED.search(existing[-1].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]
        rotated = self.path.with_name(f"{self.path.name}.{number:06d}")
        newest_real = self._newest_real
        os.close(self._fd)
        self._fd = -1
        os.rename(self.path, rotated)
        self._fd = open_private(self.path, _OPEN_FLAGS, key="audit.file")
        self._newest_real = None
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        pruned, kept = self._prune()
        note: dict[str, Any] = {"event": ROTATED_EVENT, "rotated": rotated.name, "rotated_newest_real_time":
                                newest_real, "rotated_last_seq": self.seq}
        if pruned:
            note["pruned"] = pruned
        if kept:
            note["kept_beyond_keep"] = kept
        self._write(*self._seal(bound_fields(note)))

    def _prune(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Delete files beyond ``keep``, oldest first, stopping at one with recent real records."""
        files = rotated_files(self.path)
        if self.keep <= 0 or len(files) <= self.keep:
            return [], []
        pruned: list[dict[str, Any]] = []
        horizon = self.clock() - self.protect_s
        chain = [*files, self.path]
        excess = files[:-self.keep]
        for i, old in enumerate(excess):
            nxt = _first_record(chain[i + 1])
            newest = self._newest_real_of(old, nxt)
            if newest is not None and newest > horizon:
                kept = [p.name for p in excess[i:]]
                log.warning("audit: keeping %d file(s) beyond keep=%d (%s...): they hold invocation records "
                            "younger than audit.protect (%gs)", len(kept), self.keep, kept[0], self.protect_s)
                return pruned, kept
            first = _first_record(old)
            entry = {"file": old.name, "first_seq": first.get("seq") if first else None,
                     "last_seq": int(nxt["seq"]) - 1 if nxt and isinstance(nxt.get("seq"), int) else None}
            old.unlink()
            log.warning("audit: rotation deleted %s (seq %s..%s), beyond keep=%d", old, entry["first_seq"],
                        entry["last_seq"], self.keep)
            pruned.append(entry)
        return pruned, []

    @staticmethod
    def _newest_real_of(old: Path, nxt: Mapping[str, Any] | None) -> float | None:
        """Time of the newest real record in ``old``: from the next file's rotation record, else its mtime."""
        if nxt is not None and nxt.get("event") == ROTATED_EVENT and nxt.get("rotated") == old.name:
            value = nxt.get("rotated_newest_real_time")
            return float(value) if isinstance(value, int | float) else None
        with contextlib.suppress(OSError):
            return os.lstat(old).st_mtime  # the last write: an upper bound
        return None


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
    # Rotation deleted seq 1..pruned_through (as recorded in the chain); the files it named.
    pruned_through: int = 0
    pruned_files: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if not self.ok:
            return f"{self.file}:{self.line}: {self.reason}"
        head = f"ok: {self.records} records, seq {self.first_seq}..{self.last_seq}, chain intact"
        if self.anchored:
            return f"{head} from the first record"
        start = f"{head} from seq {self.first_seq}"
        if self.pruned_through == 0:
            return f"{start}; seq 1..{self.first_seq - 1} absent and not recorded as pruned (files not given?)"
        names = ", ".join(self.pruned_files[-3:])
        text = f"{start}; seq 1..{self.pruned_through} pruned at rotation (latest deleted: {names})"
        if self.pruned_through < self.first_seq - 1:
            text += f"; seq {self.pruned_through + 1}..{self.first_seq - 1} absent (files not given?)"
        return text


def verify(paths: Iterable[str | os.PathLike[str]]) -> Verdict:
    """Check the chain across ``paths`` in order; report the first broken record and any pruning."""
    prev_hash: str | None = None
    prev_seq = 0
    first_seq, count, anchored = 0, 0, True
    pruned_through, pruned_files = 0, []
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
                if rec.get("event") == ROTATED_EVENT and isinstance(rec.get("pruned"), list):
                    for entry in rec["pruned"]:
                        if isinstance(entry, dict):
                            pruned_files.append(str(entry.get("file")))
                            if isinstance(entry.get("last_seq"), int):
                                pruned_through = max(pruned_through, entry["last_seq"])
                prev_hash, prev_seq = rec["hash"], seq
                count += 1
    return Verdict(True, count, first_seq, prev_seq, anchored, pruned_through=pruned_through,
                   pruned_files=tuple(pruned_files))
