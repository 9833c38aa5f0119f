"""Profile keys that shape the sandbox's writable paths and task limit, parsed from a config document."""

from __future__ import annotations

from typing import Any

import pytest

from toolcell.errors import ConfigError
from toolcell.model import Tool
from toolcell.policy.spec import Scratch, compile_spec, min_pids
from toolcell.settings import parse_config


def config(**profile: Any) -> dict[str, Any]:
    return {"version": 1, "profiles": {"default": {"memory": "128Mi", **profile}},
            "tools": [{"name": "t", "description": "d", "image": "img", "command": ["cat"]}]}


def shm_of(doc: dict[str, Any]) -> Scratch | None:
    cfg = parse_config(doc)
    spec = compile_spec(Tool(name="t", description="d", image="img", command=("cat",)), cfg.profiles["default"],
                        invocation_id="i", owner="o", seccomp_json="{}", environ={})
    return next((s for s in spec.scratch if s.path == "/dev/shm"), None)


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({}, None),  # no shm key: no /dev/shm
        ({"shm": "16Mi"}, Scratch("/dev/shm", 16 * 1024 * 1024, 0o1777)),
        ({"shm": 0}, None),
    ],
)
def test_shm_key(profile: dict[str, Any], expected: Scratch | None) -> None:
    assert shm_of(config(**profile)) == expected


@pytest.mark.parametrize(
    ("runtime", "pids", "accepted"),
    [
        ("runc", 2, False),  # measured: tini's fork of the launcher or the tool fails
        ("runc", 3, True),
        ("runsc", 3, False),  # measured: the launcher's relay thread cannot start
        ("runsc", 4, True),
        ("runsc", 64, True),
    ],
)
def test_a_pids_limit_the_sandbox_itself_would_exhaust_is_refused(runtime: str, pids: int, accepted: bool) -> None:
    doc = config(runtime=runtime, pids=pids)
    if accepted:
        assert parse_config(doc).profiles["default"].pids_limit == pids
        return
    with pytest.raises(ConfigError, match=f"at least {min_pids(runtime)} under {runtime}") as caught:
        parse_config(doc)
    assert caught.value.key == "profiles.default.pids"
