"""Config validation: an invalid config is refused, and the error names the key."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolcell.errors import ConfigError
from toolcell.settings import load_config, parse_config, parse_duration, parse_size

BASE: dict[str, Any] = {
    "version": 1,
    "profiles": {"default": {"memory": "128Mi", "timeout": "5s"}, "small": {"extends": "default", "pids": 16}},
    "tools": [{"name": "echo", "description": "d", "image": "img", "command": ["cat"], "profile": "small"}],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node: Any = doc
    keys = path.split("/")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "key", "fragment"),
    [
        ("version", 2, "version", "1 was expected"),
        ("profiles/default/memory", "lots", "profiles.default.memory", "is not valid"),
        ("profiles/default/memory", "1Mi", "profiles.default.memory", "at least 6Mi"),
        ("profiles/default/timeout", "soon", "profiles.default.timeout", "is not valid"),
        ("profiles/default/runtime", "kata", "profiles.default.runtime", "is not one of"),
        ("profiles/default/user", "0", "profiles.default.user", "does not match"),
        ("profiles/default/network", "bridge", "profiles.default.network", "does not match '^none$'"),
        ("profiles/default/network", [{"host": "a.test", "ports": [0]}], "profiles.default.network.0.ports.0",
         "less than the minimum"),
        ("profiles/default/network", ["10.0.0.1"], "profiles.default.network[0]", "not IP addresses"),
        ("profiles/default/network", ["*.test"], "profiles.default.network[0]", "at least two labels"),
        ("profiles/default/network", ["a.*.test"], "profiles.default.network[0]", "not a host name"),
        ("egress", {"subnet_pool": "10.0.0.0/30"}, "egress.subnet_pool", "/29 or larger"),
        ("egress", {"proxy": "squid"}, "egress", "Additional properties are not allowed"),
        ("profiles/default/cpu", 1, "profiles.default", "Additional properties"),
        ("profiles/default/mounts", [{"source": "/nonexistent-x", "target": "/x"}],
         "profiles.default.mounts[0].source", "does not exist"),
        ("profiles/default/mounts", [{"source": "/etc", "target": "/x", "read_only": False}],
         "profiles.default.mounts.0.read_only", "True was expected"),
        ("profiles/small/extends", "nope", "profiles.small.extends", "unknown profile"),
        ("profiles/default/seccomp", "/nonexistent/profile.json", "profiles.default.seccomp", ""),
        ("tools/0/profile", "nope", "tools[0].profile", "unknown profile"),
        ("tools/0/image", KeyError, "tools.0", "'image' is a required property"),
        ("tools/0/command", [], "tools.0.command", "should be non-empty"),
        ("tools/0/name", "has space", "tools.0.name", "does not match"),
        ("tools/0/input_schema", {"type": "array"}, "tools[0].input_schema", "must describe an object"),
        ("server", {"socket_mode": "999"}, "server.socket_mode", "does not match"),
    ],
)
def test_invalid_config_names_the_key(path: str, value: Any, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value))
    assert info.value.key == key, str(info.value)
    assert fragment in str(info.value)


def test_duplicate_tool_names_rejected() -> None:
    doc = copy.deepcopy(BASE)
    doc["tools"].append(dict(doc["tools"][0]))
    with pytest.raises(ConfigError, match="duplicate tool name") as info:
        parse_config(doc)
    assert info.value.key == "tools[1].name"


def test_inheritance_and_units() -> None:
    config = parse_config(BASE)
    small = config.profiles["small"]
    assert small.memory_bytes == 128 * 1024 * 1024 and small.timeout_s == 5.0 and small.pids_limit == 16
    assert config.tools["echo"].profile == "small"


@pytest.mark.parametrize(("text", "value"), [("256Mi", 256 * 2**20), ("1G", 10**9), ("64k", 64000), (512, 512),
                                             ("1.5Gi", int(1.5 * 2**30))])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text, "k") == value


@pytest.mark.parametrize(("text", "value"), [("30s", 30.0), ("250ms", 0.25), ("2m", 120.0), (1.5, 1.5)])
def test_parse_duration(text: str | float, value: float) -> None:
    assert parse_duration(text, "k") == value


def test_builtin_default_config_is_valid() -> None:
    config = load_config(None)
    assert {"text.wordcount", "python.run"} <= set(config.tools)
    assert config.server.listen.startswith("unix://") and config.server.socket_mode == 0o600


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntools: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_config(good).source == str(good)


@pytest.mark.parametrize(("doc_engine", "environ", "kind"), [
    ({}, {}, "docker"),
    ({"kind": "oci"}, {}, "oci"),
    ({"kind": "docker"}, {"TOOLCELL_ENGINE": "oci"}, "oci"),
])
def test_engine_kind_from_the_config_or_the_environment(doc_engine: dict[str, Any], environ: dict[str, str],
                                                        kind: str) -> None:
    doc = {"version": 1, "engine": doc_engine, "tools": []}
    assert parse_config(doc, environ=environ).engine.kind == kind


@pytest.mark.parametrize(("doc_engine", "environ"), [({"kind": "podman"}, {}), ({}, {"TOOLCELL_ENGINE": "lxc"})])
def test_an_unknown_engine_kind_is_refused_naming_the_key(doc_engine: dict[str, Any], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"version": 1, "engine": doc_engine, "tools": []}, environ=environ)
    assert err.value.key in ("engine.kind", "engine")
