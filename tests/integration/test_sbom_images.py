"""``toolcell sbom`` against real images in the local engine: what each image holds, by package URL.

Needs the engine and the images ``scripts/setup.sh`` builds; FAILS (never skips) without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import engine
from toolcell.sbom import LABEL, PROPERTY_IMAGE

pytestmark = pytest.mark.docker
PYTHON_IMAGE, TIME_IMAGE = "toolcell/python:bookworm", "toolcell/mcp-time:latest"


def test_sbom_of_the_runner_and_a_stock_server_image(tmp_path: Path) -> None:
    client = engine()
    try:  # the version the stock server image was built with, from its own label
        built = client.images.get(TIME_IMAGE).labels["org.opencontainers.image.version"]
    except Exception as exc:
        pytest.fail(f"{TIME_IMAGE} is required (scripts/setup.sh builds it): {exc}")
    out = tmp_path / "sbom.cdx.json"
    done = subprocess.run([sys.executable, "-m", "toolcell", "sbom", "--image", PYTHON_IMAGE, "--image", TIME_IMAGE,
                           "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"

    def of(image: str) -> dict[str, dict[str, object]]:
        return {str(c["purl"]).split("@")[0]: c for c in doc["components"]
                if {"name": PROPERTY_IMAGE, "value": image} in c.get("properties", [])}

    runner, server = of(PYTHON_IMAGE), of(TIME_IMAGE)
    python3 = runner["pkg:deb/debian/python3"]
    assert str(python3["version"]).startswith("3.") and "distro=debian-12" in str(python3["purl"])
    assert server["pkg:pypi/mcp-server-time"]["version"] == built
    assert "pkg:pypi/mcp" in server and "pkg:deb/debian/python3" in server  # its venv and its base
    assert not [k for k in runner if k.startswith("pkg:pypi/")]  # the runner has no pip-installed packages
    containers = {c["name"] for c in doc["components"] if c["type"] == "container"}
    assert containers == {PYTHON_IMAGE, TIME_IMAGE}
    assert not any(c["purl"].startswith("pkg:pypi/grpcio@") for c in doc["components"])  # no --python: no env
    left = client.containers.list(all=True, filters={"label": LABEL})
    assert left == [], "sbom left containers behind"


def test_sbom_of_an_image_not_in_the_engine_is_refused() -> None:
    engine()
    done = subprocess.run([sys.executable, "-m", "toolcell", "sbom", "--image", "toolcell/absent:never"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 3 and "not in the local engine" in done.stderr and done.stdout == ""


def test_sbom_lists_the_npm_packages_of_a_node_server_image(tmp_path: Path) -> None:
    client = engine()
    image = "toolcell/mcp-everything:latest"
    try:
        built = client.images.get(image).labels["org.opencontainers.image.version"]
    except Exception as exc:
        pytest.fail(f"{image} is required (scripts/setup.sh builds it): {exc}")
    done = subprocess.run([sys.executable, "-m", "toolcell", "sbom", "--image", image], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    purls = {c["purl"] for c in json.loads(done.stdout)["components"]}
    assert f"pkg:npm/%40modelcontextprotocol/server-everything@{built}" in purls
    assert any(p.startswith("pkg:npm/%40modelcontextprotocol/sdk@") for p in purls)
