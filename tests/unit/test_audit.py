"""The audit trail: hash chain, fsync'd appends, rotation, and verify's tamper detection."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from runtime.audit import GENESIS, AuditLog, record_hash, rotated_files, verify
from runtime.cli import main


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
    # Files out of order are detected.
    assert not verify([rotated[1], rotated[0], *rotated[2:], path]).ok
    # Dropping a middle file is detected.
    assert not verify([rotated[0], *rotated[2:], path]).ok


async def test_rotation_prunes_beyond_keep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
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
