"""``toolcell config show`` prints a config: the file's own keys and units, accepted by ``parse_config``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolcell.configview import MASK, effective
from toolcell.settings import parse_config
from toolcell.units import format_duration, format_size, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("value", "text"), [
    (0, 0), (1, 1), (1000, 1000), (1024, "1Ki"), (256 * 1024**2, "256Mi"), (1280 * 1024, "1280Ki"),
    (3 * 1024**3, "3Gi"), (64 * 1024**2 + 1, 64 * 1024**2 + 1),
])
def test_format_size(value: int, text: int | str) -> None:
    assert format_size(value) == text and parse_size(text, "k") == value


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0s"), (0.7, "700ms"), (2.0, "2s"), (20.0, "20s"), (90.0, "90s"), (120.0, "2m"), (300.0, "5m"),
    (86400.0, "24h"), (2.5, "2500ms"), (0.0005, "0.5ms"), (0.1 + 0.2, "300ms"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text and parse_duration(text, "k") == pytest.approx(seconds)


def full_config(tmp_path: Path) -> dict[str, Any]:
    """Every section the view writes, with values away from the defaults."""
    for name in ("cert.pem", "key.pem", "ca.pem", "jwks.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "data").mkdir()
    return {
        "version": 1,
        "server": {"listen": "127.0.0.1:50051", "tls": {"cert": "cert.pem", "key": "key.pem", "client_ca": "ca.pem"},
                   "shutdown_grace": "20s", "health_interval": 0, "max_connection_idle": "90s",
                   "instance": "east-1"},
        "engine": {"kind": "oci", "oci": {"runtime": "crun", "rootfs_dir": str(tmp_path / "rootfs")}},
        "telemetry": {"otlp_endpoint": "https://user:hunter2@collector:4317", "span_file_max_bytes": "4Mi"},
        "auth": {"require": ["cert"], "jwt": {"jwks": "jwks.json", "issuer": "https://idp", "audience": "toolcell",
                                              "leeway": "10s"},
                 "rules": [{"match": {"cert": "agent"}, "tools": ["text.*"], "actions": ["call"]},
                           {"match": [{"subject": "ops"}, {"group": "admins"}]}]},
        "rate_limits": {"per_principal": {"rate": 2.5, "burst": 5}, "tools": {"text.wordcount": {"rate": 1}},
                        "concurrency": {"global": 8, "per_tool": 2}, "refusals_per_peer": "off"},
        "admission": {"min_available_memory": "128Mi", "max_cpu_percent": 90, "queue": 4, "max_wait": "500ms"},
        "audit": {"file": str(tmp_path / "audit.jsonl"), "max_bytes": "1Mi", "keep": 2, "protect": "1h"},
        "egress": {"network": "egress-net", "proxy_memory": "32Mi"},
        "secrets": {"store": str(tmp_path / "secrets.json"), "key_env": "MY_KEY"},
        "profiles": {
            "default": {"memory": "128Mi", "timeout": "45s", "env": {"API_TOKEN": "plain-value", "GREETING": "hi"},
                        "pool": {"size": 1, "ttl": "10m"}},
            "wide": {"extends": "default", "memory": "1Gi", "shm": "16Mi", "kill_grace": "1500ms",
                     "mounts": [{"source": str(tmp_path / "data"), "target": "/data"}],
                     "output": {"stdout_max_bytes": "2Mi", "scrub_budget": "3s"}},
            "online": {"network": ["api.example.com", {"host": "*.example.org", "ports": [443, 8443]}]},
        },
        "tools": [{"name": "text.wordcount", "description": "d", "image": "toolcell/python:bookworm",
                   "command": ["python3", "wc.py"], "output_schema": {"type": "object"},
                   "annotations": {"readOnlyHint": True}, "secrets": [{"name": "tok", "env": "TOK"}]},
                  {"name": "net.fetch", "description": "d", "image": "i", "command": ["c"], "profile": "online"},
                  {"name": "big.run", "description": "d", "image": "i", "command": ["c"], "profile": "wide",
                   "pool": {"size": 2}}],
        "servers": [{"name": "time", "image": "toolcell/mcp-time:latest", "command": ["mcp-server-time"],
                     "env": {"TZ": "UTC", "SERVICE_PASSWORD": "pw"}, "secrets": [{"name": "tok", "file": "/run/s/t"}],
                     "pool": {"size": 1, "ttl": "2m"}, "roots": [{"uri": "file:///data", "name": "data"}],
                     "discovery_timeout": "90s",
                     "tools": {"get_current_time": {"profile": "wide", "title": "Now", "hidden": False},
                               "convert_time": {"hidden": True, "annotations": {"readOnlyHint": True}}}}],
    }


def show(config_doc: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    view = effective(parse_config(config_doc, environ={}, base_dir=tmp_path), config_doc)
    return dict(yaml.safe_load(yaml.safe_dump(view, sort_keys=False)))


@pytest.mark.parametrize("which", ["built-in", "supervisor image", "compose", "servers", "every section"])
def test_the_view_is_a_config_that_parses_to_the_same_view(tmp_path: Path, which: str) -> None:
    paths = {"built-in": REPO / "runtime" / "data" / "default-config.yaml",
             "supervisor image": REPO / "images" / "supervisor" / "toolcell.yaml",
             "compose": REPO / "deploy" / "compose" / "config" / "toolcell.yaml"}
    if which in paths:
        doc = yaml.safe_load(paths[which].read_text())
    elif which == "servers":
        doc = {"version": 1, "servers": [{"name": "time", "image": "toolcell/mcp-time:latest",
                                          "command": ["mcp-server-time"], "pool": {"size": 1}}]}
    else:
        doc = full_config(tmp_path)
    view = show(doc, tmp_path)
    again = parse_config(view, environ={}, base_dir=tmp_path)  # schema and every check, as profiles check does
    assert effective(again, view) == view  # a fixed point: nothing lost, nothing renamed


def test_the_view_uses_the_files_keys_and_units(tmp_path: Path) -> None:
    view = show(full_config(tmp_path), tmp_path)
    assert view["server"]["shutdown_grace"] == "20s" and view["server"]["max_connection_idle"] == "90s"
    assert view["server"]["health_interval"] == "0s" and view["server"]["instance"] == "east-1"
    assert view["server"]["tls"] == {"cert": "cert.pem", "key": "key.pem", "client_ca": "ca.pem"}
    wide = view["profiles"]["wide"]
    assert (wide["memory"], wide["shm"], wide["kill_grace"], wide["timeout"]) == ("1Gi", "16Mi", "1500ms", "45s")
    assert wide["output"]["stdout_max_bytes"] == "2Mi" and wide["output"]["max_total_bytes"] == "2304Ki"
    assert wide["env"]["API_TOKEN"] == MASK and wide["env"]["GREETING"] == "hi"  # inherited, masked
    assert view["profiles"]["online"]["network"][1] == {"host": "*.example.org", "ports": [443, 8443],
                                                         "allow_private": False}
    tools = {t["name"]: t for t in view["tools"]}
    assert tools["text.wordcount"]["pool"] == {"size": 1, "ttl": "10m"}  # from its profile
    assert tools["big.run"]["pool"] == {"size": 2, "ttl": "10m"} and "pool" not in tools["net.fetch"]
    server = view["servers"][0]
    assert server["pool"] == {"size": 1, "ttl": "2m"} and server["discovery_timeout"] == "90s"
    assert server["env"] == {"SERVICE_PASSWORD": MASK, "TZ": "UTC"}
    assert view["rate_limits"]["refusals_per_peer"] == "off" and view["admission"]["max_wait"] == "500ms"
    assert view["audit"]["protect"] == "1h" and view["auth"]["jwt"]["leeway"] == "10s"
    assert view["telemetry"]["otlp_endpoint"] == f"https://{MASK}@collector:4317"
    text = json.dumps(view)
    assert "hunter2" not in text and "plain-value" not in text and '"pw"' not in text
    assert not [k for k in _keys(view) if k.endswith("_s")]  # no internal field names


def _keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [k for k, v in node.items() for k in (k, *_keys(v))]
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    return []


@pytest.mark.parametrize("config", [None, "images/supervisor/toolcell.yaml"])
def test_cli_show_output_passes_profiles_check(tmp_path: Path, config: str | None) -> None:
    argv = [sys.executable, "-m", "toolcell", "config", "show", *(["--config", str(REPO / config)] if config else [])]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# effective configuration of ") and "shutdown_grace: " in shown.stdout
    (tmp_path / "shown.yaml").write_text(shown.stdout)
    check = subprocess.run([sys.executable, "-m", "toolcell", "profiles", "check", str(tmp_path / "shown.yaml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and ": ok (" in check.stdout, check.stderr
    as_json = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(as_json.stdout) == yaml.safe_load(shown.stdout)  # the same shape


def test_sessions_and_workspaces_are_in_the_view_and_parse_back_the_same(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "runtime" / "data" / "default-config.yaml").read_text())
    doc["servers"] = [{"name": "time", "image": "toolcell/mcp-time:latest", "command": ["mcp-server-time"],
                       "session": {"idle_ttl": "2m", "max_calls": 7}}]
    config = parse_config(doc, environ={}, base_dir=tmp_path)
    view = show(doc, tmp_path)
    python = next(t for t in view["tools"] if t["name"] == "python.run")
    assert python["session"]["idle_ttl"] == "5m" and python["workspace"]["max_output_bytes"] == "2Mi"
    assert view["servers"][0]["session"] == {"idle_ttl": "2m", "max_lifetime": "1h", "max_calls": 7,
                                             "per_principal": 4}
    again = parse_config(view, environ={}, base_dir=tmp_path)
    assert again.tools["python.run"].session == config.tools["python.run"].session
    assert again.tools["python.run"].workspace == config.tools["python.run"].workspace
    assert again.sources["time"].session == config.sources["time"].session
