"""``uniqueItems`` in linear time, with JSON Schema's equality, for admin and discovered schemas alike."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from toolcell.errors import InvalidArguments
from toolcell.policy.arguments import ArgumentLimits, compile_schema, compile_untrusted_schema, validate_arguments

SCHEMA = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}


@pytest.mark.parametrize(("items", "unique"), [
    ([1, 2, 3], True),
    ([1, 1.0], False),            # the same number
    ([1, True], True),            # a boolean is not a number
    ([0, False, None, ""], True),
    ([{"x": 1, "y": 2}, {"y": 2, "x": 1}], False),   # key order does not matter
    ([[1, 2], [2, 1]], True),      # item order does
    ([{"x": [1, {"z": 1.0}]}, {"x": [1, {"z": 1}]}], False),
    (["a", "a "], True),
])
@pytest.mark.parametrize("compile_", [compile_schema, compile_untrusted_schema])
def test_unique_items_follows_json_schema_equality(items: list[Any], unique: bool, compile_: Any) -> None:
    validator = compile_(SCHEMA, key="k")
    arguments = json.dumps({"a": items})
    if unique:
        validate_arguments(validator, arguments, ArgumentLimits())
    else:
        with pytest.raises(InvalidArguments, match="non-unique"):
            validate_arguments(validator, arguments, ArgumentLimits())


def test_ten_thousand_objects_at_the_array_cap_take_linear_time() -> None:
    validator = compile_schema(SCHEMA, key="k")
    arguments = json.dumps({"a": [{"i": i, "tags": [i, str(i)]} for i in range(10_000)]})
    started = time.thread_time()
    validate_arguments(validator, arguments, ArgumentLimits())
    with pytest.raises(InvalidArguments, match="non-unique"):
        validate_arguments(validator, arguments.replace('{"i": 9999,', '{"i": 0,').replace(
            '"tags": [9999, "9999"]', '"tags": [0, "0"]'), ArgumentLimits())
    assert time.thread_time() - started < 2.0  # jsonschema's own check: over a minute
