"""What the admin asks for: a package on PyPI or npm, the image's short name, the command to report.

Everything here is pure and strict: a package spec is refused unless it is a plain registry name with at
most an exact version (no URLs, paths, options, markers or ranges), because the spec reaches ``pip``,
``npm`` and a generated Dockerfile. Messages quote the refused text through ``toolcell.quoting``.

    parse_package("pypi", "mcp-server-time==2026.10.19")
        -> McpPackage(source="pypi", name="mcp-server-time", version="2026.10.19", extras=())
    parse_package("npm", "@modelcontextprotocol/server-everything@2026.8.31")
        -> McpPackage(source="npm", name="@modelcontextprotocol/server-everything", version="2026.8.31")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from toolcell.errors import ConfigError
from toolcell.quoting import quote

Source = Literal["pypi", "npm"]
SOURCES: Final[tuple[Source, ...]] = ("pypi", "npm")

IMAGE_PREFIX: Final = "toolcell/mcp-"
"""Every MCP server image is ``toolcell/mcp-<name>:<version>`` plus ``:latest``."""

_KEY: Final = "images mcp"
_PYPI_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
# PEP 440 public versions (epoch, release, pre, post, dev) and a local label; normalized or not.
_PYPI_VERSION = re.compile(
    r"(?:[0-9]{1,9}!)?[0-9]{1,20}(?:\.[0-9]{1,20}){0,9}"
    r"(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]{0,20})?"
    r"(?:[-_.]?(?:post|rev|r)[-_.]?[0-9]{0,20})?"
    r"(?:[-_.]?dev[-_.]?[0-9]{0,20})?"
    r"(?:\+[A-Za-z0-9]{1,30}(?:[-_.][A-Za-z0-9]{1,30}){0,9})?"
)
_PYPI_SPEC = re.compile(
    rf"(?P<name>{_PYPI_NAME.pattern})(?:\[(?P<extras>[A-Za-z0-9._,-]{{1,200}})\])?(?:==(?P<version>[^=]+))?"
)
_NPM_PART = r"[a-z0-9][a-z0-9._~-]{0,100}"
_NPM_SPEC = re.compile(rf"(?P<name>(?:@{_NPM_PART}/)?{_NPM_PART})(?:@(?P<version>.+))?")
_SEMVER = re.compile(
    r"(?:0|[1-9][0-9]{0,9})\.(?:0|[1-9][0-9]{0,9})\.(?:0|[1-9][0-9]{0,9})"
    r"(?:-[0-9A-Za-z-]{1,40}(?:\.[0-9A-Za-z-]{1,40}){0,9})?(?:\+[0-9A-Za-z-]{1,40}(?:\.[0-9A-Za-z-]{1,40}){0,9})?"
)
_IMAGE_NAME = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
_IMAGE_NAME_MAX: Final = 32
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_EXECUTABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_AFFIXES: Final = ("mcp-server-", "server-", "mcp-")
_NAME_SUFFIXES: Final = ("-mcp-server", "-server", "-mcp")


@dataclass(frozen=True)
class McpPackage:
    """One package in one registry, at an exact version or (``version is None``) the newest."""

    source: Source
    name: str
    version: str | None = None
    extras: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """The spec as pip or npm takes it: ``name[extras]==version`` / ``@scope/name@version``."""
        if self.source == "npm":
            return f"{self.name}@{self.version}" if self.version else self.name
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras}=={self.version}" if self.version else f"{self.name}{extras}"

    def pinned(self, version: str) -> McpPackage:
        """The same package at ``version`` (what the fetch resolved)."""
        return McpPackage(self.source, self.name, version, self.extras)

    def __str__(self) -> str:
        return f"{self.source} {self.requirement}"


@dataclass(frozen=True)
class McpImageRequest:
    """Build ``toolcell/mcp-<name>`` from ``package``; ``command`` picks the executable to report."""

    package: McpPackage
    name: str
    command: str | None = None

    @property
    def repository(self) -> str:
        return f"{IMAGE_PREFIX}{self.name}"


def _refuse(source: str, spec: str, expected: str) -> ConfigError:
    return ConfigError(f"invalid {source} package spec {quote(spec)}: expected {expected}", key=_KEY)


def parse_package(source: str, spec: str) -> McpPackage:
    """``spec`` as a package of ``source`` ("pypi" or "npm"); ConfigError saying what is accepted."""
    if source == "pypi":
        return _parse_pypi(spec)
    if source == "npm":
        return _parse_npm(spec)
    raise ConfigError(f"unknown package source {quote(source)}: expected one of {', '.join(SOURCES)}", key=_KEY)


def _parse_pypi(spec: str) -> McpPackage:
    expected = "NAME, NAME==VERSION or NAME[EXTRA,...]==VERSION (e.g. mcp-server-time==2026.10.19)"
    if len(spec) > 300:
        raise _refuse("PyPI", spec, expected)
    m = _PYPI_SPEC.fullmatch(spec)
    if m is None:
        raise _refuse("PyPI", spec, expected)
    extras: tuple[str, ...] = ()
    if m["extras"] is not None:
        extras = tuple(m["extras"].split(","))
        if not all(_PYPI_NAME.fullmatch(extra) for extra in extras):
            raise _refuse("PyPI", spec, expected)
    version = m["version"]
    if version is not None and not _PYPI_VERSION.fullmatch(version):
        raise _refuse("PyPI", spec, "an exact version after '==' (PEP 440, e.g. 1.2.3); ranges are not accepted")
    return McpPackage("pypi", m["name"], version, extras)


def _parse_npm(spec: str) -> McpPackage:
    expected = "NAME, @SCOPE/NAME or either with @VERSION (e.g. @modelcontextprotocol/server-everything@2026.8.31)"
    if len(spec) > 300:
        raise _refuse("npm", spec, expected)
    m = _NPM_SPEC.fullmatch(spec)
    if m is None:
        raise _refuse("npm", spec, expected)
    version = m["version"]
    if version is not None and not _SEMVER.fullmatch(version):
        raise _refuse("npm", spec, "an exact version after '@' (semver, e.g. 1.2.3); ranges and tags are not accepted")
    return McpPackage("npm", m["name"], version)


def default_name(package: McpPackage) -> str:
    """The image's short name from the package: ``mcp-server-time`` -> ``time``, ``@x/server-everything``
    -> ``everything``; ConfigError when nothing usable is left (give ``--name``)."""
    base = package.name.split("/")[-1].lower()
    base = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    for prefix in _NAME_AFFIXES:
        if base.startswith(prefix) and len(base) > len(prefix):
            base = base[len(prefix):]
            break
    for suffix in _NAME_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return check_name(base[:_IMAGE_NAME_MAX].strip("-"))


def check_name(name: str) -> str:
    """``name`` when it is a valid short image name (``[a-z0-9]`` words joined by ``-``/``_``, <= 32)."""
    if len(name) > _IMAGE_NAME_MAX or not _IMAGE_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid image name {quote(name)}: lowercase letters and digits, words joined by '-' or '_', "
            f"at most {_IMAGE_NAME_MAX} characters (the image becomes {IMAGE_PREFIX}<name>)",
            key=_KEY,
        )
    return name


def check_executable(name: str, what: str = "command") -> str:
    """``name`` when it is a plain executable name (no path, no shell characters)."""
    if not _EXECUTABLE.fullmatch(name):
        raise ConfigError(f"invalid {what} {quote(name)}: a plain executable name such as mcp-server-time",
                          key=_KEY)
    return name


def is_executable_name(name: str) -> bool:
    return _EXECUTABLE.fullmatch(name) is not None


def version_tag(version: str) -> str:
    """The Docker tag for a package version (``+`` of a local/build label becomes ``_``)."""
    tag = version.replace("+", "_")
    if not _TAG.fullmatch(tag):
        raise ConfigError(f"version {quote(version)} can't be an image tag", key=_KEY)
    return tag


def request(source: str, spec: str, name: str | None = None, command: str | None = None) -> McpImageRequest:
    """The whole request, checked: package, short name (default from the package), command."""
    package = parse_package(source, spec)
    return McpImageRequest(
        package=package,
        name=check_name(name) if name is not None else default_name(package),
        command=check_executable(command) if command is not None else None,
    )


def parse_server_list(text: str, origin: str = "servers list") -> tuple[McpImageRequest, ...]:
    """Lines ``SOURCE SPEC [NAME [COMMAND]]``; ``#`` starts a comment. ConfigError names the line."""
    requests: list[McpImageRequest] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2 or len(fields) > 4:
            raise ConfigError(f"{origin} line {number}: expected SOURCE SPEC [NAME [COMMAND]]", key=_KEY)
        try:
            requests.append(request(*fields))
        except ConfigError as exc:
            raise ConfigError(f"{origin} line {number}: {exc}") from exc
    names = [r.name for r in requests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{origin}: image name(s) listed twice: {', '.join(duplicates)}", key=_KEY)
    return tuple(requests)
