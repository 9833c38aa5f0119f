"""``toolcell sbom``: a CycloneDX 1.5 JSON bill of materials of the Python environment and of images.

What is listed, with package URLs (purl) an advisory database can match:

- the Python environment toolcell runs in: every installed distribution (``importlib.metadata``),
  ``pkg:pypi/<name>@<version>``, with its declared licences;
- each image: its Debian packages (``/var/lib/dpkg/status``, ``pkg:deb/debian/<name>@<version>?arch=..``),
  its Python distributions (any ``*.dist-info``, e.g. a stock MCP server's ``/opt/mcp/venv``) and its npm
  packages (``node_modules/**/package.json``, e.g. ``/opt/mcp/app``).

An image is read without running it: ``docker create`` (never started), ``docker export`` streamed through
``tarfile``, only the records above read, each with a size cap (an image may be someone else's code: see
``sbomparse``), then the container is removed. Nothing is pulled: the image must be in the local engine.

The document is flat: every package is a top-level component (scanners such as ``osv-scanner`` read
those), the image a ``container`` component whose ``dependencies`` entry lists its packages, and each
package names where its record was found (``evidence.occurrences``) and its image (property
``toolcell:image``). Built and serialised with ``cyclonedx-python-lib`` (the CycloneDX project's own
library: the spec's field names, enumerations and bom-ref rules, and the schema to validate against).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import subprocess  # nosec B404 - the docker CLI with fixed arguments; the image name is one argv entry
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.component_evidence import ComponentEvidence, Occurrence
from cyclonedx.model.license import License
from cyclonedx.output.json import JsonV1Dot5
from packageurl import PackageURL

from toolcell import __version__
from toolcell.errors import ConfigError
from toolcell.images import BASE_IMAGE, PYTHON_IMAGE
from toolcell.sbomparse import (
    Package,
    is_manifest,
    os_release,
    parse_dpkg_status,
    parse_metadata,
    parse_package_json,
    pypi_name,
)

if TYPE_CHECKING:
    from toolcell.settings import Config as Settings

__all__ = ["ImageContents", "SbomError", "build_bom", "image_present", "images_in_use", "purl", "python_packages",
           "read_image", "render", "scan_tar"]

READ_LIMITS = {"dpkg": 64 * 1024 * 1024, "metadata": 1024 * 1024, "npm": 1024 * 1024, "os-release": 64 * 1024}
MAX_PACKAGES = 50_000  # per image; more is not a real image's package count
PROPERTY_IMAGE = "toolcell:image"
LABEL = "io.toolcell.sbom"  # on the (never started) container an image is exported from


class SbomError(Exception):
    """An image cannot be read (not in the local engine, export failed); the message says which and why."""


@dataclass(frozen=True)
class ImageContents:
    """What was found in one image."""

    reference: str
    image_id: str
    packages: tuple[Package, ...]
    os: Mapping[str, str] = field(default_factory=dict)
    skipped: int = 0  # records over their size cap or past MAX_PACKAGES


def python_packages(distributions: Iterable[importlib.metadata.Distribution] | None = None) -> list[Package]:
    """The distributions installed in this Python environment (or ``distributions``), by name."""
    found: dict[tuple[str, str, str], Package] = {}
    for dist in importlib.metadata.distributions() if distributions is None else distributions:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        location = str(dist.locate_file(""))
        package = parse_metadata(text[:READ_LIMITS["metadata"]], location)
        if package is not None:
            found.setdefault((pypi_name(package.name), package.version, location), package)
    return sorted(found.values(), key=lambda p: (pypi_name(p.name), p.version, p.location))


def scan_tar(stream: IO[bytes]) -> tuple[list[Package], dict[str, str], int]:
    """Packages and os-release of a root filesystem tar read as a stream (``docker export``).

    Returns (packages, os_release, skipped). Only regular files whose path names a package record are
    read, each up to its cap in READ_LIMITS (a bigger one is skipped and counted).
    """
    packages: list[Package] = []
    release: dict[str, dict[str, str]] = {}
    skipped = 0
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            path = member.name.removeprefix("./").lstrip("/")
            kind = is_manifest(path)
            if kind is None or not member.isreg():
                continue
            if member.size > READ_LIMITS[kind] or len(packages) >= MAX_PACKAGES:
                skipped += 1
                continue
            extracted = archive.extractfile(member)
            if extracted is None:
                continue
            text = extracted.read(READ_LIMITS[kind]).decode("utf-8", errors="replace")
            location = "/" + path
            if kind == "dpkg":
                packages.extend(parse_dpkg_status(text, location)[:MAX_PACKAGES - len(packages)])
            elif kind == "os-release":
                release[path] = os_release(text)
            else:
                parsed = parse_metadata(text, location) if kind == "metadata" else parse_package_json(text, location)
                if parsed is not None:
                    packages.append(parsed)
    chosen = release.get("etc/os-release") or release.get("usr/lib/os-release") or {}
    return packages, chosen, skipped


def images_in_use(config: Settings) -> dict[str, list[str]]:
    """Each image the config uses or toolcell ships, with what uses it (``tool text.wordcount``, ``runner``)."""
    used: dict[str, list[str]] = {}
    for tool in sorted(config.tools.values(), key=lambda t: t.name):
        used.setdefault(tool.image, []).append(f"tool {tool.name}")
    for source in sorted(config.sources.values(), key=lambda s: s.name):
        used.setdefault(source.image, []).append(f"server {source.name}")
    if any(p.network for p in config.profiles.values()):
        used.setdefault(config.egress.image, []).append("egress proxy")
    for image in (PYTHON_IMAGE, BASE_IMAGE):
        used.setdefault(image, []).append("runner image")
    return used


def image_present(reference: str, docker: str = "docker") -> bool:
    """Whether the local engine has ``reference`` (never pulled)."""
    if shutil.which(docker) is None or reference.startswith("-"):
        return False
    done = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", reference],  # noqa: S603 # nosec B603
                          capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def _docker(docker: str, args: list[str], what: str) -> str:
    done = subprocess.run([docker, *args], capture_output=True, text=True, timeout=120,  # noqa: S603 # nosec B603
                          check=False)
    if done.returncode != 0:
        raise SbomError(f"{what}: {done.stderr.strip()[:300] or f'docker {args[0]} failed'}")
    return done.stdout


def read_image(reference: str, docker: str = "docker") -> ImageContents:
    """The packages of ``reference`` in the local engine: created (never started), exported, removed."""
    if shutil.which(docker) is None:
        raise ConfigError(f"the docker CLI ({docker!r}) is not installed; it is needed to read {reference!r}")
    if reference.startswith("-"):
        raise SbomError(f"{reference[:80]!r} is not an image reference")
    inspected = json.loads(_docker(docker, ["image", "inspect", "--format", "{{json .Id}}", reference],
                                   f"image {reference!r} is not in the local engine (nothing is pulled)"))
    container = _docker(docker, ["create", "--network", "none", "--label", f"{LABEL}=1", "--entrypoint",
                                 "/nonexistent", reference, "x"],
                        f"cannot create a container of {reference!r}").strip()
    try:
        proc = subprocess.Popen([docker, "export", container], stdout=subprocess.PIPE,  # noqa: S603 # nosec B603
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None  # nosec B101 - PIPE above
        try:
            packages, release, skipped = scan_tar(proc.stdout)
        except tarfile.TarError as exc:
            raise SbomError(f"docker export of {reference!r}: not a readable tar ({exc})") from exc
        finally:
            proc.stdout.close()
            err = proc.stderr.read(4096)
            proc.stderr.close()
            status = proc.wait()
        if status != 0:
            raise SbomError(f"docker export of {reference!r} failed: {err.decode(errors='replace').strip()[:300]}")
    finally:
        with contextlib.suppress(SbomError):
            _docker(docker, ["rm", "-f", container], f"cannot remove container {container[:12]}")
    return ImageContents(reference=reference, image_id=str(inspected), packages=tuple(packages), os=release,
                         skipped=skipped)


# ------------------------------------------------------------------------------------------ the document

def purl(package: Package, os: Mapping[str, str] | None = None) -> PackageURL:
    """The package URL an advisory database matches: pkg:deb/debian/.., pkg:pypi/.., pkg:npm/.."""
    if package.ecosystem == "deb":
        qualifiers = {k: v for k, v in (("arch", package.arch),
                                        ("distro", f"{os.get('ID', 'debian')}-{os['VERSION_ID']}"
                                         if os and os.get("VERSION_ID") else None)) if v}
        return PackageURL(type="deb", namespace=(os or {}).get("ID", "debian") or "debian", name=package.name,
                          version=package.version, qualifiers=qualifiers or None)
    if package.ecosystem == "npm":
        scope, _, name = package.name.rpartition("/")
        return PackageURL(type="npm", namespace=scope or None, name=name, version=package.version)
    return PackageURL(type="pypi", name=pypi_name(package.name), version=package.version)


def _licenses(package: Package) -> list[License]:
    factory = LicenseFactory()
    return [factory.make_from_string(value) for value in package.licenses]


def _component(package: Package, bom_ref: str, image: ImageContents | None) -> Component:
    properties = [Property(name=PROPERTY_IMAGE, value=image.reference)] if image is not None else []
    if package.source:
        properties.append(Property(name="toolcell:deb-source", value=package.source))
    return Component(
        type=ComponentType.LIBRARY,
        name=package.name, version=package.version, bom_ref=bom_ref,
        purl=purl(package, image.os if image is not None else None), licenses=_licenses(package),
        evidence=ComponentEvidence(occurrences=[Occurrence(location=package.location)]) if package.location
        else None,
        properties=properties or None)


def _unique(refs: set[str], ref: str) -> str:
    candidate, n = ref, 1
    while candidate in refs:
        n += 1
        candidate = f"{ref}#{n}"
    refs.add(candidate)
    return candidate


def _split_reference(reference: str) -> tuple[str, str]:
    """``toolcell/python:bookworm`` -> (``toolcell/python``, ``bookworm``); a registry's port is no tag."""
    repository, sep, tag = reference.partition("@")[0].rpartition(":")
    return (repository, tag) if sep and "/" not in tag else (reference.partition("@")[0], "")


def build_bom(python: list[Package] | None, images: Iterable[ImageContents]) -> Bom:
    """The document: toolcell as the described component, the Python environment's packages (if given),
    then each image as a ``container`` component and its packages."""
    refs: set[str] = set()
    root = Component(type=ComponentType.APPLICATION, name="toolcell", version=__version__,
                     bom_ref=_unique(refs, f"toolcell@{__version__}"),
                     purl=PackageURL(type="pypi", name="toolcell", version=__version__))
    bom = Bom(metadata=BomMetaData(component=root))
    uses = []
    for package in python or []:
        if pypi_name(package.name) == "toolcell":
            continue
        component = _component(package, _unique(refs, f"python:{purl(package)}"), None)
        uses.append(component)
        bom.components.add(component)
    for image in images:
        repository, tag = _split_reference(image.reference)
        namespace, _, name = repository.rpartition("/")
        container = Component(
            type=ComponentType.CONTAINER, name=image.reference, version=image.image_id,
            bom_ref=_unique(refs, f"image:{image.reference}"),
            purl=PackageURL(type="docker", namespace=namespace or None, name=name, version=image.image_id,
                            qualifiers={"tag": tag} if tag else None),
            properties=[Property(name="toolcell:os", value=image.os.get("PRETTY_NAME", "unknown"))]
            + ([Property(name="toolcell:skipped-records", value=str(image.skipped))] if image.skipped else []))
        bom.components.add(container)
        uses.append(container)
        members = []
        for package in image.packages:
            component = _component(package, _unique(refs, f"{image.reference}:{purl(package, image.os)}"), image)
            members.append(component)
            bom.components.add(component)
        bom.register_dependency(container, members)
    bom.register_dependency(root, uses)  # what toolcell runs on and runs
    return bom


def render(bom: Bom) -> str:
    """CycloneDX 1.5 JSON, indented."""
    text: str = JsonV1Dot5(bom).output_as_string(indent=2)
    return text

