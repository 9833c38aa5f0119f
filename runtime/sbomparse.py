"""What an SBOM lists, read from the files package managers leave: pure parsers, no I/O.

Three sources, each into ``Package`` values:

- ``/var/lib/dpkg/status`` (Debian): one stanza per package; only ``install ok installed`` ones count.
- a distribution's ``METADATA`` (``*.dist-info``; ``PKG-INFO`` for eggs): name, version, licence
  (``License-Expression``, else a short ``License``, else the ``License ::`` classifiers).
- npm's ``node_modules/<name>/package.json`` (and ``@scope/<name>``, at any nesting depth).

The files come from images that may hold anything (a stock MCP server's image is someone else's code):
every input is bounded by the caller's read limit, parsed in linear time, and every string kept is cut
to a bounded length; a malformed file yields nothing rather than an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["MAX_FIELD", "MAX_VALUES", "Package", "is_manifest", "os_release", "parse_dpkg_status", "parse_metadata",
           "parse_package_json", "pypi_name"]

MAX_FIELD = 256  # characters kept of a name, version or licence
MAX_LICENSES = 8
MAX_VALUES = 512  # of one field in one stanza (Classifier repeats)
_NPM_MANIFEST = re.compile(r"(?:^|/)node_modules/(?:@[^/]+/)?[^/@][^/]*/package\.json$")
_METADATA = re.compile(r"\.(?:dist-info/METADATA|egg-info/PKG-INFO)$")
_DPKG_STATUS = re.compile(r"^(?:\./)?var/lib/dpkg/status$")
_OS_RELEASE = re.compile(r"^(?:\./)?(?:etc|usr/lib)/os-release$")


@dataclass(frozen=True)
class Package:
    """One installed package. ``ecosystem``: ``deb``, ``pypi`` or ``npm``; ``location``: where its record is."""

    ecosystem: str
    name: str
    version: str
    licenses: tuple[str, ...] = ()
    location: str = ""
    arch: str | None = None  # deb: the Architecture field
    source: str | None = None  # deb: the source package, when it differs from the name


def _cut(value: str) -> str:
    return value.strip()[:MAX_FIELD]


def is_manifest(path: str) -> str | None:
    """Which kind of record ``path`` (inside an image, no leading ``/``) is: ``dpkg``, ``metadata``, ``npm``,
    ``os-release``, or None for any other file."""
    if _DPKG_STATUS.match(path):
        return "dpkg"
    if _METADATA.search(path):
        return "metadata"
    if _NPM_MANIFEST.search(path):
        return "npm"
    if _OS_RELEASE.match(path):
        return "os-release"
    return None


def pypi_name(name: str) -> str:
    """The normalised name (PEP 503), as package URLs write it: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _stanzas(text: str) -> list[dict[str, list[str]]]:
    """RFC 822-style stanzas (dpkg status, METADATA headers): ``Field: value`` lines, continuation lines
    starting with a space or tab, stanzas separated by blank lines. Each field keeps its values in order
    (``Classifier`` repeats), at most ``MAX_VALUES`` of them, each at most ``4 * MAX_FIELD`` characters:
    linear in the text whatever it holds."""
    stanzas: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    last: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
        elif line[0] in " \t":
            if last and len(last[-1]) < 4 * MAX_FIELD:  # long descriptions are not kept whole
                last[-1] = (last[-1] + "\n" + line.strip())[:4 * MAX_FIELD]
        elif ":" in line:
            key, _, value = line.partition(":")
            values = current.setdefault(key.strip()[:MAX_FIELD], [])
            if len(values) < MAX_VALUES:
                values.append(value.strip()[:4 * MAX_FIELD])
                last = values
            else:
                last = None
        else:
            last = None
    if current:
        stanzas.append(current)
    return stanzas


def _first(stanza: dict[str, list[str]], key: str) -> str:
    values = stanza.get(key)
    return values[0] if values else ""


def parse_dpkg_status(text: str, location: str = "/var/lib/dpkg/status") -> list[Package]:
    """The installed packages of a dpkg status file (``Status: install ok installed``), in file order."""
    packages = []
    for stanza in _stanzas(text):
        name, version = _first(stanza, "Package"), _first(stanza, "Version")
        if not name or not version or _first(stanza, "Status").split()[-1:] != ["installed"]:
            continue
        source = _first(stanza, "Source").split(" ")[0] or None
        arch = _first(stanza, "Architecture")
        packages.append(Package("deb", _cut(name), _cut(version), location=location, arch=_cut(arch) or None,
                                source=_cut(source) if source and source != name else None))
    return packages


def parse_metadata(text: str, location: str = "") -> Package | None:
    """A Python distribution from its ``METADATA``/``PKG-INFO`` text (the headers; the body is ignored)."""
    headers = _stanzas(text.split("\n\n", 1)[0])
    fields = headers[0] if headers else {}
    name, version = _first(fields, "Name"), _first(fields, "Version")
    if not name or not version:
        return None
    licenses: tuple[str, ...] = ()
    expression = _first(fields, "License-Expression")
    short = _first(fields, "License")
    if expression:
        licenses = (_cut(expression),)
    elif short and "\n" not in short.strip() and len(short) <= 100 and short.upper() not in ("UNKNOWN", "NONE"):
        licenses = (_cut(short),)
    else:
        classifiers = [c.rsplit("::", 1)[-1].strip() for c in fields.get("Classifier", [])
                       if c.startswith("License ::") and c.count("::") >= 2]
        licenses = tuple(_cut(c) for c in classifiers[:MAX_LICENSES])
    return Package("pypi", _cut(name), _cut(version), licenses=licenses, location=location)


def parse_package_json(text: str, location: str = "") -> Package | None:
    """An npm package from its ``package.json``; None when it is not a JSON object with a name and version."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    name, version = doc.get("name"), doc.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        return None
    raw = doc.get("license")
    if raw is None and isinstance(doc.get("licenses"), list):  # the old form: [{"type": "MIT"}, ...]
        raw = doc["licenses"]
    items = raw if isinstance(raw, list) else [raw]
    licenses = []
    for item in items[:MAX_LICENSES]:
        value = item.get("type") if isinstance(item, dict) else item
        if isinstance(value, str) and value.strip():
            licenses.append(_cut(value))
    return Package("npm", _cut(name), _cut(version), licenses=tuple(licenses), location=location)


def os_release(text: str) -> dict[str, str]:
    """``/etc/os-release`` as a mapping (``ID``, ``VERSION_ID`` ...), quotes removed."""
    values = {}
    for line in text.splitlines()[:200]:
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            values[key] = _cut(value.strip().strip("\"'"))
    return values
