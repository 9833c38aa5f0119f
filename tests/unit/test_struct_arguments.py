"""ExecuteRequest.arguments (a google.protobuf.Struct) as JSON text, for generic gRPC clients."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from google.protobuf import struct_pb2

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.errors import InvalidArguments
from toolcell.policy.arguments import ArgumentLimits, parse_arguments
from toolcell.server.convert import arguments_text, check_arguments_fields


def request(arguments: dict[str, Any] | None = None, arguments_json: str = "") -> pb.ExecuteRequest:
    msg = pb.ExecuteRequest(tool="t", arguments_json=arguments_json)
    if arguments is not None:
        s = struct_pb2.Struct()
        s.update(arguments)
        msg.arguments.CopyFrom(s)
    return msg


@pytest.mark.parametrize(("arguments", "expected"), [
    ({"text": "hi"}, {"text": "hi"}),
    ({"n": 3, "x": 1.5, "big": 2.0 ** 60}, {"n": 3, "x": 1.5, "big": 2.0 ** 60}),
    ({"nested": {"list": [1, "a", None, True]}}, {"nested": {"list": [1, "a", None, True]}}),
    ({}, {}),
])
def test_a_struct_becomes_the_same_json_whole_numbers_as_integers(arguments: dict[str, Any], expected: Any) -> None:
    text = arguments_text(request(arguments))
    assert json.loads(text) == expected
    # A whole number is an integer in the text ("n":3, not 3.0), wherever the Struct's map put the key.
    assert re.search(r'"n":3[,}]', text) if "n" in arguments else True


def test_arguments_json_is_used_as_is_and_giving_both_is_refused() -> None:
    assert arguments_text(request(arguments_json='{"a": 1}')) == '{"a": 1}'
    check_arguments_fields(request({"a": 1}))
    with pytest.raises(InvalidArguments, match="not both"):
        check_arguments_fields(request({"a": 1}, arguments_json='{"a": 1}'))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_is_refused(bad: float) -> None:
    with pytest.raises(InvalidArguments, match="NaN or infinite"):
        arguments_text(request({"x": bad}))


def test_what_a_struct_gives_goes_through_the_same_strict_parser() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(InvalidArguments, match="deeper"):
        parse_arguments(arguments_text(request(deep)), ArgumentLimits())
