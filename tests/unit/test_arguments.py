"""Argument parsing and validation: every rejection names what is wrong."""

import json
import time

import pytest

from toolcell.errors import ConfigError, InvalidArguments
from toolcell.policy.arguments import (
    MAX_MESSAGE_CHARS,
    MAX_PATH_CHARS,
    ArgumentLimits,
    compile_schema,
    validate_arguments,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 50},
        "n": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
    },
    "required": ["text"],
    "additionalProperties": False,
}
LIMITS = ArgumentLimits(max_argument_bytes=4096, max_depth=6, max_string_length=100, max_array_length=5)


@pytest.mark.parametrize(
    ("arguments", "path", "fragment"),
    [
        ("not json", "", "not valid JSON"),
        ('{"text": "a", "text": "b"}', "text", "duplicate key"),
        ('{"text": NaN}', "text", "NaN is not valid JSON"),
        ('{"text": "a", "n": Infinity}', "n", "Infinity is not valid JSON"),
        ('{"text": "a", "n": -Infinity}', "n", "-Infinity is not valid JSON"),
        ('{"text": "a", "n": 1' + "0" * 40 + "}", "n", "too large"),
        ("[1, 2]", "", "must be a JSON object"),
        ('"text"', "", "must be a JSON object"),
        ('{"text": 5}', "text", "is not of type 'string'"),
        ('{"n": 1}', "$", "'text' is a required property"),
        ('{"text": "a", "n": -1}', "n", "less than the minimum"),
        ('{"text": "a", "extra": 1}', "$", "Additional properties"),
        ('{"text": "a", "items": [{"k": 1}]}', "items[0].k", "is not of type 'string'"),
        ('{"text": "' + "x" * 200 + '"}', "text", "string longer than 100"),
        ('{"text": "a", "items": [{},{},{},{},{},{}]}', "items", "array longer than 5"),
        ('{"text": "a", "items": [{"k": {"a": {"b": {"c": {"d": 1}}}}}]}', "items[0].k.a.b.c", "nesting deeper"),
        ('{"text": "' + "x" * 5000 + '"}', "", "exceed 4096 bytes"),
        ("[" * 2000 + "]" * 2000, "", "nesting deeper"),
    ],
)
def test_rejections_name_the_problem(arguments: str, path: str, fragment: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(compile_schema(SCHEMA, key="t"), arguments, LIMITS)
    assert info.value.path == path
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"text": "héllo"}', {"text": "héllo"}),
        ('  {"text": "", "n": 3, "items": [{"k": "v"}]} ', {"text": "", "n": 3, "items": [{"k": "v"}]}),
    ],
)
def test_valid_arguments_parse(arguments: str, expected: dict[str, object]) -> None:
    assert validate_arguments(compile_schema(SCHEMA, key="t"), arguments, LIMITS) == expected


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "string"}, "must describe an object"),
        ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "invalid JSON Schema"),
    ],
)
def test_bad_tool_schemas_are_config_errors(schema: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_schema(schema, key="tools[0].input_schema")
    assert fragment in str(info.value)
    assert info.value.key == "tools[0].input_schema"


# Issue 14: what the caller's JSON may hold, each case next to its allowed twin (same probe, same place).
DEEP = ['{"a": {"b": [1, {"c": ', "}]}}"]  # a field three levels down: a.b[1].c
PAIRS = [
    # (allowed, denied, path of the denied one, fragment of its message)
    ('"\\ud83d\\ude00"', '"\\ud800"', "a.b[1].c", "lone UTF-16 surrogate '\\ud800'"),
    ('"x\\ud83d\\ude00"', '"x\\udc00"', "a.b[1].c", "surrogate '\\udc00' at 1"),
    ('"\\ud83d\\ude00"', '"\\ude00\\ud83d"', "a.b[1].c", "surrogate"),
    ('"\\uD83D\\uDE00"', '"\\uDBFF"', "a.b[1].c", "surrogate"),
    ("1e308", "1e400", "a.b[1].c", "out of range"),
    ("-1e308", "-1e400", "a.b[1].c", "out of range"),
    ("1.7976931348623157e308", "1e309", "a.b[1].c", "out of range"),
    ("1e-300", "1e-400", "a.b[1].c", "too small"),
    ("0e999999999", "1e999999999", "a.b[1].c", "out of range"),
    ("0.5E+10", "5E+99999", "a.b[1].c", "out of range"),
    ("1" * 20, "1" * 21, "a.b[1].c", "21 digits"),
    ("-" + "1" * 20, "-" + "1" * 21, "a.b[1].c", "21 digits"),
    ("0." + "1" * 40, "0." + "1" * 80, "a.b[1].c", "82 characters"),
    ("null", "NaN", "a.b[1].c", "NaN is not valid JSON"),
    ("null", "Infinity", "a.b[1].c", "Infinity is not valid JSON"),
    ('{"x": 1, "y": 2}', '{"x": 1, "x": 2}', "a.b[1].c.x", "duplicate key"),
]
OPEN = compile_schema({"type": "object"}, key="t")
WIDE = ArgumentLimits(max_argument_bytes=1024 * 1024, max_depth=32, max_string_length=1024 * 1024,
                      max_array_length=10_000)


@pytest.mark.parametrize(("allowed", "denied", "path", "fragment"), PAIRS)
def test_values_allowed_and_denied_at_depth(allowed: str, denied: str, path: str, fragment: str) -> None:
    value = validate_arguments(OPEN, DEEP[0] + allowed + DEEP[1], WIDE)
    assert json.loads(json.dumps(value, allow_nan=False)) == value
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # the tool gets UTF-8: must not raise
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(OPEN, DEEP[0] + denied + DEEP[1], WIDE)
    assert info.value.path == path
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ('{"\\ud800": 1}', "['\\ud800']"),
        ('{"a": {"k\\udfff": 1}}', "a['k\\udfff']"),
        ('{"a": [{"ok": 1}, {"\\ud800x": 1}]}', "a[1]['\\ud800x']"),
        ('{"a": [["\\ud800"]]}', "a[0][0]"),
        ('{"\\ud800": 1}'.replace("\\ud800", "\ud800"), "['\\ud800']"),  # a raw surrogate (not from gRPC)
        ('{"a": "\ud800"}', "a"),
    ],
)
def test_lone_surrogates_in_keys_and_values_name_the_path(arguments: str, path: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(OPEN, arguments, WIDE)
    assert info.value.path == path
    assert "surrogate" in str(info.value)
    assert str(info.value).isascii() and str(info.value).isprintable()


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ('{"' + "k" * 100_000 + '": NaN}', "['" + "k" * 32 + "'...(100000 chars)]"),
        ('{"\\u001b[31m\\n": 1e400}', "['\\x1b[31m\\n']"),
        ('{"a b": {"c": 1e400}}', "['a b'].c"),
    ],
)
def test_odd_keys_in_paths_are_quoted_short(arguments: str, path: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(OPEN, arguments, WIDE)
    assert info.value.path == path


def test_a_path_through_many_long_keys_keeps_its_tail() -> None:
    keys = [f"key{i}-" + "x" * 40 for i in range(30)]
    text = "".join(f'{{"{k}": ' for k in keys) + "1e400" + "}" * len(keys)
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(OPEN, text, WIDE)
    assert info.value.path.startswith("...") and info.value.path.endswith("." + keys[-1])
    assert len(info.value.path) <= MAX_PATH_CHARS + 3


@pytest.mark.parametrize(
    ("schema", "arguments", "fragment"),
    [
        ({"properties": {"t": {"maxLength": 5}}}, {"t": "x" * 500_000}, "'xxxxxxxx"),
        ({"properties": {"t": {"type": "integer"}}}, {"t": "\u202e\x1b[2J" * 1000}, "is not of type 'integer'"),
        ({"properties": {"t": {"enum": ["a"]}}}, {"t": ["y" * 100] * 100}, "is not one of ['a']"),
        ({"additionalProperties": False}, {f"k{i}" * 50: 1 for i in range(500)}, "Additional properties"),
    ],
)
def test_schema_messages_quote_caller_values_short(schema: dict[str, object], arguments: dict[str, object],
                                                   fragment: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        validate_arguments(compile_schema({"type": "object", **schema}, key="t"), json.dumps(arguments), WIDE)
    message = str(info.value)
    assert fragment in message
    assert len(message) <= MAX_MESSAGE_CHARS + MAX_PATH_CHARS + 40
    assert message.isascii() and message.isprintable()


# Worst cases at the 1 MiB cap: each is rejected (or parsed) in one linear pass. The bound only proves
# "not quadratic, not hanging": a quadratic pass over 1 MiB takes minutes.
MIB = 1024 * 1024
WORST = [
    ("[" * MIB, "nesting deeper"),
    ('{"a":' * (MIB // 5), "nesting deeper"),
    ('{"a": "' + "\\ud800" * ((MIB - 20) // 6) + '"}', "surrogate"),
    ('{"a": "' + "\\ud83d\\ude00" * ((MIB - 20) // 12) + '", "b": "\\ud800"}', "surrogate"),
    ('{"a": ' + "9" * (MIB - 10) + "}", "digits is too large"),
    ('{"a": 0.' + "9" * (MIB - 10) + "}", "characters is too long"),
    ('{"a": 1e' + "9" * (MIB - 10) + "}", "characters is too long"),
    ('{"a": [' + ",".join(["1e400"] * 10_000) + "]}", "out of range"),
    ('{"a": [' + ",".join(["NaN"] * 10_000) + "]}", "NaN"),
    ("{" + ",".join(f'"k{i}": 1' for i in range(85_000)) + ', "k0": 2}', "duplicate key"),
    ("{" + ",".join(f'"k{i}": {{}}' for i in range(80_000)) + ', "z": "\\udc00"}', "surrogate"),
    ('{"a": "' + "\\\\" * ((MIB - 20) // 2) + '"}', ""),
    ('{"a": "' + "\\u00e9" * ((MIB - 20) // 6) + '"}', ""),
]


@pytest.mark.parametrize(("arguments", "fragment"), WORST, ids=[f"worst{i}" for i in range(len(WORST))])
def test_worst_cases_at_the_cap_are_linear(arguments: str, fragment: str) -> None:
    assert len(arguments.encode()) <= MIB
    started = time.monotonic()
    if fragment:
        with pytest.raises(InvalidArguments) as info:
            validate_arguments(OPEN, arguments, WIDE)
        assert fragment in str(info.value)
        assert len(str(info.value)) <= 400
    else:
        value = validate_arguments(OPEN, arguments, WIDE)
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert time.monotonic() - started < 10.0
