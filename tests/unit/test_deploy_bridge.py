"""deploy/README.md's HTTP bridge container, read from the README: its arguments are the CLI's, its probes
reach what the bridge serves and pass its Host guard (and the pod IP the kubelet would send does not)."""

from __future__ import annotations

from typing import Any

import yaml

from tests.support import REPO
from toolcell.cli import parser
from toolcell.mcp.bridge import HttpAccess, access_problem, parse_listen
from toolcell.mcp.httpguard import _allowed, default_allowed_hosts
from toolcell.probehttp import parse_listen as parse_metrics_listen

SECTION = "\n## The HTTP MCP bridge beside the supervisor (Kubernetes)\n"


def container() -> dict[str, Any]:
    text = (REPO / "deploy" / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (found,) = yaml.safe_load(block)
    assert isinstance(found, dict)
    return found


def test_the_documented_bridge_container_runs_the_cli_as_documented() -> None:
    c = container()
    args = parser().parse_args(c["args"])
    assert (args.command, args.transport) == ("mcp", "http")
    host, port = parse_listen(args.listen)
    _, metrics_port = parse_metrics_listen(args.metrics_listen)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"mcp-http": port, "mcp-metrics": metrics_port}
    socket_dir = args.target.removeprefix("unix://").rsplit("/", 1)[0]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {socket_dir}
    assert c["securityContext"]["runAsUser"] == 10002 and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    env = {e["name"]: e["value"] for e in c["env"]}
    extra = tuple(env["TOOLCELL_MCP_ALLOWED_HOSTS"].split(","))
    assert access_problem(host, HttpAccess(allowed_hosts=extra, insecure_open=True)) is None

    # Probes: readiness is the MCP port's /healthz with a Host the guard lets through; liveness /livez.
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], ports[ready["port"]], live["path"], ports[live["port"]]) == (
        "/healthz", port, "/livez", metrics_port)
    allowed = (*default_allowed_hosts(host, port), *extra)
    probe_host = next(h["value"] for h in ready["httpHeaders"] if h["name"] == "Host")
    cases = [(probe_host, True), (f"10.1.2.3:{port}", False)]  # what the kubelet would send without the header
    assert [(h, _allowed(h, allowed)) for h, _ in cases] == cases
