"""Secret store (encrypted at rest), key loading, log redaction, and `toolcell secrets`."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolcell.errors import ConfigError, SecretError
from toolcell.policy.scrub import Redactor
from toolcell.secretstore import SecretStore, SecretStoreSettings, generate_key, load_key
from toolcell.telemetry import RedactingFilter

REPO = Path(__file__).resolve().parents[2]
VALUE = "s3cr3t-value-for-tests"


def store(tmp_path: Path, key: str | None = None) -> SecretStore:
    return SecretStore(tmp_path / "secrets.json", base64.b64decode(key or generate_key()))


def test_round_trip_and_nothing_in_the_clear(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.set("api", VALUE)
    s.set("db", "other-value")
    assert s.get("api") == VALUE and s.names() == ["api", "db"]
    raw = (tmp_path / "secrets.json").read_text()
    assert VALUE not in raw and base64.b64encode(VALUE.encode()).decode() not in raw
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert s.remove("db") and not s.remove("db") and s.names() == ["api"]


@pytest.mark.parametrize("tamper", ["flip", "swap"])
def test_tampering_is_detected(tmp_path: Path, tamper: str) -> None:
    s = store(tmp_path)
    s.set("a", VALUE)
    s.set("b", "another-value")
    doc = json.loads((tmp_path / "secrets.json").read_text())
    if tamper == "flip":
        ct = bytearray(base64.b64decode(doc["secrets"]["a"]["ciphertext"]))
        ct[0] ^= 1
        doc["secrets"]["a"]["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    else:  # move b's ciphertext under a's name: the name is bound as associated data
        doc["secrets"]["a"] = doc["secrets"]["b"]
    (tmp_path / "secrets.json").write_text(json.dumps(doc))
    with pytest.raises(SecretError, match="cannot be decrypted") as info:
        s.get("a")
    assert VALUE not in str(info.value)


def test_wrong_key_and_missing_secret(tmp_path: Path) -> None:
    store(tmp_path).set("a", VALUE)
    with pytest.raises(SecretError, match="cannot be decrypted"):
        store(tmp_path).get("a")
    with pytest.raises(SecretError, match="'nope' is not in the store"):
        store(tmp_path).get("nope")
    with pytest.raises(SecretError, match="invalid secret name"):
        store(tmp_path).set("bad name", "x")


@pytest.mark.parametrize(
    ("content", "mode", "fragment"),
    [(generate_key(), 0o644, "must not be readable"), ("not base64!", 0o600, "not base64"),
     (base64.b64encode(b"short").decode(), 0o600, "must be 32 bytes")],
)
def test_key_file_checks(tmp_path: Path, content: str, mode: int, fragment: str) -> None:
    key = tmp_path / "key"
    key.write_text(content)
    key.chmod(mode)
    with pytest.raises(ConfigError, match=fragment):
        load_key(SecretStoreSettings(store="x", key_file=str(key)), {})


def test_key_from_environment_or_refusal() -> None:
    key = generate_key()
    assert load_key(SecretStoreSettings(store="x"), {"TOOLCELL_SECRETS_KEY": key}) == base64.b64decode(key)
    with pytest.raises(ConfigError, match="no secrets key"):
        load_key(SecretStoreSettings(store="x"), {})


def test_log_records_are_redacted() -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("toolcell.test.redaction")
    handler = Collect()
    handler.addFilter(RedactingFilter(lambda: Redactor({"x": VALUE})))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("leaked %s and %s", VALUE, "ghp_" + "a" * 36)
        try:
            raise RuntimeError(f"boom {VALUE}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert VALUE not in text and "ghp_aaaa" not in text
    assert "[REDACTED:injected_secret]" in text and "[REDACTED:github_token]" in text


def test_cli_secrets_set_list_rm_never_echo(tmp_path: Path) -> None:
    key = generate_key()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"version: 1\nsecrets:\n  store: {tmp_path}/s.json\n"
                   "tools:\n  - {name: t, description: d, image: i, command: [x],"
                   " secrets: [{name: api, env: API_TOKEN}]}\n")
    env = {**os.environ, "TOOLCELL_SECRETS_KEY": key}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "toolcell", "secrets", *args, "--config", str(cfg)],
                              input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)

    stored = cli("set", "api", stdin=VALUE + "\n")
    assert stored.returncode == 0 and VALUE not in stored.stdout + stored.stderr
    listed = cli("list")
    assert listed.returncode == 0 and "api" in listed.stdout and "granted to: t" in listed.stdout
    assert VALUE not in listed.stdout
    assert SecretStore(tmp_path / "s.json", base64.b64decode(key)).get("api") == VALUE
    assert cli("rm", "api").returncode == 0
    missing = cli("rm", "api")
    assert missing.returncode == 3 and "no secret named 'api'" in missing.stderr
    nokey = subprocess.run([sys.executable, "-m", "toolcell", "secrets", "list", "--config", str(cfg)],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "TOOLCELL_SECRETS_KEY"})
    assert nokey.returncode == 3 and "no secrets key" in nokey.stderr
