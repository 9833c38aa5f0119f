"""Argument validation: the caller's JSON, checked before any sandbox exists.

Arguments come from a model that may be under prompt injection, so parsing is strict and bounded
before the (maintained) ``jsonschema`` validator sees them: total size, nesting depth, string and
array lengths, duplicate keys, NaN/Infinity and huge integers are all rejected here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from runtime.errors import ConfigError, InvalidArguments

MAX_INT_DIGITS = 20  # beyond 64-bit range: a tool's JSON parser may overflow or choke


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
    return Draft202012Validator(schema)


def _reject_constant(name: str) -> Any:
    raise InvalidArguments(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidArguments(f"integer with {len(text)} digits is too large")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidArguments(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_shape(value: Any, limits: ArgumentLimits, path: str, depth: int) -> None:
    if depth > limits.max_depth:
        raise InvalidArguments(f"nesting deeper than {limits.max_depth}", path=path or "$")
    if isinstance(value, str):
        if len(value) > limits.max_string_length:
            raise InvalidArguments(f"string longer than {limits.max_string_length}", path=path or "$")
    elif isinstance(value, list):
        if len(value) > limits.max_array_length:
            raise InvalidArguments(f"array longer than {limits.max_array_length}", path=path or "$")
        for i, item in enumerate(value):
            _check_shape(item, limits, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if len(key) > limits.max_string_length:
                raise InvalidArguments("key too long", path=path or "$")
            _check_shape(item, limits, f"{path}.{key}" if path else key, depth + 1)


def parse_arguments(arguments_json: str, limits: ArgumentLimits) -> dict[str, Any]:
    """Strictly parse the caller's JSON into an object, within ``limits``."""
    raw = arguments_json.strip() or "{}"
    if len(raw.encode("utf-8", "surrogatepass")) > limits.max_argument_bytes:
        raise InvalidArguments(f"arguments exceed {limits.max_argument_bytes} bytes")
    try:
        value = json.loads(
            raw,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
        )
    except RecursionError as exc:
        raise InvalidArguments(f"nesting deeper than {limits.max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArguments(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(value, dict):
        raise InvalidArguments(f"arguments must be a JSON object, not {type(value).__name__}")
    _check_shape(value, limits, "", 1)
    return value


def validate_arguments(
    validator: Draft202012Validator, arguments_json: str, limits: ArgumentLimits
) -> dict[str, Any]:
    """Parse and schema-check; the error names the offending field's path."""
    value = parse_arguments(arguments_json, limits)
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise InvalidArguments(error.message, path=path or "$")
    return value
