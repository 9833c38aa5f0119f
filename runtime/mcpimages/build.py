"""Build ``toolcell/mcp-<name>:<version>`` (+ ``:latest``) from a request: fetch on the host, ``docker build``
with no network, skip what is up to date.

Two skips, both by label (as ``images/build.sh`` does):

- ``io.toolcell.mcp-request``: a hash of what is known before fetching (package and exact version, name,
  command, recipe, base image, node binary). When the version is pinned and the image carries this hash,
  nothing is fetched: a re-run of set-up needs no network and takes well under a second.
- ``io.toolcell.inputs-hash``: a hash of the whole build context (every wheel / the npm tree, the node
  binary, the Dockerfile, inputs.txt) and the base image. After a fetch, an image carrying it is not rebuilt.

The ``docker`` CLI does the work (subprocess, argv lists), with the classic builder, which resolves
``FROM`` in the local image store and never contacts a registry.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess  # nosec B404 - the docker CLI, argv lists, no shell
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from toolcell.errors import BackendError, ConfigError
from toolcell.images import INPUTS_HASH_LABEL
from toolcell.mcpimages.context import (
    BASE_IMAGE,
    BIN_DIR,
    choose_command,
    context_hash,
    file_sha256,
    inputs_text,
    node_wrapper,
    npm_dockerfile,
    pypi_dockerfile,
    request_hash,
)
from toolcell.mcpimages.fetch import Fetched, fetch_npm, fetch_pypi
from toolcell.mcpimages.process import run_logged
from toolcell.mcpimages.spec import McpImageRequest, McpPackage, version_tag

REQUEST_LABEL: Final = "io.toolcell.mcp-request"
PACKAGE_LABEL: Final = "io.toolcell.mcp.package"
COMMAND_LABEL: Final = "io.toolcell.mcp.command"
STAGE_LABEL: Final = "io.toolcell.mcp-stage"
BUILD_TIMEOUT_S: Final = 1200.0
_INSPECT_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True)
class McpImage:
    """A built (or already current) server image."""

    image: str
    latest: str
    package: McpPackage
    command: str
    size: int
    state: str
    """"built" or "up-to-date"."""
    seconds: float


@dataclass(frozen=True)
class HostTools:
    """The host programs a build uses; ``discover()`` finds them."""

    docker: str
    python: str = sys.executable
    npm: str | None = None
    node: str | None = None
    machine: str = field(default_factory=platform.machine)

    @classmethod
    def discover(cls) -> HostTools:
        docker = shutil.which("docker")
        if docker is None:
            raise ConfigError("the docker CLI is not installed; run scripts/setup.sh first", key="images mcp")
        node = shutil.which("node")
        return cls(docker=docker, npm=shutil.which("npm"), node=os.path.realpath(node) if node else None)


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def build_image(request: McpImageRequest, tools: HostTools, *, force: bool = False, log: Log = _quiet) -> McpImage:
    """Fetch, build and tag ``request``; skip by label unless ``force``. Raises ConfigError/BackendError."""
    started = time.monotonic()
    base_hash = _base_hash(tools.docker)
    node_hash = _node_hash(request, tools)
    if request.package.version is not None and not force:
        reference = f"{request.repository}:{version_tag(request.package.version)}"
        labels = _labels(_inspect(tools.docker, reference))
        if labels.get(REQUEST_LABEL) == request_hash(request, base_hash, node_hash) and labels.get(COMMAND_LABEL):
            _tag(tools.docker, reference, f"{request.repository}:latest")
            return _result(tools.docker, request, request.package.version, labels[COMMAND_LABEL], "up-to-date",
                           started)
    with tempfile.TemporaryDirectory(prefix="toolcell-mcp-") as work:
        context = Path(work) / "context"
        context.mkdir()
        log(f"fetching {request.package} on the host ...")
        fetched, command = _prepare(request, tools, context, Path(work) / "fetch.log", base_hash)
        pinned = McpImageRequest(request.package.pinned(fetched.version), request.name, request.command)
        reference = f"{request.repository}:{version_tag(fetched.version)}"
        inputs = context_hash(context, base_hash)
        existing = _inspect(tools.docker, reference)
        if not force and _labels(existing).get(INPUTS_HASH_LABEL) == inputs:
            _tag(tools.docker, reference, f"{request.repository}:latest")
            return _result(tools.docker, request, fetched.version, command, "up-to-date", started)
        log(f"docker build {reference} (--network none) ...")
        _docker_build(tools.docker, context, Path(work) / "build.log", reference, {
            INPUTS_HASH_LABEL: inputs,
            REQUEST_LABEL: request_hash(pinned, base_hash, node_hash),
            PACKAGE_LABEL: str(pinned.package),
            COMMAND_LABEL: command,
            "org.opencontainers.image.title": f"toolcell-mcp-{request.name}",
            "org.opencontainers.image.version": fetched.version,
        })
    _tag(tools.docker, reference, f"{request.repository}:latest")
    if existing is not None:
        _remove_if_untagged(tools.docker, str(existing.get("Id", "")))
    return _result(tools.docker, request, fetched.version, command, "built", started)


def _base_hash(docker: str) -> str:
    """The base image's inputs-hash label (its id when unlabelled); ConfigError when it is missing."""
    base = _inspect(docker, BASE_IMAGE)
    if base is None:
        raise ConfigError(f"the base image {BASE_IMAGE} is missing: build it first (`toolcell images build`, "
                          "or scripts/setup.sh)", key="images mcp")
    return _labels(base).get(INPUTS_HASH_LABEL) or str(base.get("Id", ""))


def _node_hash(request: McpImageRequest, tools: HostTools) -> str:
    """npm: the sha256 of the node binary that goes into the image; "" for PyPI."""
    if request.package.source != "npm":
        return ""
    if tools.npm is None or tools.node is None:
        raise ConfigError("building an npm server image needs node and npm on this host (not found on PATH)",
                          key="images mcp")
    return file_sha256(Path(tools.node))


def _prepare(request: McpImageRequest, tools: HostTools, context: Path, log: Path,
             base_hash: str) -> tuple[Fetched, str]:
    """Fill ``context``; returns what was fetched and the command path."""
    package = request.package
    if package.source == "pypi":
        fetched = fetch_pypi(package, context / "wheels", log, python=tools.python, machine=tools.machine)
    else:
        assert tools.npm is not None and tools.node is not None  # nosec B101 - checked by build_image
        fetched = fetch_npm(package, context / "app", log, npm=tools.npm)
    try:
        executable = choose_command(fetched.executables, package, request.command)
    except ValueError as exc:
        raise ConfigError(str(exc), key="images mcp") from exc
    command = f"{BIN_DIR}/{executable}"
    if package.source == "pypi":
        dockerfile = pypi_dockerfile(request, fetched.version, fetched.executables, executable)
    else:
        assert tools.node is not None  # nosec B101 - checked by build_image
        bins = context / "bin"
        bins.mkdir()
        for name, path in fetched.executables.items():
            wrapper = bins / name
            wrapper.write_text(node_wrapper(package.name, path))
            wrapper.chmod(0o755)
        shutil.copyfile(tools.node, context / "node")
        (context / "node").chmod(0o755)
        dockerfile = npm_dockerfile(request, fetched.version, executable)
        fetched = Fetched(fetched.version, fetched.executables,
                          (f"node {file_sha256(context / 'node')} {_node_version(tools.node)}", *fetched.artifacts))
    (context / "Dockerfile").write_text(dockerfile)
    (context / "inputs.txt").write_text(inputs_text(request, fetched.version, executable, base_hash, fetched.artifacts))
    return fetched, command


def _node_version(node: str) -> str:
    try:
        done = subprocess.run([node, "--version"], capture_output=True, timeout=30, check=False)  # noqa: S603 # nosec B603
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"the host's node ({node}) does not run: {exc}", key="images mcp") from exc
    version = done.stdout.decode(errors="replace").strip()[:40]
    if done.returncode != 0 or not version.startswith("v"):
        raise ConfigError(f"the host's node ({node}) does not run", key="images mcp")
    return version


def docker_build_argv(docker: str, context: Path, reference: str, stage: str, labels: Mapping[str, str]) -> list[str]:
    """The classic-builder ``docker build`` with no network; ``stage`` labels the first stage's images."""
    argv = [docker, "build", "--network=none", "--rm", "--force-rm", "--pull=false",
            "--build-arg", f"TOOLCELL_STAGE={stage}"]
    for key, value in sorted(labels.items()):
        argv += ["--label", f"{key}={value}"]
    return [*argv, "--tag", reference, str(context)]


def _docker_build(docker: str, context: Path, log: Path, reference: str, labels: Mapping[str, str]) -> None:
    """Build, then remove the first stage's images (found by a label unique to this build)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    stage = uuid.uuid4().hex
    try:
        done = run_logged(docker_build_argv(docker, context, reference, stage, labels), log, timeout=BUILD_TIMEOUT_S,
                          env=env)
    finally:
        _remove_stage(docker, stage)
    if done.timed_out:
        raise BackendError(f"docker build {reference} timed out after {BUILD_TIMEOUT_S:.0f} s; last lines:\n"
                           f"{done.tail}")
    if done.status != 0:
        raise BackendError(f"docker build {reference} failed (exit {done.status}); last lines of its log:\n"
                           f"{done.tail}")


def _remove_stage(docker: str, stage: str) -> None:
    """Remove the first stage's images of build ``stage`` (wheels, the unfixed venv): nothing else uses them."""
    try:
        listed = subprocess.run(  # noqa: S603  # nosec B603 - fixed argv
            [docker, "image", "ls", "--quiet", "--no-trunc", "--filter", f"label={STAGE_LABEL}={stage}"],
            capture_output=True, timeout=_INSPECT_TIMEOUT_S, check=False)
        ids = sorted(set(listed.stdout.decode(errors="replace").split()))
        if listed.returncode == 0 and ids:
            subprocess.run([docker, "image", "rm", *ids], capture_output=True,  # noqa: S603  # nosec B603
                           timeout=_INSPECT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return  # left for `docker image prune` (images/build.sh runs one)


def _remove_if_untagged(docker: str, image_id: str) -> None:
    """The image a rebuild replaced, unless something still tags or uses it."""
    inspected = _inspect(docker, image_id) if image_id.startswith("sha256:") else None
    if inspected is None or inspected.get("RepoTags"):
        return
    try:
        subprocess.run([docker, "image", "rm", image_id], capture_output=True,  # noqa: S603  # nosec B603
                       timeout=_INSPECT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return


def _inspect(docker: str, reference: str) -> dict[str, Any] | None:
    """``docker image inspect`` of ``reference`` as a dict; None when the image is not there."""
    try:
        done = subprocess.run(  # noqa: S603  # nosec B603 - fixed argv
            [docker, "image", "inspect", "--format", "{{json .}}", reference],
            capture_output=True, timeout=_INSPECT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"docker image inspect {reference} failed: {exc}") from exc
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").lower()
        if "no such image" in err or "no such object" in err:
            return None
        raise BackendError(f"docker image inspect {reference} failed: {err.strip()[-500:]}")
    try:
        value = json.loads(done.stdout)
    except ValueError as exc:
        raise BackendError(f"docker image inspect {reference}: unexpected output") from exc
    return value if isinstance(value, dict) else None


def _labels(inspected: Mapping[str, Any] | None) -> dict[str, str]:
    if not inspected:
        return {}
    labels = (inspected.get("Config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _tag(docker: str, source: str, target: str) -> None:
    try:
        done = subprocess.run([docker, "tag", source, target], capture_output=True,  # noqa: S603 # nosec B603
                              timeout=_INSPECT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"docker tag {source} {target} failed: {exc}") from exc
    if done.returncode != 0:
        raise BackendError(f"docker tag {source} {target} failed: {done.stderr.decode(errors='replace')[-500:]}")


def _result(docker: str, request: McpImageRequest, version: str, command: str, state: str,
            started: float) -> McpImage:
    reference = f"{request.repository}:{version_tag(version)}"
    inspected = _inspect(docker, reference) or {}
    return McpImage(image=reference, latest=f"{request.repository}:latest",
                    package=request.package.pinned(version), command=command,
                    size=int(inspected.get("Size") or 0), state=state, seconds=time.monotonic() - started)
