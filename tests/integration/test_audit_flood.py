"""Callers cannot flush the audit trail or make refusals cost the supervisor (issue 14), on a real
supervisor and the real engine: three 1.4 MB anonymous requests, a refusal flood from another uid
(``setpriv``) while the owner keeps being served, and two supervisors given one audit file.

Each test also checks that normal calls keep being served and that ``audit verify`` is honest.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.security_support import AUDIENCE, ISSUER, Idp, serve_jwks
from tests.support import REPO, config_doc, engine, serving
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.audit import MAX_RECORD_BYTES, rotated_files, verify
from toolcell.backends.factory import open_backend
from toolcell.client import Client
from toolcell.errors import ConfigError
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

WORDS = json.dumps({"text": "one two three"})
FLOODER = 65534
FAT = 1_400_000  # bytes in each of the attack's caller strings


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def _owner() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _records(audit: Path) -> list[dict[str, Any]]:
    files = [*rotated_files(audit), audit]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _longest_line(audit: Path) -> int:
    return max(len(line) for f in [*rotated_files(audit), audit] for line in f.read_bytes().splitlines())


async def _wordcount(client: Client, n: int) -> list[str]:
    """Run the real tool ``n`` times; the invocation ids of the calls that came back ok."""
    ids = []
    for _ in range(n):
        result = await client.call("text.wordcount", WORDS, timeout=30)
        assert result.status.value == "ok", result
        ids.append(result.invocation_id)
    return ids


async def test_three_fat_anonymous_requests_keep_every_real_record(tmp_path: Path) -> None:
    """Before: each request wrote an ~8 MB record and rotation (64 KiB files, keep 2) deleted every real one."""
    idp = Idp()
    audit = tmp_path / "audit" / "audit.jsonl"
    with serve_jwks(idp) as (url, _):
        doc = config_doc(_owner(), str(tmp_path / "unused.sock"))
        doc["server"].update({"listen": "127.0.0.1:0", "insecure": True})
        doc["auth"] = {"require": ["token"], "rules": [{"match": {"subject": "alice"}, "tools": ["*"]}],
                       "jwt": {"jwks": url, "issuer": ISSUER, "audience": AUDIENCE}}
        doc["audit"] = {"file": str(audit), "max_bytes": "64Ki", "keep": 2}
        config = parse_config(doc, environ={}, base_dir=tmp_path)
        async with serving(config) as (app, _client), Client(app.address, token=idp.token("alice")) as alice:
            ids = await _wordcount(alice, 3)
            options = [("grpc.max_send_message_length", 8 * 2**20)]
            async with grpc.aio.insecure_channel(app.address, options=options) as channel:
                stub = pb_grpc.SupervisorStub(channel)
                for n in range(3):
                    request = pb.ExecuteRequest(tool=f"{n}" + "a." * (FAT // 2), arguments_json="{}",
                                                invocation_id="i" * FAT)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Call(request, timeout=30)
                    assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
                    assert len(err.value.details() or "") < 1000  # the caller's strings are not echoed back
            ids += await _wordcount(alice, 3)  # still served
    records = _records(audit)
    ends = {r["invocation_id"] for r in records if r["event"] == "invocation_end" and r.get("status") == "ok"}
    assert ends >= set(ids) and len(ids) == 6  # every real record kept
    # Each attack costs at most one (bounded) record: a denial, or none when the edge refused it unread.
    refusals = [r for r in records if r.get("decision") == "deny" or r.get("status") == "UNAUTHENTICATED"]
    assert len(refusals) <= 3
    longest = _longest_line(audit)
    assert longest <= MAX_RECORD_BYTES
    verdict = verify([*rotated_files(audit), audit])
    assert verdict.ok and verdict.anchored, verdict.describe()
    print(f"\nFIGURES fat-anonymous: records={len(records)} longest_record_bytes={longest} "
          f"real_ends_kept={len(ids)}/6 files={len(rotated_files(audit)) + 1} verify={verdict.describe()!r}")


FLOOD_SCRIPT = """
import asyncio, collections, json, sys, time
from toolcell.client import Client, ClientError
async def main():
    codes = collections.Counter()
    t0 = time.monotonic()
    async with Client(sys.argv[1]) as c:
        for n in range(int(sys.argv[2])):
            try:
                await c.call("text.wordcount", '{"text": "x"}', timeout=20)
                codes["ok"] += 1
            except ClientError as e:
                codes[e.code] += 1
    print(json.dumps({"codes": codes, "elapsed": time.monotonic() - t0}))
asyncio.run(main())
"""


@contextmanager
def _shared_dir() -> Iterator[Path]:
    """A socket directory another uid can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tc-flood-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_refusal_flood_from_one_uid_is_limited_while_the_owner_is_served(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "audit.jsonl"
    flood = 300
    with _shared_dir() as d:
        doc = config_doc(_owner(), str(d / "toolcell.sock"))
        doc["server"]["socket_mode"] = "0666"  # the default policy still lets only the owner's uid call
        # Tiny files, keep 1: only audit.protect (default 24h) stands between the flood and the owner's records.
        doc["audit"] = {"file": str(audit), "max_bytes": "8Ki", "keep": 1}
        config = parse_config(doc, environ={}, base_dir=tmp_path)
        async with serving(config) as (app, client):
            proc = await asyncio.create_subprocess_exec(
                "setpriv", f"--reuid={FLOODER}", f"--regid={FLOODER}", "--clear-groups",
                sys.executable, "-c", FLOOD_SCRIPT, app.address, str(flood),
                cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            mine = await _wordcount(client, 5)  # served while the flood runs
            out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
            assert proc.returncode == 0, err.decode()
            report = json.loads(out)
            mine += await _wordcount(client, 2)
            sizes = app.gate.state_sizes()
    codes, elapsed = report["codes"], report["elapsed"]
    budget = 20 + 5 * elapsed + 1  # default refusals_per_peer: burst 20, 5/s
    assert codes.get("ok", 0) == 0
    assert codes.get("PERMISSION_DENIED", 0) <= budget
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= flood - budget  # refused at once, before any work
    records = _records(audit)
    theirs = [r for r in records if r.get("decision") == "deny" and r["principal"].get("uid") == FLOODER]
    assert len(theirs) <= budget
    summaries = [r for r in records if r["event"] == "refusals_suppressed" and r.get("peer") == f"uid:{FLOODER}"]
    assert summaries and sum(s["count"] for s in summaries) >= 1
    ends = {r["invocation_id"] for r in records if r["event"] == "invocation_end" and r.get("status") == "ok"}
    assert ends >= set(mine) and len(mine) == 7
    assert sizes["refusal_peers"] <= 2 and sizes["rate_buckets"] <= 10
    files = [*rotated_files(audit), audit]
    verdict = verify(files)
    assert verdict.ok and verdict.anchored, verdict.describe()  # rotated, nothing deleted
    print(f"\nFIGURES refusal-flood: sent={flood} in {elapsed:.2f}s codes={codes} deny_records={len(theirs)} "
          f"summaries={[s['count'] for s in summaries]} owner_ok={len(mine)}/7 limiter_state={sizes} "
          f"audit_files={len(files)} audit_bytes={sum(f.stat().st_size for f in files)}")


async def test_two_supervisors_on_one_audit_file_the_second_refuses_to_start(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "audit.jsonl"
    first = config_doc(_owner(), str(tmp_path / "a.sock"))
    second = config_doc(_owner(), str(tmp_path / "b.sock"))
    for doc in (first, second):
        doc["audit"] = {"file": str(audit)}
    config_a = parse_config(first, environ={}, base_dir=tmp_path)
    config_b = parse_config(second, environ={}, base_dir=tmp_path)
    async with serving(config_a) as (_app, client):
        ids = await _wordcount(client, 1)
        with pytest.raises(ConfigError) as err:
            App(Supervisor(config_b, open_backend(config_b)))
        message = str(err.value)
        assert str(audit) in message and "in use by another supervisor" in message
        assert f"pid {os.getpid()}" in message
        # Another process gets the same answer from the CLI: it exits at once, naming the file and holder.
        config_file = tmp_path / "b.json"
        config_file.write_text(json.dumps(second))
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "toolcell", "serve", "--config", str(config_file), cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _out, err_text = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode != 0 and time.monotonic() - t0 < 60
        assert "in use by another supervisor" in err_text.decode() and str(audit) in err_text.decode()
        ids += await _wordcount(client, 1)  # the first one keeps serving, its chain unbroken
    verdict = verify([audit])
    assert verdict.ok and verdict.anchored, verdict.describe()
    ends = {r["invocation_id"] for r in _records(audit) if r["event"] == "invocation_end"}
    assert ends >= set(ids)
