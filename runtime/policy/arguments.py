"""Argument validation: the caller's JSON, checked before any sandbox exists.

Arguments come from a model that may be under prompt injection, so parsing is strict and bounded
before the (maintained) ``jsonschema`` validator sees them: total size, nesting depth, string and
array lengths, duplicate keys, NaN/Infinity, numbers out of a double's range (``1e400`` would reach
the tool as Infinity), huge integers and lone UTF-16 surrogates (``"\\ud800"`` can't be encoded to
UTF-8 for the tool) are all rejected here, each naming the field's path.

Cost is linear in the text: ``json.loads`` (C) with hooks that never raise but leave a marker,
then one iterative walk over the value that reports the first marker or broken limit with its path.
Paths and messages quote caller keys and values only through ``toolcell.quoting`` (short, escaped).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError

from toolcell.errors import ConfigError, InvalidArguments
from toolcell.policy.linear import LinearPattern, compile_linear
from toolcell.quoting import printable, quote

MAX_INT_DIGITS = 20  # beyond 64-bit range: a tool's JSON parser may overflow or choke
# A double needs at most 17 significant digits; longer number texts are refused before float() sees them.
MAX_NUMBER_CHARS = 64
# A path (or a schema message) in an error keeps at most this many characters (the tail of a path).
MAX_PATH_CHARS = 160
MAX_MESSAGE_CHARS = 200
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class ArgumentLimits:
    max_argument_bytes: int = 1024 * 1024
    max_depth: int = 32
    max_string_length: int = 1024 * 1024
    max_array_length: int = 10_000


def compile_schema(schema: Mapping[str, Any], *, key: str) -> Draft202012Validator:
    """Check an admin's schema at config load, so a broken schema is a start-up error."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(f"invalid JSON Schema: {exc.message}", key=key) from exc
    if schema.get("type", "object") != "object":
        raise ConfigError("a tool's input schema must describe an object", key=key)
    return _Validator(schema)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1024)
def _linear(pattern: str) -> LinearPattern:
    return compile_linear(pattern, capture=False)


def _linear_pattern(validator: Any, pattern: str, instance: Any,
                    schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    """JSON Schema's ``pattern`` through RE2: linear in the caller's string, whatever the pattern."""
    if validator.is_type(instance, "string") and not _linear(pattern).search(instance):
        yield ValidationError(f"does not match the pattern {pattern[:80]!r}")


def _canonical(value: Any) -> Any:
    """A hashable form of a JSON value under JSON Schema's equality (1 == 1.0; true is not 1)."""
    if isinstance(value, bool) or value is None:
        return ("b", value)
    if isinstance(value, float) and value.is_integer():
        return ("n", int(value))
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("l", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("d", tuple(sorted((k, _canonical(v)) for k, v in value.items())))
    return ("?", repr(value))


def _linear_unique_items(validator: Any, unique: bool, instance: Any,
                         schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    """``uniqueItems`` in time linear in the array: jsonschema compares unsortable items (objects) pairwise,
    so 3,000 objects took 7 s, 10,000 over a minute, on the event loop."""
    if unique and validator.is_type(instance, "array"):
        seen: set[Any] = set()
        for item in instance:
            key = _canonical(item)
            if key in seen:
                yield ValidationError("has non-unique elements")
                return
            seen.add(key)


# Every schema's ``uniqueItems`` is checked in linear time (above).
_Validator = validators.extend(Draft202012Validator, {"uniqueItems": _linear_unique_items})  # type: ignore[no-untyped-call]
# For schemas toolcell did not write (an MCP server's inputSchema): ``pattern`` runs on RE2, not Python's
# backtracking ``re``, so a hostile server cannot make a caller's argument cost seconds to validate.
_UntrustedValidator = validators.extend(_Validator, {"pattern": _linear_pattern})  # type: ignore[no-untyped-call]


def _keywords(schema: Any, names: frozenset[str], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(keyword, value) of every keyword in ``names`` anywhere in a schema (bounded depth)."""
    if depth > 64:
        raise ConfigError("the schema nests deeper than 64 levels")
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in names:
                yield key, value
            yield from _keywords(value, names, depth + 1)
    elif isinstance(schema, list):
        for item in schema:
            yield from _keywords(item, names, depth + 1)


_PATTERNS = frozenset({"pattern", "patternProperties"})
_REFS = frozenset({"$ref", "$dynamicRef"})


def compile_untrusted_schema(schema: Mapping[str, Any], *, key: str) -> Draft202012Validator:
    """A server's input or output schema, refused unless every pattern runs in linear time.

    ``patternProperties`` is refused outright: jsonschema also matches its keys with Python's ``re`` when
    it checks ``additionalProperties``. References must be local (``#...``): nothing is fetched.
    """
    validator = compile_schema(schema, key=key)
    try:
        for keyword, value in _keywords(schema, _PATTERNS):
            if keyword == "patternProperties":
                raise ConfigError("patternProperties is not supported in a discovered schema", key=key)
            if isinstance(value, str):
                _linear(value)
    except ValueError as exc:
        raise ConfigError(f"a pattern is not linear-time (RE2): {str(exc)[:120]}", key=key) from None
    refs = [v for _, v in _keywords(schema, _REFS) if not (isinstance(v, str) and v.startswith("#"))]
    if refs:
        raise ConfigError("only local references (#...) are allowed in a discovered schema", key=key)
    return _UntrustedValidator(validator.schema)  # type: ignore[no-any-return]


class _Rejected:
    """Left in the value by a parse hook; the walk reports ``reason`` with the field's path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Duplicated(dict[str, Any]):
    """An object that repeated ``key`` (the first value is kept; the walk rejects it)."""

    key: str = ""


def _reject_constant(name: str) -> _Rejected:
    return _Rejected(f"{name} is not valid JSON")


def _parse_int(text: str) -> int | _Rejected:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Rejected(f"integer with {len(text.lstrip('-'))} digits is too large")
    return int(text)


def _parse_float(text: str) -> float | _Rejected:
    if len(text) > MAX_NUMBER_CHARS:
        return _Rejected(f"number with {len(text)} characters is too long")
    value = float(text)
    if not math.isfinite(value):
        return _Rejected(f"number {printable(text, 32)} is out of range (beyond a double's 1.8e308)")
    if value == 0.0 and any(c in "123456789" for c in text.lower().partition("e")[0]):
        return _Rejected(f"number {printable(text, 32)} is too small (underflows to 0)")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            duplicated = _Duplicated()
            for k, v in pairs:
                duplicated.setdefault(k, v)
            duplicated.key = key
            return duplicated
        seen.add(key)
    return result  # unreachable: dict() merged a repeated key


def format_path(parts: Iterable[str | int]) -> str:
    """``items[0].k`` for plain keys; odd keys quoted (``a['x y']``); at most the last 160 characters."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{quote(part, 32)}]")
    path = "".join(out)
    return path if len(path) <= MAX_PATH_CHARS else "..." + path[-MAX_PATH_CHARS:]


class _Node:
    """One step of a path, linked to its parent: O(1) per value; formatted only for an error."""

    __slots__ = ("parent", "part")

    def __init__(self, parent: _Node | None, part: str | int) -> None:
        self.parent = parent
        self.part = part

    def path(self) -> str:
        parts: list[str | int] = []
        node: _Node | None = self
        while node is not None:
            parts.append(node.part)
            node = node.parent
        return format_path(reversed(parts))


def _where(parent: _Node | None, part: str | int | None) -> str:
    node = _Node(parent, part) if part is not None else parent
    return node.path() if node is not None else "$"


_SCALARS = (int, float, bool, type(None))


def _surrogate_at(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (json.loads joins valid pairs), or None. C speed."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _may_hold_surrogates(raw: str) -> bool:
    """Whether any parsed string could hold one: a raw surrogate, or a \\uD... escape (pairs included).

    Substring searches only (C speed), so ordinary arguments skip the per-string check entirely.
    """
    return "\\ud" in raw or "\\uD" in raw or _surrogate_at(raw) is not None


def _check_shape(root: dict[str, Any], limits: ArgumentLimits, surrogates: bool) -> None:
    """Walk the parsed value once and raise on the first problem, naming its path.

    Iterative (depth costs no Python stack); a value's path node is made only for containers.
    """
    stack: list[tuple[Any, _Node | None, str | int | None, int]] = [(root, None, None, 1)]
    while stack:
        value, parent, part, depth = stack.pop()
        kind = type(value)
        if kind in _SCALARS:
            continue
        if depth > limits.max_depth:
            raise InvalidArguments(f"nesting deeper than {limits.max_depth}", path=_where(parent, part))
        if kind is str:
            if len(value) > limits.max_string_length:
                raise InvalidArguments(f"string longer than {limits.max_string_length}", path=_where(parent, part))
            if surrogates and (bad := _surrogate_at(value)) is not None:
                raise InvalidArguments(f"string holds a lone UTF-16 surrogate {quote(value[bad])} at {bad}",
                                       path=_where(parent, part))
            continue
        if kind is _Rejected:
            raise InvalidArguments(value.reason, path=_where(parent, part))
        node = _Node(parent, part) if part is not None else parent
        if kind is list:
            if len(value) > limits.max_array_length:
                raise InvalidArguments(f"array longer than {limits.max_array_length}", path=_where(node, None))
            stack.extend((value[i], node, i, depth + 1) for i in range(len(value) - 1, -1, -1))
            continue
        if kind is _Duplicated:
            raise InvalidArguments("duplicate key", path=_where(node, value.key))
        for key in value:
            if len(key) > limits.max_string_length:
                raise InvalidArguments("key too long", path=_where(node, None))
            if surrogates and (bad := _surrogate_at(key)) is not None:
                raise InvalidArguments(f"key holds a lone UTF-16 surrogate {quote(key[bad])} at {bad}",
                                       path=_where(node, key))
        stack.extend((value[k], node, k, depth + 1) for k in reversed(value))


def parse_arguments(arguments_json: str, limits: ArgumentLimits) -> dict[str, Any]:
    """Strictly parse the caller's JSON into an object, within ``limits``.

    The result holds only dict, list, str (UTF-8 encodable), int (<= 20 digits), finite float, bool
    and None: ``json.dumps(value, allow_nan=False)`` always succeeds on it.
    """
    raw = arguments_json.strip(" \t\r\n") or "{}"
    cap = limits.max_argument_bytes
    if len(raw) > cap or len(raw.encode("utf-8", "surrogatepass")) > cap:
        raise InvalidArguments(f"arguments exceed {cap} bytes")
    try:
        value = json.loads(
            raw,
            object_pairs_hook=_pairs,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except RecursionError as exc:
        raise InvalidArguments(f"nesting deeper than {limits.max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArguments(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(value, dict):
        kind = "a number" if isinstance(value, _Rejected) else type(value).__name__
        raise InvalidArguments(f"arguments must be a JSON object, not {kind}")
    _check_shape(value, limits, surrogates=_may_hold_surrogates(raw))
    return value


def _schema_message(error: ValidationError) -> str:
    """jsonschema's message with the instance's repr (a caller value, maybe 1 MiB) replaced by a short quote."""
    message = error.message
    instance = error.instance
    if isinstance(instance, str | list | dict):
        shown = repr(instance)
        if len(shown) > 48 and shown in message:
            short = quote(instance, 32) if isinstance(instance, str) else f"<{type(instance).__name__} of " \
                f"{len(instance)}>"
            message = message.replace(shown, short)
    return printable(message, MAX_MESSAGE_CHARS)


def validate_arguments(
    validator: Draft202012Validator, arguments_json: str, limits: ArgumentLimits
) -> dict[str, Any]:
    """Parse and schema-check; the error names the offending field's path."""
    value = parse_arguments(arguments_json, limits)
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        raise InvalidArguments(_schema_message(error), path=format_path(error.absolute_path) or "$")
    return value
