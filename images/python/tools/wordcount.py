"""wordcount: count the lines, words and characters of a text.

Tool contract: one JSON object on stdin, the result on stdout, diagnostics on stderr.
    stdin:  {"text": "<str>"}
    stdout: {"lines": <int>, "words": <int>, "chars": <int>}
Words are runs of non-whitespace (str.split), lines as str.splitlines counts them, chars are Unicode code
points.  Exit status: 0 on success, 2 when the arguments are not as above.
"""

from __future__ import annotations

import json
import sys
from typing import TypedDict


class Counts(TypedDict):
    lines: int
    words: int
    chars: int


def count(text: str) -> Counts:
    """Count lines, whitespace-separated words and code points of `text`."""
    return {"lines": len(text.splitlines()), "words": len(text.split()), "chars": len(text)}


def read_text(raw: bytes) -> str:
    """The `text` argument of the JSON document `raw`; ValueError when missing or not a string."""
    args = json.loads(raw)
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    text = args.get("text")
    if not isinstance(text, str):
        raise ValueError('argument "text" must be a string')
    return text


def main() -> int:
    try:
        text = read_text(sys.stdin.buffer.read())
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
        print(f"wordcount: invalid arguments: {exc}", file=sys.stderr)
        return 2
    json.dump(count(text), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
