"""SBOM parsers (dpkg status, METADATA, package.json), the image tar scan, package URLs and the document."""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from toolcell.sbom import ImageContents, build_bom, purl, python_packages, render, scan_tar
from toolcell.sbomparse import (
    MAX_FIELD,
    Package,
    is_manifest,
    os_release,
    parse_dpkg_status,
    parse_metadata,
    parse_package_json,
)

DPKG = """\
Package: python3
Status: install ok installed
Priority: optional
Architecture: amd64
Source: python3-defaults (3.11.2-1)
Version: 3.11.2-1+b1
Description: interactive high-level object-oriented language (default version)
 Python, the high-level, interactive object oriented language,
 includes an extensive class library.

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc
Version: 2.36-9+deb12u4

Package: no-version
Status: install ok installed

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
"""


@pytest.mark.parametrize(("text", "expected"), [
    (DPKG, [("python3", "3.11.2-1+b1", "amd64", "python3-defaults"), ("libc6", "2.36-9+deb12u4", "amd64", "glibc"),
            ("tzdata", "2024a-0+deb12u1", "all", None)]),
    (DPKG.replace("\n", "\r\n"), [("python3", "3.11.2-1+b1", "amd64", "python3-defaults"),
                                  ("libc6", "2.36-9+deb12u4", "amd64", "glibc"),
                                  ("tzdata", "2024a-0+deb12u1", "all", None)]),
    ("Package: a\nStatus: install ok installed\nVersion: 1\nSource: a\n", [("a", "1", None, None)]),
    ("Package: half-installed\nStatus: install ok half-installed\nVersion: 1\n", []),
    ("", []),
    ("\x00\xff garbage without colons\n\n\n", []),
])
def test_dpkg_status(text: str, expected: list[tuple[str, str, str | None, str | None]]) -> None:
    packages = parse_dpkg_status(text)
    assert [(p.name, p.version, p.arch, p.source) for p in packages] == expected
    assert all(p.ecosystem == "deb" and p.location == "/var/lib/dpkg/status" for p in packages)


META = "Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n{extra}\n\nBody: with: colons\nLicense: body\n"


@pytest.mark.parametrize(("extra", "name", "licenses"), [
    ("License-Expression: Apache-2.0 OR BSD-3-Clause", "Foo_Bar", ("Apache-2.0 OR BSD-3-Clause",)),
    ("License: MIT", "foo", ("MIT",)),
    ("License: UNKNOWN\nClassifier: License :: OSI Approved :: BSD License", "foo", ("BSD License",)),
    ("License: Copyright (c) someone\n        Permission is hereby granted...\n"
     "Classifier: Programming Language :: Python\nClassifier: License :: OSI Approved :: MIT License", "foo",
     ("MIT License",)),
    ("Classifier: Programming Language :: Python", "foo", ()),
    ("License-Expression: MIT\nLicense: Whatever", "foo", ("MIT",)),
])
def test_metadata(extra: str, name: str, licenses: tuple[str, ...]) -> None:
    package = parse_metadata(META.format(name=name, extra=extra), "/site/x.dist-info/METADATA")
    assert package == Package("pypi", name, "1.2.3", licenses=licenses, location="/site/x.dist-info/METADATA")


@pytest.mark.parametrize("text", ["", "Name: only-a-name\n", "Version: 1\n", "\n\nName: x\nVersion: 1\n"])
def test_metadata_without_name_or_version_is_nothing(text: str) -> None:
    assert parse_metadata(text) is None


@pytest.mark.parametrize(("doc", "expected"), [
    ({"name": "ajv", "version": "8.17.1", "license": "MIT"}, ("ajv", "8.17.1", ("MIT",))),
    ({"name": "@hono/node-server", "version": "1.19.0", "license": "MIT"},
     ("@hono/node-server", "1.19.0", ("MIT",))),
    ({"name": "old", "version": "0.1.0", "license": {"type": "BSD-2-Clause", "url": "x"}},
     ("old", "0.1.0", ("BSD-2-Clause",))),
    ({"name": "older", "version": "0.0.1", "licenses": [{"type": "MIT"}, {"type": "Apache-2.0"}]},
     ("older", "0.0.1", ("MIT", "Apache-2.0"))),
    ({"name": "none", "version": "1.0.0"}, ("none", "1.0.0", ())),
    ({"name": "x", "version": 1}, None),
    ({"version": "1.0.0"}, None),
    (["name", "version"], None),
])
def test_package_json(doc: Any, expected: tuple[str, str, tuple[str, ...]] | None) -> None:
    package = parse_package_json(json.dumps(doc), "/app/node_modules/x/package.json")
    assert (None if package is None else (package.name, package.version, package.licenses)) == expected


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000 + "]" * 100_000, '{"name": "x", "version": "1"'])
def test_package_json_that_is_not_json_is_nothing(text: str) -> None:
    assert parse_package_json(text) is None


@pytest.mark.parametrize(("path", "kind"), [
    ("var/lib/dpkg/status", "dpkg"),
    ("var/lib/dpkg/status-old", None),
    ("opt/mcp/venv/lib/python3.11/site-packages/mcp-2.3.0.dist-info/METADATA", "metadata"),
    ("usr/lib/python3/dist-packages/six-1.16.0.egg-info/PKG-INFO", "metadata"),
    ("opt/mcp/app/node_modules/ajv/package.json", "npm"),
    ("opt/mcp/app/node_modules/@hono/node-server/package.json", "npm"),
    ("opt/mcp/app/node_modules/a/node_modules/b/package.json", "npm"),
    ("opt/mcp/app/node_modules/ajv/lib/package.json", None),  # a file inside a package, not a manifest
    ("opt/mcp/app/package.json", None),
    ("etc/os-release", "os-release"),
    ("usr/lib/os-release", "os-release"),
    ("home/x/etc/os-release", None),
])
def test_which_files_are_records(path: str, kind: str | None) -> None:
    assert is_manifest(path) == kind


def test_os_release() -> None:
    text = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n# comment\nbad line\n'
    assert os_release(text) == {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID": "debian", "VERSION_ID": "12"}


@pytest.mark.parametrize("text", [
    "Name: x\nVersion: 1\n" + "Classifier: License :: A :: B\n" * 200_000,  # a field repeated without end
    "Package: x\nStatus: install ok installed\nVersion: 1\nDescription: d\n" + " more\n" * 500_000,
    "Name: " + "n" * 5_000_000 + "\nVersion: 1\n",
])
def test_hostile_records_are_linear_and_bounded(text: str) -> None:
    start = time.process_time()
    packages = [parse_metadata(text), *parse_dpkg_status(text)]
    assert time.process_time() - start < 3.0
    for p in packages:
        assert p is None or (len(p.name) <= MAX_FIELD and len(p.licenses) <= 8)


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    buffer.seek(0)
    return buffer


def test_scan_tar_reads_only_records_and_skips_oversized_ones() -> None:
    files = {
        "var/lib/dpkg/status": DPKG.encode(),
        "usr/lib/os-release": b'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian 12"\n',
        "opt/mcp/venv/lib/python3.11/site-packages/mcp_server_time-2026.10.19.dist-info/METADATA":
            b"Name: mcp-server-time\nVersion: 2026.10.19\nLicense-Expression: MIT\n",
        "opt/mcp/app/node_modules/ajv/package.json": b'{"name": "ajv", "version": "8.17.1"}',
        "opt/mcp/app/node_modules/ajv/lib/package.json": b'{"name": "inner", "version": "0"}',
        "opt/mcp/app/node_modules/big/package.json": b" " * (1024 * 1024 + 1),
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
    }
    packages, release, skipped = scan_tar(tar_of(files, {"etc/os-release": "../usr/lib/os-release",
                                                         "var/lib/dpkg/status-link": "status"}))
    assert sorted((p.ecosystem, p.name) for p in packages) == [
        ("deb", "libc6"), ("deb", "python3"), ("deb", "tzdata"), ("npm", "ajv"), ("pypi", "mcp-server-time")]
    assert release["VERSION_ID"] == "12" and skipped == 1
    time_server = next(p for p in packages if p.name == "mcp-server-time")
    assert time_server.location.startswith("/opt/mcp/venv/") and time_server.licenses == ("MIT",)


@pytest.mark.parametrize(("package", "os", "expected"), [
    (Package("deb", "python3", "3.11.2-1+b1", arch="amd64"), {"ID": "debian", "VERSION_ID": "12"},
     "pkg:deb/debian/python3@3.11.2-1%2Bb1?arch=amd64&distro=debian-12"),
    (Package("deb", "libc6", "2.36", arch="amd64"), {}, "pkg:deb/debian/libc6@2.36?arch=amd64"),
    (Package("pypi", "Foo_Bar.baz", "1.0"), None, "pkg:pypi/foo-bar-baz@1.0"),
    (Package("npm", "@hono/node-server", "1.19.0"), None, "pkg:npm/%40hono/node-server@1.19.0"),
    (Package("npm", "ajv", "8.17.1"), None, "pkg:npm/ajv@8.17.1"),
])
def test_purl(package: Package, os: dict[str, str] | None, expected: str) -> None:
    assert purl(package, os).to_string() == expected


def test_document_is_valid_cyclonedx_1_5_with_unique_refs() -> None:
    image = ImageContents(
        reference="toolcell/mcp-time:latest", image_id="sha256:" + "a" * 64, os={"ID": "debian", "VERSION_ID": "12"},
        packages=(Package("deb", "python3", "3.11.2-1+b1", arch="amd64", location="/var/lib/dpkg/status"),
                  Package("pypi", "mcp", "2.3.0", ("MIT",), "/opt/mcp/venv/a"),
                  Package("pypi", "mcp", "2.3.0", ("MIT",), "/opt/mcp/venv/b"),  # twice: two refs
                  Package("npm", "@hono/node-server", "1.19.0", ("MIT",), "/opt/mcp/app/node_modules/@hono/x"),
                  Package("pypi", "weird", "1", ("Not an SPDX id, my own terms",), "/x")))
    text = render(build_bom(python_packages(), [image]))
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    refs = [c["bom-ref"] for c in doc["components"]]
    assert len(refs) == len(set(refs))
    by_name = {(c["name"], c.get("version")): c for c in doc["components"]}
    assert by_name[("toolcell/mcp-time:latest", "sha256:" + "a" * 64)]["type"] == "container"
    assert any(c["name"] == "cyclonedx-python-lib" for c in doc["components"])  # the environment, too
    image_deps = next(d for d in doc["dependencies"] if d["ref"] == "image:toolcell/mcp-time:latest")
    assert len(image_deps["dependsOn"]) == 5
    assert by_name[("weird", "1")]["licenses"] == [{"license": {"name": "Not an SPDX id, my own terms"}}]
