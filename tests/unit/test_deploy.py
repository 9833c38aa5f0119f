"""Deployment files as data: the security settings every pattern must carry, and the operations helpers."""

from __future__ import annotations

import configparser
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from toolcell import metrics
from toolcell.configview import MASK, effective
from toolcell.errors import ImageMissing, InvalidArguments
from toolcell.settings import load_config, parse_config
from toolcell.telemetry import JsonFormatter, RedactingFilter

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, d) for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] in {"Deployment", "DaemonSet"}]


def pod_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_both_patterns_and_the_configmap_exist() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert ("Deployment", "mcp-server") in kinds and ("DaemonSet", "toolcell") in kinds
    assert ("ConfigMap", "toolcell-config") in kinds
    assert {file for file, _ in workloads()} == {"sidecar.yaml", "native-sidecar.yaml", "daemonset.yaml"}


def test_configmap_holds_a_valid_config() -> None:
    cm = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")
    config = parse_config(yaml.safe_load(cm["data"]["toolcell.yaml"]), environ={})
    assert config.server.listen == "unix:///run/toolcell/toolcell.sock" and config.server.socket_mode == 0o660
    assert {"text.wordcount", "python.run"} <= set(config.tools)


@pytest.mark.parametrize(("file", "workload"), workloads(), ids=lambda w: w if isinstance(w, str) else w["kind"])
def test_every_container_is_locked_down(file: str, workload: dict[str, Any]) -> None:
    spec = workload["spec"]["template"]["spec"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for c in pod_containers(spec):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc.get("privileged"), c["name"]
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), c["name"]
        if c["name"] == "prepare-dirs":  # one chown and chmod as root (tests/unit/test_kubernetes.py)
            assert sc["capabilities"]["add"] == ["CHOWN", "FOWNER"] and "restartPolicy" not in c
            continue
        assert not sc["capabilities"].get("add"), c["name"]
        assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0


@pytest.mark.parametrize(("file", "workload"), workloads(), ids=lambda w: w if isinstance(w, str) else w["kind"])
def test_toolcell_container_drains_and_mounts(file: str, workload: dict[str, Any]) -> None:
    spec = workload["spec"]["template"]["spec"]
    tc = next(c for c in pod_containers(spec) if c["name"] == "toolcell")
    assert tc["image"].startswith("toolcell/supervisor:")
    # Probes are HTTP on the metrics port, no interpreter per check (tests/unit/test_kubernetes.py).
    assert all("exec" not in tc[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    # The pod must outlive the supervisor's drain (shutdown_grace in the ConfigMap: 20s).
    assert spec["terminationGracePeriodSeconds"] > 20
    mounts = {m["mountPath"]: m for m in tc["volumeMounts"]}
    assert mounts["/etc/toolcell"]["readOnly"] is True and "/run/toolcell" in mounts
    # The MCP server side never gets the engine socket.
    for other in (c for c in pod_containers(spec) if c["name"] != "toolcell"):
        assert all("docker.sock" not in m["mountPath"] for m in other.get("volumeMounts", []))


def test_compose_file_is_locked_down_and_v1_compatible() -> None:
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert doc["version"] == "2.4"  # group_add, init, healthcheck conditions: supported by compose v1 in 2.4
    for name, svc in doc["services"].items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert not svc["user"].startswith("0"), name
        if name == "mcp":  # the MCP bridge serves HTTP: its port is published on the host's loopback only
            assert svc["ports"] == ["127.0.0.1:8765:8765"] and "network_mode" not in svc
            assert all("docker.sock" not in v for v in svc["volumes"])
        else:
            assert svc["network_mode"] == "none", name
    tc = doc["services"]["toolcell"]
    assert tc["healthcheck"]["test"] == ["CMD", "toolcell", "health"]
    assert tc["mem_limit"] and tc["pids_limit"] and tc["cpus"]
    caller = doc["services"]["example-caller"]
    assert all("docker.sock" not in v for v in caller["volumes"])
    parse_config(yaml.safe_load((DEPLOY / "compose" / "config" / "toolcell.yaml").read_text()), environ={})


def test_systemd_unit_sandboxing() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "toolcell.service")
    svc = unit["Service"]
    assert svc["User"] == "toolcell" and svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == "" and svc["ProtectSystem"] == "strict"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "RestrictSUIDSGID",
                "LockPersonality", "RestrictNamespaces"):
        assert svc[key] == "yes", key
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID" and svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > 10
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / "toolcell.service")],
                             capture_output=True, text=True)
        problems = [line for line in out.stderr.splitlines() if "is not executable" not in line and line.strip()]
        assert problems == [], problems


def test_image_config_is_valid() -> None:
    config = load_config(REPO / "images" / "supervisor" / "toolcell.yaml")
    assert config.server.listen == "unix:///run/toolcell/toolcell.sock"


def _configmap_doc() -> dict[str, Any]:
    cm = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")
    doc: dict[str, Any] = yaml.safe_load(cm["data"]["toolcell.yaml"])
    return doc


SHIPPED_CONFIGS = {
    "compose": lambda: yaml.safe_load((DEPLOY / "compose" / "config" / "toolcell.yaml").read_text()),
    "image": lambda: yaml.safe_load((REPO / "images" / "supervisor" / "toolcell.yaml").read_text()),
    "kubernetes": _configmap_doc,
}


@pytest.mark.parametrize("where", sorted(SHIPPED_CONFIGS))
def test_shipped_configs_keep_a_rotated_audit_trail_on_a_volume(where: str) -> None:
    doc = SHIPPED_CONFIGS[where]()
    # Instances are unique by default (pod or host name): a shipped config never pins one.
    assert "instance" not in doc["server"]
    audit = parse_config(doc, environ={}).security.audit
    assert audit is not None and audit.max_bytes <= 256 * 2**20 and audit.keep >= 1 and audit.protect_s > 0
    directory = str(Path(audit.file).parent)
    if where == "kubernetes":  # its own volume (tests/unit/test_kubernetes.py checks each pod mounts it)
        assert directory == "/var/log/toolcell"
    else:  # the named volume compose mounts there (the image's callers mount one at /run/toolcell too)
        compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
        volumes = dict(v.split(":")[:2][::-1] for v in compose["services"]["toolcell"]["volumes"])
        parent = str(Path(directory).parent)
        assert volumes[parent] in compose["volumes"], volumes  # a named volume: it outlives the container


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    doc = {"version": 1, "telemetry": {"otlp_endpoint": "https://user:hunter2@collector:4317"},
           "profiles": {"default": {"env": {"API_TOKEN": "plain-value", "GREETING": "hello",
                                            "NOTE": "ghp_" + "a" * 36}}},
           "tools": [{"name": "t", "description": "d", "image": "i", "command": ["c"]}]}
    view = effective(parse_config(doc, environ={}, base_dir=tmp_path))
    text = json.dumps(view)
    assert "hunter2" not in text and "plain-value" not in text and "ghp_" not in text
    env = view["profiles"]["default"]["env"]
    assert env["API_TOKEN"] == MASK and env["NOTE"] == MASK and env["GREETING"] == "hello"
    assert view["telemetry"]["otlp_endpoint"] == f"https://{MASK}@collector:4317"
    assert view["profiles"]["default"]["memory"] == "256Mi"  # defaults filled in, in the config's units


def test_json_log_lines_carry_trace_ids_and_are_redacted() -> None:
    from toolcell.policy.scrub import Redactor

    record_out: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record_out.append(self.format(record))

    handler = Keep()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter(lambda: Redactor({"s": "sekret-value-123"})))
    logger = logging.getLogger("toolcell.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("x") as span:
        logger.warning("leaked %s here", "sekret-value-123", extra={"tool": "a.b", "payload": "nope"})
    logger.removeHandler(handler)
    doc = json.loads(record_out[0])
    assert doc["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert "sekret-value-123" not in record_out[0] and doc["tool"] == "a.b" and "payload" not in doc
    assert doc["level"] == "WARNING" and doc["logger"] == "toolcell.test.json"
    assert trace.get_current_span().get_span_context().is_valid is False


def test_rejection_reasons_are_bounded_labels() -> None:
    assert metrics.reason_of(ImageMissing("x")) == "image_missing"
    assert metrics.reason_of(InvalidArguments("bad", path="text")) == "invalid_arguments"
