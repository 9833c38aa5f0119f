"""The audit trail: hash chain, fsync'd appends, rotation, and verify's tamper detection."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from toolcell.audit import (
    GENESIS,
    MAX_RECORD_BYTES,
    MAX_STRING,
    AuditLog,
    quote,
    record_hash,
    rotated_files,
    verify,
)
from toolcell.cli import main
from toolcell.errors import ConfigError


async def _write(path: Path, n: int, **kw: object) -> AuditLog:
    log = AuditLog(path, **kw)  # type: ignore[arg-type]
    for i in range(n):
        await log.append({"event": "decision", "tool": f"t{i}", "decision": "allow"})
    return log


async def test_chain_links_every_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 3)).close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev"] == GENESIS
    assert recs[1]["prev"] == recs[0]["hash"] and recs[2]["prev"] == recs[1]["hash"]
    assert all(record_hash(r) == r["hash"] for r in recs)
    assert verify([path]).ok and verify([path]).records == 3
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_chain_resumes_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 2)).close()
    (await _write(path, 2)).close()
    verdict = verify([path])
    assert verdict.ok and (verdict.first_seq, verdict.last_seq) == (1, 4)


async def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 12, max_bytes=600, keep=100)).close()
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    files = [*rotated, path]
    # 12 records plus one ``audit_rotated`` record opening each new file.
    assert verify(files).ok and verify(files).records == 12 + len(rotated)
    # The live file alone verifies from where it starts, marked as not anchored at the genesis record.
    alone = verify([path])
    assert alone.ok and not alone.anchored
    assert "absent and not recorded as pruned" in alone.describe()  # not "intact from the first record"
    # Files out of order are detected.
    assert not verify([rotated[1], rotated[0], *rotated[2:], path]).ok
    # Dropping a middle file is detected.
    assert not verify([rotated[0], *rotated[2:], path]).ok


async def test_rotation_prunes_beyond_keep(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    with caplog.at_level(logging.WARNING, "toolcell.audit"):
        (await _write(path, 20, max_bytes=400, keep=2, protect_s=0)).close()
    assert len(rotated_files(path)) == 2
    verdict = verify([*rotated_files(path), path])
    assert verdict.ok and not verdict.anchored
    # Honest: the chain itself says which files rotation deleted and which seqs they held.
    assert verdict.pruned_through == verdict.first_seq - 1
    newest_gone = f"audit.jsonl.{int(rotated_files(path)[0].name.rsplit('.', 1)[1]) - 1:06d}"
    assert verdict.pruned_files[-1] == newest_gone
    assert f"seq 1..{verdict.first_seq - 1} pruned at rotation (latest deleted: " in verdict.describe()
    deleted = [r.getMessage() for r in caplog.records if "rotation deleted" in r.getMessage()]
    assert len(deleted) == int(newest_gone.rsplit(".", 1)[1])  # one WARNING per deleted file
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert main(["audit", "verify", *map(str, [*rotated_files(path), path])]) == 0
    assert "pruned at rotation (latest deleted: " in capsys.readouterr().out
    # The live file alone: its rotated files are checked first, as if named (and not twice when named).
    assert main(["audit", "verify", str(path)]) == 0
    alone = capsys.readouterr().out
    assert main(["audit", "verify", str(rotated_files(path)[-1]), str(path)]) == 0
    assert capsys.readouterr().out == alone and f"seq {verdict.first_seq}.." in alone


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("tamper", ["edit", "edit_last", "delete", "reorder", "insert", "garbage"])
async def test_tampering_is_detected_at_the_first_broken_record(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 5)).close()
    lines = _lines(path)
    expected_line = 3
    if tamper == "edit":
        rec = json.loads(lines[2])
        rec["decision"] = "deny"
        lines[2] = json.dumps(rec) + "\n"
    elif tamper == "edit_last":
        lines[4] = lines[4].replace('"t4"', '"t9"')
        expected_line = 5
    elif tamper == "delete":
        del lines[2]
    elif tamper == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif tamper == "insert":
        lines.insert(2, lines[1])
    else:
        lines[2] = "not json\n"
    path.write_text("".join(lines))
    verdict = verify([path])
    assert not verdict.ok
    assert verdict.line == expected_line, verdict.describe()
    assert verdict.records == expected_line - 1


async def test_editing_a_record_and_fixing_its_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 4)).close()
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["decision"] = "deny"
    rec["hash"] = record_hash(rec)
    lines[1] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    verdict = verify([path])
    assert not verdict.ok and verdict.line == 3 and "prev hash mismatch" in verdict.reason


async def test_cli_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    (await _write(path, 3)).close()
    assert main(["audit", "verify", str(path)]) == 0
    assert "ok: 3 records, seq 1..3, chain intact from the first record" in capsys.readouterr().out
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines))
    assert main(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"audit chain broken at {path}:2: seq 3: expected seq 2" in err
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2


# --- bounded records ------------------------------------------------------------------------------

MIB = 2**20


@pytest.mark.parametrize(("text", "kept"), [
    ("text.echo", "text.echo"),
    ("x" * MAX_STRING, "x" * MAX_STRING),
    ("x" * (MAX_STRING + 1), None),
    ("a." * (MIB // 2), None),
    ("\n" * MIB, None),
    ("tab\there", None),            # a control character: escaped, marked with the original's hash
    ("\u202eevil", None),           # a bidi override
    ("\ud800", None),               # a lone surrogate (would not even encode as UTF-8)
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),  # printable non-ASCII is kept as is
])
def test_quote_is_short_escaped_and_honest(text: str, kept: str | None) -> None:
    quoted = quote(text)
    if kept is not None:
        assert quoted == kept
        return
    assert len(quoted) <= MAX_STRING + 100
    assert f"[{len(text)} chars, sha256:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}]" \
        in quoted
    assert quoted.isprintable()
    quoted.encode()  # always valid UTF-8


def _fat(n: int) -> str:
    return "eyJ" + "A" * n  # the body of a 1.4 MB "JWT"


@pytest.mark.parametrize("fields", [
    {"event": "decision", "tool": _fat(1_400_000), "reason": _fat(1_400_000), "peer": _fat(1_400_000)},
    {"event": "decision", "meta": {f"k{n}": "v" * 200 for n in range(10_000)}},
    {"event": "decision", "meta": [["x" * 500] * 100] * 100},
    {"event": "decision", "deep": {"a": {"b": {"c": {"d": {"e": {"f": "g"}}}}}}},
    {"event": "decision", "n": 10**400, "f": float("nan"), "g": float("inf"), "s": {"set"}},
    {"event": "decision", **{f"field{n}": "y" * 100 for n in range(200)}},
])
async def test_every_record_is_capped(tmp_path: Path, fields: dict[str, object]) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    record = await log.append(fields)
    log.close()
    line = path.read_bytes()
    assert len(line) <= MAX_RECORD_BYTES
    assert record["event"] == "decision" and verify([path]).ok
    json.loads(line)  # strict JSON: no NaN, no Infinity
    assert b"NaN" not in line or b'"nan"' in line


async def test_three_fat_records_keep_the_real_ones(tmp_path: Path) -> None:
    """Before: three 1.4 MB anonymous requests wrote 8 MB records and rotation deleted every real record."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=64 * 1024, keep=2)
    for n in range(5):
        await log.append({"event": "invocation_end", "ending": "result", "tool": "text.echo", "n": n})
    for _ in range(3):
        await log.append({"event": "decision", "decision": "deny", "status": "UNAUTHENTICATED",
                          "reason": _fat(1_400_000), "peer": "ip:127.0.0.1"})
    log.close()
    assert rotated_files(path) == []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["n"] for r in records if r["event"] == "invocation_end"] == [0, 1, 2, 3, 4]
    assert max(len(line) for line in path.read_bytes().splitlines()) <= MAX_RECORD_BYTES


# --- rotation never flushes recent real records ----------------------------------------------------

class WallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


REAL = {"event": "invocation_end", "ending": "result", "tool": "text.echo"}
REFUSAL = {"event": "decision", "decision": "deny", "status": "PERMISSION_DENIED", "tool": "x" * 100}


@pytest.mark.parametrize(("protect_s", "age_s", "real_kept"), [
    (3600.0, 0.0, True),       # a flood right after the real record: it stays
    (3600.0, 7200.0, False),   # the same flood two hours later: rotation may delete it
    (0.0, 0.0, False),         # audit.protect: 0 -> plain keep
])
async def test_a_refusal_flood_cannot_rotate_recent_real_records_away(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, protect_s: float, age_s: float, real_kept: bool) -> None:
    path = tmp_path / "audit.jsonl"
    clock = WallClock()
    log = AuditLog(path, max_bytes=2048, keep=2, protect_s=protect_s, clock=clock)
    await log.append(REAL)
    clock.now += age_s
    with caplog.at_level(logging.WARNING, "toolcell.audit"):
        for _ in range(200):
            await log.append(REFUSAL)
    log.close()
    files = [*rotated_files(path), path]
    text = "".join(f.read_text() for f in files)
    assert ('"ending":"result"' in text) is real_kept
    verdict = verify(files)
    assert verdict.ok
    if real_kept:
        assert verdict.anchored and verdict.first_seq == 1
        assert any("beyond keep=2" in r.getMessage() for r in caplog.records)
        # Only the file with the real record is kept beyond keep: the refusal-only files after it
        # are not deleted either (the chain has no holes), but nothing older than it was lost.
    else:
        assert not verdict.anchored and verdict.pruned_through == verdict.first_seq - 1
        assert len(rotated_files(path)) == 2


async def test_refusal_only_files_are_pruned_while_newer_real_ones_stay(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2048, keep=2, protect_s=3600.0, clock=WallClock())
    for _ in range(100):
        await log.append(REFUSAL)
    for _ in range(6):
        await log.append(REAL)
    log.close()
    files = [*rotated_files(path), path]
    text = "".join(f.read_text() for f in files)
    assert text.count('"ending":"result"') == 6
    verdict = verify(files)
    assert verdict.ok and verdict.pruned_through == verdict.first_seq - 1 > 0


# --- one supervisor per audit file, paths no one else controls --------------------------------------

def test_a_second_log_on_the_same_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    with pytest.raises(ConfigError) as err:
        AuditLog(path)
    message = str(err.value)
    assert str(path) in message and f"pid {os.getpid()}" in message and "in use by another supervisor" in message
    first.close()
    AuditLog(path).close()  # released on close


@pytest.mark.parametrize("case", ["group_writable", "other_owner", "symlinked_file", "symlinked_dir"])
def test_unsafe_audit_paths_are_refused(tmp_path: Path, case: str) -> None:
    d = tmp_path / "audit"
    d.mkdir(mode=0o700)
    path = d / "audit.jsonl"
    AuditLog(path).close()  # the same probe on the safe path works
    if case == "group_writable":
        d.chmod(0o770)
    elif case == "other_owner":
        if os.geteuid() != 0:
            pytest.fail("this case needs root (chown); the test suite runs as root in its container")
        os.chown(d, 65534, 65534)
    elif case == "symlinked_file":
        path.unlink()
        (tmp_path / "elsewhere").write_text("")
        path.symlink_to(tmp_path / "elsewhere")
    else:
        real = tmp_path / "real"
        d.rename(real)
        d.symlink_to(real)
    with pytest.raises(ConfigError) as err:
        AuditLog(path)
    assert "refusing" in str(err.value)


async def test_resume_after_a_huge_legacy_last_line_is_linear(tmp_path: Path) -> None:
    """An 8 MB record written before records were capped: the chain resumes, reading it once."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2**30)
    big = {"event": "decision", "reason": "r" * (8 * MIB)}
    record = {"seq": 1, "time": 1.0, **big, "prev": GENESIS}
    record["hash"] = record_hash(record)
    log.close()
    path.write_bytes(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    log = AuditLog(path)
    assert (log.seq, log.last_hash) == (1, record["hash"])
    await log.append({"event": "decision", "decision": "allow"})
    log.close()
    assert verify([path]).ok
