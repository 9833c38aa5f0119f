"""StreamBuffer: caps, truncation and UTF-8 handling."""

import pytest

from runtime.output import StreamBuffer


@pytest.mark.parametrize(
    ("chunks", "cap", "text", "truncated", "seen"),
    [
        ([b"hello ", b"world"], 100, "hello world", False, 11),
        ([b"hello ", b"world"], 8, "hello wo", True, 11),
        ([b"abc", b"def"], 3, "abc", True, 6),
        ([b"\xc3", b"\xa9t\xc3\xa9"], 100, "été", False, 5),  # split multi-byte sequence
        ([b"ok\xff\xfe!"], 100, "ok\ufffd\ufffd!", False, 5),  # invalid UTF-8 replaced
        ([b"ab\xc3"], 100, "ab\ufffd", False, 3),  # dangling partial sequence at EOF
        ([b""], 0, "", False, 0),
    ],
)
def test_stream_buffer(chunks: list[bytes], cap: int, text: str, truncated: bool, seen: int) -> None:
    buf = StreamBuffer(cap)
    for chunk in chunks:
        buf.feed(chunk)
    buf.finish()
    assert buf.text == text
    assert buf.truncated is truncated
    assert buf.seen == seen
    assert buf.kept <= cap
