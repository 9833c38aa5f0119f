"""Argument parsing and validation: every rejection names what is wrong."""

import pytest

from runtime.errors import ConfigError, InvalidArguments
from runtime.policy.arguments import ArgumentLimits, compile_schema, validate_arguments

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
        ('{"text": "a", "text": "b"}', "", "duplicate key 'text'"),
        ('{"text": NaN}', "", "NaN is not valid JSON"),
        ('{"text": "a", "n": Infinity}', "", "Infinity is not valid JSON"),
        ('{"text": "a", "n": 1' + "0" * 40 + "}", "", "too large"),
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
