"""The Kubernetes manifests as data: strict schema validation for current Kubernetes versions, Pod Security
admission at the level each namespace states, and the pieces around the workloads fitting together.

``kubernetes-validate`` ships the API's JSON schemas offline; the Pod Security check is a table of the
baseline and restricted rules that matter for these pods (hostPath volumes, privileged, host namespaces,
added capabilities, hostPorts, seccomp, runAsNonRoot, allowPrivilegeEscalation, volume types), run
both ways: each pod is admitted at its namespace's level and refused at the next stricter one, and each
rule refuses a pod that breaks it and admits the same pod fixed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from toolcell.settings import parse_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
FILES = sorted(K8S.glob("*.yaml"))
# Kinds of a CRD, not of the core API: no schema in kubernetes-validate, their shape is checked below.
CRD_KINDS = {"ServiceMonitor"}
WORKLOAD_FILES = ("sidecar.yaml", "native-sidecar.yaml", "daemonset.yaml")
Doc = dict[str, Any]


def docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> list[tuple[str, Doc]]:
    return [(p.name, d) for p in FILES for d in docs(p)]


def one(kind: str, name: str | None = None, file: str | None = None) -> Doc:
    found = [d for f, d in all_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
             and (file is None or f == file)]
    assert len(found) == 1, (kind, name, file, len(found))
    return found[0]


def workload(file: str) -> Doc:
    found = [d for d in docs(K8S / file) if d["kind"] in {"Deployment", "DaemonSet"}]
    assert len(found) == 1, file
    return found[0]


def pod_containers(spec: Doc) -> Iterator[Doc]:
    """Every container Pod Security looks at: init (native sidecars included), regular, ephemeral."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key, [])


def toolcell_container(spec: Doc) -> Doc:
    return next(c for c in pod_containers(spec) if c["name"] == "toolcell")


def configmap_config() -> Any:
    return parse_config(yaml.safe_load(one("ConfigMap", "toolcell-config")["data"]["toolcell.yaml"]), environ={})


# --- strict schema validation ------------------------------------------------------------------------------

# Current Kubernetes: every minor version from 1.32 (the oldest still in vendors' support; native sidecars are
# on by default from 1.29) to the newest one kubernetes-validate ships schemas for.
OLDEST = (1, 32)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


VERSIONS = sorted({v for v in kv.all_versions() if _minor(v) >= OLDEST}, key=_minor)


def test_the_schemas_cover_current_kubernetes() -> None:
    assert _minor(VERSIONS[0]) == OLDEST and _minor(VERSIONS[-1]) >= (1, 35), VERSIONS
    assert [_minor(v)[1] for v in VERSIONS] == list(range(OLDEST[1], _minor(VERSIONS[-1])[1] + 1))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    checked = 0
    for doc in docs(path):
        if doc["kind"] in CRD_KINDS:
            with pytest.raises(kv.SchemaNotFoundError):  # if it ships one some day, use it instead of the shape
                kv.validate(doc, version, strict=True)
            continue
        kv.validate(doc, version, strict=True)
        checked += 1
    assert checked or path.name == "servicemonitor.yaml"


def test_strict_validation_catches_an_unknown_field() -> None:
    pod = copy.deepcopy(workload("sidecar.yaml"))
    pod["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(pod, VERSIONS[-1], strict=True)


def test_servicemonitor_has_the_shape_the_operator_reads() -> None:
    sm = one("ServiceMonitor")
    service = one("Service", "toolcell-metrics")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["namespace"] == "toolcell"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])


# --- Pod Security admission as data --------------------------------------------------------------------------

LEVELS = ("privileged", "baseline", "restricted")
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _sc(c: Doc) -> Doc:
    return c.get("securityContext") or {}


def _host_namespaces(spec: Doc) -> list[str]:
    return [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def _privileged(spec: Doc) -> list[str]:
    return [c["name"] for c in pod_containers(spec) if _sc(c).get("privileged")]


def _caps_baseline(spec: Doc) -> list[str]:
    return [f"{c['name']}:{cap}" for c in pod_containers(spec)
            for cap in (_sc(c).get("capabilities") or {}).get("add", []) if cap not in BASELINE_CAPS]


def _host_path(spec: Doc) -> list[str]:
    return [v["name"] for v in spec.get("volumes", []) if "hostPath" in v]


def _host_ports(spec: Doc) -> list[str]:
    return [f"{c['name']}:{p['hostPort']}" for c in pod_containers(spec) for p in c.get("ports", [])
            if p.get("hostPort")]


def _seccomp_type(sc: Doc) -> str | None:
    profile: Doc = sc.get("seccompProfile") or {}
    kind = profile.get("type")
    return kind if isinstance(kind, str) else None


def _seccomp_baseline(spec: Doc) -> list[str]:
    scs = [("pod", spec.get("securityContext") or {})] + [(c["name"], _sc(c)) for c in pod_containers(spec)]
    return [who for who, sc in scs if _seccomp_type(sc) == "Unconfined"]


def _volume_types(spec: Doc) -> list[str]:
    return [v["name"] for v in spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]


def _privilege_escalation(spec: Doc) -> list[str]:
    return [c["name"] for c in pod_containers(spec) if _sc(c).get("allowPrivilegeEscalation") is not False]


def _run_as_non_root(spec: Doc) -> list[str]:
    pod = spec.get("securityContext") or {}
    bad = [] if pod.get("runAsUser") != 0 else ["pod:runAsUser=0"]
    for c in pod_containers(spec):
        sc = _sc(c)
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            bad.append(f"{c['name']}:runAsNonRoot")
        if sc.get("runAsUser") == 0:
            bad.append(f"{c['name']}:runAsUser=0")
    return bad


def _seccomp_restricted(spec: Doc) -> list[str]:
    pod = _seccomp_type(spec.get("securityContext") or {})
    return [c["name"] for c in pod_containers(spec)
            if (_seccomp_type(_sc(c)) or pod) not in {"RuntimeDefault", "Localhost"}]


def _caps_restricted(spec: Doc) -> list[str]:
    bad = []
    for c in pod_containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{c['name']}:drop ALL")
        bad += [f"{c['name']}:{cap}" for cap in caps.get("add", []) if cap != "NET_BIND_SERVICE"]
    return bad


@dataclass(frozen=True)
class Rule:
    level: str  # the least strict level that enforces it
    name: str
    check: Callable[[Doc], list[str]]  # pod spec -> what breaks the rule (empty: admitted)


RULES = (
    Rule("baseline", "host_namespaces", _host_namespaces),
    Rule("baseline", "privileged", _privileged),
    Rule("baseline", "capabilities", _caps_baseline),
    Rule("baseline", "host_path_volumes", _host_path),
    Rule("baseline", "host_ports", _host_ports),
    Rule("baseline", "seccomp", _seccomp_baseline),
    Rule("restricted", "volume_types", _volume_types),
    Rule("restricted", "allow_privilege_escalation", _privilege_escalation),
    Rule("restricted", "run_as_non_root", _run_as_non_root),
    Rule("restricted", "seccomp", _seccomp_restricted),
    Rule("restricted", "capabilities", _caps_restricted),
)


def refusals(spec: Doc, level: str) -> dict[str, list[str]]:
    """What Pod Security at ``level`` refuses in a pod spec: rule name -> offending fields (empty: admitted)."""
    out: dict[str, list[str]] = {}
    for rule in RULES:
        if LEVELS.index(rule.level) <= LEVELS.index(level) and (found := rule.check(spec)):
            out.setdefault(rule.name, []).extend(found)
    return out


def namespace_labels(name: str) -> dict[str, str]:
    labels: dict[str, str] = one("Namespace", name)["metadata"]["labels"]
    return labels


def test_namespace_states_the_level_its_pods_need_and_watches_the_next() -> None:
    labels = namespace_labels("toolcell")
    enforce = labels["pod-security.kubernetes.io/enforce"]
    assert enforce == "privileged"
    for mode in ("warn", "audit"):  # the level above enforce, so what needs more than baseline shows up
        assert labels[f"pod-security.kubernetes.io/{mode}"] == LEVELS[LEVELS.index(enforce) + 1]
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"


@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_pod_is_admitted_at_its_namespace_level_and_refused_at_the_next(file: str) -> None:
    wl = workload(file)
    spec = wl["spec"]["template"]["spec"]
    level = namespace_labels(wl["metadata"]["namespace"])["pod-security.kubernetes.io/enforce"]
    assert refusals(spec, level) == {}
    stricter = refusals(spec, LEVELS[LEVELS.index(level) + 1])
    # hostPath is the one reason these pods need more than baseline (the engine socket, the audit trail).
    assert set(stricter) == {"host_path_volumes"}, stricter
    assert "engine" in stricter["host_path_volumes"] and "audit" in stricter["host_path_volumes"]


@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_without_the_host_paths_and_the_root_step_the_pod_is_restricted(file: str) -> None:
    """What deploy/README.md says: hostPath (and the one root init step) is all that keeps these pods
    from ``restricted``; every long-running container already meets it."""
    spec = copy.deepcopy(workload(file)["spec"]["template"]["spec"])
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "prepare-dirs"]
    spec["volumes"] = [{"name": v["name"], "emptyDir": {}} if "hostPath" in v else v for v in spec["volumes"]]
    assert refusals(spec, "restricted") == {}


def _restricted_pod() -> Doc:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10002, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 9464}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }


def _with(path: str, value: Any) -> Doc:
    """The restricted pod with one field set (``a.b.0.c``; ``None`` deletes it)."""
    pod = _restricted_pod()
    *parents, last = path.split(".")
    node: Any = pod
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    key: int | str = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return pod


# Each rule run both ways: the pod that breaks it is refused at the rule's level, by that rule; the fixed pod
# (the same field set back to a compliant value) passes every rule up to restricted.
PROBES = [
    ("baseline", "host_path_volumes", _with("volumes.0", {"name": "v", "hostPath": {"path": "/run/x"}}),
     _with("volumes.0", {"name": "v", "emptyDir": {}})),
    ("baseline", "host_namespaces", _with("hostNetwork", True), _with("hostNetwork", False)),
    ("baseline", "host_namespaces", _with("hostPID", True), _with("hostPID", False)),
    ("baseline", "host_namespaces", _with("hostIPC", True), _with("hostIPC", False)),
    ("baseline", "privileged", _with("containers.0.securityContext.privileged", True),
     _with("containers.0.securityContext.privileged", False)),
    ("baseline", "capabilities", _with("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
     _with("containers.0.securityContext.capabilities.add", ["NET_BIND_SERVICE"])),
    ("baseline", "host_ports", _with("containers.0.ports.0.hostPort", 9464),
     _with("containers.0.ports.0.hostPort", 0)),
    ("baseline", "seccomp", _with("securityContext.seccompProfile.type", "Unconfined"),
     _with("securityContext.seccompProfile.type", "Localhost")),
    ("restricted", "allow_privilege_escalation", _with("containers.0.securityContext.allowPrivilegeEscalation", None),
     _with("containers.0.securityContext.allowPrivilegeEscalation", False)),
    ("restricted", "run_as_non_root", _with("securityContext.runAsNonRoot", None),
     _with("containers.0.securityContext.runAsNonRoot", True)),
    ("restricted", "run_as_non_root", _with("containers.0.securityContext.runAsUser", 0),
     _with("containers.0.securityContext.runAsUser", 10001)),
    ("restricted", "seccomp", _with("securityContext.seccompProfile", None),
     _with("containers.0.securityContext.seccompProfile", {"type": "RuntimeDefault"})),
    ("restricted", "capabilities", _with("containers.0.securityContext.capabilities.add", ["CHOWN"]),
     _with("containers.0.securityContext.capabilities.drop", ["ALL"])),
    ("restricted", "capabilities", _with("containers.0.securityContext.capabilities.drop", ["NET_RAW"]),
     _with("containers.0.securityContext.capabilities.drop", ["ALL"])),
    ("restricted", "volume_types", _with("volumes.0", {"name": "v", "nfs": {"server": "s", "path": "/"}}),
     _with("volumes.0", {"name": "v", "persistentVolumeClaim": {"claimName": "c"}})),
]


@pytest.mark.parametrize(("level", "rule", "denied", "allowed"), PROBES,
                         ids=[f"{p[0]}-{p[1]}-{i}" for i, p in enumerate(PROBES)])
def test_checker_refuses_the_breaking_pod_and_admits_it_fixed(level: str, rule: str, denied: Doc,
                                                             allowed: Doc) -> None:
    assert rule in refusals(denied, level)
    below = LEVELS[LEVELS.index(level) - 1]
    assert rule not in refusals(denied, below)  # the rule is the level's own, not a lower one's
    assert refusals(allowed, "restricted") == {}


def test_every_rule_has_a_probe() -> None:
    assert {(r.level, r.name) for r in RULES} == {(p[0], p[1]) for p in PROBES}


# --- the pieces fit together ---------------------------------------------------------------------------------

@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_service_account_network_policies_and_metrics_service_select_the_pod(file: str) -> None:
    wl = workload(file)
    spec = wl["spec"]["template"]["spec"]
    labels = wl["spec"]["template"]["metadata"]["labels"]
    assert wl["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sa = one("ServiceAccount", spec["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False

    deny = one("NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}  # every pod, both ways

    service = one("Service", "toolcell-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    svc_port = service["spec"]["ports"][0]
    tc = toolcell_container(spec)
    ports = {p["name"]: p for p in tc["ports"]}
    assert svc_port["targetPort"] in ports and all("hostPort" not in p for p in ports.values())
    metrics_port = ports[svc_port["targetPort"]]["containerPort"]
    listen = configmap_config().telemetry.prometheus_listen
    assert listen == f"0.0.0.0:{metrics_port}"  # the pod IP: kubelet's probes and Prometheus reach it

    allow = one("NetworkPolicy", "toolcell-metrics")
    assert allow["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert allow["spec"]["policyTypes"] == ["Ingress"] and len(allow["spec"]["ingress"]) == 1
    rule = allow["spec"]["ingress"][0]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": svc_port["targetPort"]}]
    assert not any(p["spec"].get("egress") for p in (deny, allow))  # the supervisor sends nothing on the network


@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_probes_are_http_on_the_metrics_port(file: str) -> None:
    tc = toolcell_container(workload(file)["spec"]["template"]["spec"])
    paths = {probe: tc[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Readiness follows SERVING (the engine answers, every image is present); start-up and liveness only ask
    # that the process answers, so a missing image makes the pod unready but never restarts it.
    assert paths == {"startupProbe": "/livez", "readinessProbe": "/healthz", "livenessProbe": "/livez"}
    for probe in paths:
        assert tc[probe]["httpGet"]["port"] == "metrics" and "exec" not in tc[probe]
        assert tc[probe]["timeoutSeconds"] <= tc[probe]["periodSeconds"]


@pytest.mark.parametrize("file", ("sidecar.yaml", "native-sidecar.yaml"))
def test_the_deployment_has_a_disruption_budget_that_lets_a_drain_through(file: str) -> None:
    dep = workload(file)
    pdb = next(d for d in docs(K8S / file) if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1 and dep["spec"]["replicas"] >= 2
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # an unready pod never blocks a drain
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_native_sidecar_is_an_always_restarting_init_container_before_the_mcp_server() -> None:
    spec = workload("native-sidecar.yaml")["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["prepare-dirs", "toolcell"]
    assert spec["initContainers"][1]["restartPolicy"] == "Always"
    assert "restartPolicy" not in spec["initContainers"][0]  # runs once, before the sidecar starts
    assert [c["name"] for c in spec["containers"]] == ["mcp-server"]
    # Otherwise the same pod as sidecar.yaml: the toolcell container moved, nothing else changed.
    plain = workload("sidecar.yaml")["spec"]["template"]["spec"]
    moved = {k: v for k, v in spec["initContainers"][1].items() if k != "restartPolicy"}
    assert moved == toolcell_container(plain)
    assert spec["volumes"] == plain["volumes"] and spec["securityContext"] == plain["securityContext"]


@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_audit_trail_has_a_persistent_volume_of_the_supervisor_alone(file: str) -> None:
    spec = workload(file)["spec"]["template"]["spec"]
    audit = configmap_config().security.audit
    assert audit is not None and audit.keep >= 1 and audit.max_bytes > 0
    directory = str(Path(audit.file).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    tc = toolcell_container(spec)
    mount = next(m for m in tc["volumeMounts"] if m["mountPath"] == directory)
    assert "hostPath" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]]
    assert not mount.get("readOnly")
    if "subPathExpr" in mount:  # one directory per pod: two replicas on a node never share a file (flock)
        assert mount["subPathExpr"] == "$(POD_NAME)"
        env = {e["name"]: e for e in tc["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for other in pod_containers(spec):
        if other["name"] not in {"toolcell", "prepare-dirs"}:
            assert all(m["name"] != mount["name"] for m in other.get("volumeMounts", [])), other["name"]


@pytest.mark.parametrize("file", WORKLOAD_FILES)
def test_prepare_dirs_is_the_one_root_step_and_prepares_what_the_supervisor_checks(file: str) -> None:
    """The supervisor refuses a socket or audit directory that is not its own and private (safepath): an
    emptyDir or a kubelet-made hostPath is root's, so a root init container hands them over, and only that."""
    spec = workload(file)["spec"]["template"]["spec"]
    prep = spec["initContainers"][0]
    assert prep["name"] == "prepare-dirs"
    pod_uid = spec["securityContext"]["runAsUser"]
    roots = [c["name"] for c in pod_containers(spec) if _sc(c).get("runAsUser", pod_uid) == 0]
    assert roots == ["prepare-dirs"]
    sc = _sc(prep)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert prep["command"][:2] == ["/bin/sh", "-c"]
    steps = [step.split() for step in prep["command"][2].split(" && ")]
    assert [step[0] for step in steps] == ["chown", "chmod", "chmod"]  # nothing else runs as root
    pod_sc = spec["securityContext"]
    assert steps[0][1] == f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}"
    tc_mounts = {m["mountPath"]: m for m in toolcell_container(spec)["volumeMounts"]}
    config = configmap_config()
    socket_dir = str(Path(config.server.listen.removeprefix("unix://")).parent)
    assert config.security.audit is not None
    audit_dir = str(Path(config.security.audit.file).parent)
    assert sorted(steps[0][2:]) == sorted([socket_dir, audit_dir])
    assert sorted(step[1:] for step in steps[1:]) == sorted([["0750", socket_dir], ["0700", audit_dir]])
    for directory in (socket_dir, audit_dir):  # the very directories the supervisor mounts
        assert next(m for m in prep["volumeMounts"] if m["mountPath"] == directory) == tc_mounts[directory]
    if any("subPathExpr" in m for m in prep["volumeMounts"]):
        assert {e["name"] for e in prep["env"]} >= {"POD_NAME"}


def test_every_file_is_named_in_the_deploy_readme() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    for path in FILES:
        assert f"kubernetes/{path.name}" in readme, path.name
