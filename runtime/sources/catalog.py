"""A server's ``tools/list`` (as the driver reported it) into toolcell tools. Pure.

What a server says about its tools reaches a model's context, so it is hostile like its output: names
must be plain (``[A-Za-z0-9_.-]{1,64}``), titles and descriptions are scrubbed and cut, schemas must
compile with linear-time patterns and local references only, and a tool whose description or schema
carries prompt-injection markers (tool poisoning) is left out unless the admin replaced its description.
The server's annotation hints fill only what the profile does not establish: the profile's facts and
then the admin's overrides win. Every tool left out is named with its reason, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jsonschema import Draft202012Validator

from toolcell.errors import ConfigError
from toolcell.model import McpBinding, Tool, ToolSource
from toolcell.policy.annotations import HINTS, derived_annotations
from toolcell.policy.arguments import compile_untrusted_schema
from toolcell.policy.linear import compile_linear
from toolcell.policy.profile import IsolationProfile
from toolcell.policy.scrub import Redactor, detect_injection, scrub
from toolcell.quoting import quote

MAX_TOOLS = 512
TITLE_MAX_CHARS = 200
DESCRIPTION_MAX_CHARS = 8192
SCHEMA_MAX_BYTES = 256 * 1024
_NAME = compile_linear(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Discovered:
    """One tool as its server declared it, scrubbed."""

    name: str
    title: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any] | None
    hints: Mapping[str, Any]
    # Prompt-injection markers in its description, title or schemas, by kind.
    markers: Mapping[str, int]


@dataclass(frozen=True)
class Catalog:
    """What one discovery of a server found."""

    server: str
    tools: tuple[Discovered, ...]
    skipped: tuple[str, ...] = ()
    server_info: str = ""


def _text(value: object, redactor: Redactor, limit: int) -> str:
    return scrub(value[:limit], redactor)[0] if isinstance(value, str) else ""


def _hints(raw: object, redactor: Redactor) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    hints: dict[str, Any] = {k: raw[k] for k in HINTS if isinstance(raw.get(k), bool)}
    if isinstance(raw.get("title"), str):
        hints["title"] = _text(raw["title"], redactor, TITLE_MAX_CHARS)
    return hints


def _tool(raw: object, redactor: Redactor) -> Discovered | str:
    if not isinstance(raw, dict):
        return "not an object"
    name = raw.get("name")
    if not isinstance(name, str) or len(name) > 64 or not _NAME.search(name):
        return "its name is not 1-64 characters of [A-Za-z0-9_.-]"
    execution = raw.get("execution")
    if isinstance(execution, dict) and execution.get("taskSupport") == "required":
        return f"{name}: it can only run as a task (execution.taskSupport: required), which toolcell does not offer"
    schema = raw.get("inputSchema", {"type": "object"})
    output = raw.get("outputSchema")
    if not isinstance(schema, dict) or not (output is None or isinstance(output, dict)):
        return f"{name}: its schemas are not objects"
    schema_text = json.dumps([schema, output])
    if len(schema_text) > SCHEMA_MAX_BYTES:
        return f"{name}: its schemas exceed {SCHEMA_MAX_BYTES} bytes"
    title = _text(raw.get("title"), redactor, TITLE_MAX_CHARS)
    description = _text(raw.get("description"), redactor, DESCRIPTION_MAX_CHARS)
    markers = detect_injection(description) + detect_injection(title) + detect_injection(schema_text)
    return Discovered(name=name, title=title, description=description, input_schema=schema, output_schema=output,
                      hints=_hints(raw.get("annotations"), redactor), markers=dict(markers))


def read_catalog(server: str, tools: object, server_info: object, redactor: Redactor) -> Catalog:
    """The ``tools`` frame's list: each tool checked, the bad ones named with why (names quoted short)."""
    if not isinstance(tools, list):
        return Catalog(server=server, tools=(), skipped=("the tool list is not a list",))
    found: dict[str, Discovered] = {}
    skipped: list[str] = []
    for i, raw in enumerate(tools[:MAX_TOOLS]):
        tool = _tool(raw, redactor)
        if isinstance(tool, str):
            skipped.append(f"tool #{i}: {tool}")
        elif tool.name in found:
            skipped.append(f"tool #{i}: {tool.name}: a second tool of that name")
        else:
            found[tool.name] = tool
    if len(tools) > MAX_TOOLS:
        skipped.append(f"{len(tools) - MAX_TOOLS} tools past the first {MAX_TOOLS}")
    info = ""
    if isinstance(server_info, dict):
        info = " ".join(_text(server_info.get(k), redactor, 100) for k in ("name", "version")).strip()
    return Catalog(server=server, tools=tuple(found.values()), skipped=tuple(skipped), server_info=info)


class DriverCommand(Protocol):
    """``sources.driver.driver_command``: the in-sandbox driver in front of a server's command."""

    def __call__(self, server_command: Sequence[str], *, session: bool = False) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class SourceTools:
    """A source's tools, ready for ``Config.with_tools``, and what was left out and why."""

    tools: Mapping[str, Tool]
    validators: Mapping[str, Draft202012Validator]
    output_validators: Mapping[str, Draft202012Validator]
    skipped: tuple[str, ...]


def source_tools(source: ToolSource, catalog: Catalog, profiles: Mapping[str, IsolationProfile],
                 command: DriverCommand) -> SourceTools:
    """The catalog's tools as toolcell tools named ``<server>.<tool>``, with the admin's overrides."""
    tools: dict[str, Tool] = {}
    validators: dict[str, Draft202012Validator] = {}
    outputs: dict[str, Draft202012Validator] = {}
    skipped = list(catalog.skipped)
    for d in catalog.tools:
        override = source.overrides.get(d.name)
        if override is not None and override.hidden:
            continue
        name = f"{source.name}.{d.name}"
        description = override.description if override and override.description is not None else d.description
        if d.markers and not (override and override.description is not None):
            kinds = ", ".join(sorted(d.markers))
            skipped.append(f"{d.name}: its description or schema carries prompt-injection markers ({kinds}); "
                           f"set servers[].tools.{d.name}.description to list it")
            continue
        try:
            validators[name] = compile_untrusted_schema(d.input_schema, key=f"{name}.inputSchema")
            if d.output_schema is not None:
                outputs[name] = compile_untrusted_schema(d.output_schema, key=f"{name}.outputSchema")
        except ConfigError as exc:
            validators.pop(name, None)
            skipped.append(f"{d.name}: {exc}")
            continue
        profile = override.profile if override and override.profile else source.profile
        admin = dict(override.annotations) if override else {}
        tools[name] = Tool(
            name=name,
            title=override.title if override and override.title is not None else d.title,
            description=description,
            image=source.image,
            command=command(source.command),
            profile=profile,
            input_schema=d.input_schema,
            output_schema=d.output_schema,
            annotations={**d.hints, **derived_annotations(profiles[profile]), **admin},
            secrets=source.secrets,
            env=source.env,
            source=McpBinding(server=source.name, name=d.name, roots=source.roots),
            # A session keeps one server process across the caller's calls: the driver serves them in turn.
            session=dataclasses.replace(source.session, command=command(source.command, session=True))
            if source.session is not None else None,
        )
    known = {d.name for d in catalog.tools}
    skipped += [f"override for {quote(n)}: the server has no such tool" for n in sorted(source.overrides)
                if n not in known]
    return SourceTools(tools=tools, validators=validators, output_validators=outputs, skipped=tuple(skipped))
