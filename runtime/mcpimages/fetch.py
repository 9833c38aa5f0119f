"""Fetch a server's packages on the host, into the build context (the image build itself has no network).

- PyPI: ``pip download --only-binary=:all:`` for CPython 3.11 on the image's glibc and architecture, into
  ``<context>/wheels``. Wheels only: no package's build code runs on the host.
- npm: ``npm install --omit=dev --ignore-scripts --save-exact`` into ``<context>/app``: no install
  script runs on the host (a package that needs one to build a native addon will not work).

Failures become ConfigError (the package or version does not exist) or BackendError (the registry is
unreachable, the tool failed) with the last lines of the tool's log.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from toolcell.errors import BackendError, ConfigError
from toolcell.mcpimages.context import (
    PYTHON_TAG,
    PYTHON_VERSION,
    canonical,
    console_scripts,
    file_sha256,
    npm_bins,
    npm_lock_lines,
    platform_tags,
    wheel_project,
)
from toolcell.mcpimages.process import Completed, run_logged
from toolcell.mcpimages.spec import McpPackage

FETCH_TIMEOUT_S: Final = 600.0
_MAX_JSON = 8 << 20
_MAX_ENTRY_POINTS = 1 << 20
_UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not known|"
    r"ENOTFOUND|ECONNREFUSED|ECONNRESET|ETIMEDOUT|EAI_AGAIN|Network is unreachable|Connection refused|"
    r"ConnectTimeout|ReadTimeout",
)
_NO_DIST = re.compile(r"No matching distribution found for ([^\s]{1,200})")


@dataclass(frozen=True)
class Fetched:
    """What the fetch resolved: the exact version, the executables, lines for inputs.txt."""

    version: str
    executables: Mapping[str, str]
    """PyPI: console script names (value ""); npm: bin name -> path inside the package."""
    artifacts: tuple[str, ...]


def pip_download_argv(python: str, package: McpPackage, dest: Path, machine: str) -> list[str]:
    """``pip download`` of ``package`` and its dependencies as wheels for the image's Python and glibc."""
    argv = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", PYTHON_TAG]
    for tag in platform_tags(machine):
        argv += ["--platform", tag]
    return [*argv, "--dest", str(dest), "--", package.requirement]


def npm_install_argv(npm: str, package: McpPackage, prefix: Path) -> list[str]:
    """``npm install`` of ``package`` (production dependencies, no scripts) into ``prefix``."""
    return [npm, "install", "--prefix", str(prefix), "--omit=dev", "--ignore-scripts", "--save-exact",
            "--no-audit", "--no-fund", "--no-update-notifier", "--install-links=false", "--", package.requirement]


def pip_failure(package: McpPackage, done: Completed) -> ConfigError | BackendError:
    """The error for a failed ``pip download``, from its log's tail (pip also says "no matching distribution"
    when the index is unreachable: connection errors are looked for first)."""
    missing = _NO_DIST.search(done.tail)
    if missing is not None and not _UNREACHABLE.search(done.tail):
        wanted = missing.group(1)
        name = re.split(r"[\[<>=!~;]", wanted, maxsplit=1)[0]
        platform = f"CPython {PYTHON_VERSION} on manylinux (glibc <= 2.36)"
        if canonical(name) == canonical(package.name):
            return ConfigError(
                f"PyPI has no wheel of {package.requirement} for {platform}: the package or version does not "
                "exist, or it ships only a source distribution (toolcell installs wheels only)",
                key="images mcp",
            )
        return ConfigError(
            f"{package.requirement} needs {wanted}, which has no wheel for {platform} "
            "(toolcell installs wheels only)",
            key="images mcp",
        )
    return BackendError(_failed("pip download", package, done))


def npm_failure(package: McpPackage, done: Completed) -> ConfigError | BackendError:
    """The error for a failed ``npm install``, from its log's tail."""
    if "ETARGET" in done.tail or "No matching version" in done.tail:
        return ConfigError(f"npm has no version {package.version} of {package.name}", key="images mcp")
    if "E404" in done.tail or "404 Not Found" in done.tail:
        return ConfigError(f"the npm registry has no package {package.name}", key="images mcp")
    return BackendError(_failed("npm install", package, done))


def _failed(what: str, package: McpPackage, done: Completed) -> str:
    if done.timed_out:
        reason = f"{what} of {package.requirement} timed out"
    elif _UNREACHABLE.search(done.tail):
        reason = f"{what} of {package.requirement} failed: the registry is unreachable from this host"
    else:
        reason = f"{what} of {package.requirement} failed (exit {done.status})"
    last = "\n".join(done.tail.splitlines()[-20:])
    return f"{reason}; last lines of its output:\n{last}"


def fetch_pypi(package: McpPackage, wheels: Path, log: Path, *, python: str, machine: str) -> Fetched:
    """Download the wheels into ``wheels``; the version and console scripts come from the package's wheel."""
    wheels.mkdir(parents=True, exist_ok=True)
    done = run_logged(pip_download_argv(python, package, wheels, machine), log, timeout=FETCH_TIMEOUT_S, lines=40)
    if done.status != 0:
        raise pip_failure(package, done)
    files = sorted(p for p in wheels.iterdir() if p.is_file())
    top = [p for p in files if (wheel_project(p.name) or ("", ""))[0] == canonical(package.name)]
    if len(top) != 1:
        raise BackendError(f"pip download of {package.requirement} left {len(top)} wheels of the package itself")
    version = (wheel_project(top[0].name) or ("", ""))[1]
    scripts = console_scripts(_entry_points(top[0]))
    artifacts = tuple(f"wheel {file_sha256(p)} {p.name}" for p in files)
    return Fetched(version=version, executables=dict.fromkeys(scripts, ""), artifacts=artifacts)


def _entry_points(wheel: Path) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                parts = PurePosixPath(info.filename).parts
                if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "entry_points.txt":
                    if info.file_size > _MAX_ENTRY_POINTS:
                        return ""
                    return archive.read(info).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile) as exc:
        raise BackendError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    return ""


def fetch_npm(package: McpPackage, app: Path, log: Path, *, npm: str) -> Fetched:
    """``npm install`` into ``app``; the version and bins come from the installed package.json."""
    app.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    done = run_logged(npm_install_argv(npm, package, app), log, timeout=FETCH_TIMEOUT_S, cwd=app, env=env, lines=40)
    if done.status != 0:
        raise npm_failure(package, done)
    manifest = _read_json(app / "node_modules" / package.name / "package.json")
    version = manifest.get("version")
    if not isinstance(version, str):
        raise BackendError(f"npm installed {package.name} without a version in its package.json")
    if package.version is not None and version != package.version:
        raise BackendError(f"npm installed {package.name}@{version[:40]}, not {package.version}")
    lock = _read_json(app / "package-lock.json")
    artifacts = (f"npm-lock {file_sha256(app / 'package-lock.json')} package-lock.json", *npm_lock_lines(lock))
    return Fetched(version=version, executables=npm_bins(manifest), artifacts=artifacts)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_JSON:
            raise BackendError(f"{path} is larger than {_MAX_JSON} bytes")
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path} is missing or not JSON after the install: {exc}") from exc
    if not isinstance(value, dict):
        raise BackendError(f"{path} is not a JSON object")
    return value
