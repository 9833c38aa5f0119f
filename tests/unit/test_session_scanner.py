"""CallScanner (sessions.host): one call's stdout split into output, the files block and the trailer, however
the stream is cut into chunks, and in linear time with bounded hold-back at the worst input at the cap."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable

import pytest

from toolcell.backends.launcher import TRAILER_BYTES, TrailerScanner, new_nonce
from toolcell.sessions.host import CallScanner

NONCE = new_nonce()
OTHER = new_nonce()
CAP = 4096
HEAD = b"\x1etoolcell-files:" + NONCE.encode() + b":"
HEADER_BYTES = len(HEAD) + 11  # with the 10 length digits and the newline
TRAILER = b"\x1etoolcell-end:" + NONCE.encode() + b":007\n"
MIB = 1 << 20


def files_block(payload: bytes, length: int | None = None) -> bytes:
    return HEAD + b"%010d\n" % (len(payload) if length is None else length) + payload


# Output that looks like the start of a header or trailer, but is not one of this call's.
NEAR_MISSES = (
    b"plain \x1e text\n"
    b"\x1etoolcell-\n"
    b"\x1etoolcell-files:" + OTHER.encode() + b":0000000002\n{}"
    b"\x1etoolcell-end:" + OTHER.encode() + b":000\n"
    + HEAD + b"12345abcde\n"  # this nonce, a malformed length
    + b"\x1etoolcell-end:" + NONCE.encode() + b":0x0\n"  # this nonce, a malformed status
    + HEAD[:-1] + b"\n"
)
PAYLOAD = b'{"files": [], "skipped": {"\x1etoolcell-end": 1}, "truncated": false}'
# The tool's output may end in the first bytes of a header or trailer, right before the host's real one.
BEFORE = b"hello\n" + NEAR_MISSES + HEAD[:-3]
AFTER = b"after the block \x1etoolcell-files\n\x1etoolcell-end:" + NONCE[:4].encode()
SAMPLE = BEFORE + files_block(PAYLOAD) + AFTER + TRAILER + b"dropped after the trailer"


def run(chunks: Iterable[bytes], cap: int = CAP) -> tuple[bytes, CallScanner]:
    scanner = CallScanner(NONCE, cap)
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    return out + scanner.flush(), scanner


def cuts(data: bytes, points: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_whole_sample() -> None:
    out, scanner = run([SAMPLE])
    assert out == BEFORE + AFTER
    assert scanner.files.payload == PAYLOAD and not scanner.files.refused
    assert scanner.done and scanner.status == 7


def test_every_split_point_gives_the_same_result() -> None:
    for i in range(len(SAMPLE) + 1):
        out, scanner = run(cuts(SAMPLE, [i]))
        assert (out, scanner.files.payload, scanner.status) == (BEFORE + AFTER, PAYLOAD, 7), i


def test_every_pair_of_split_points_gives_the_same_result() -> None:
    for i in range(0, len(SAMPLE) + 1, 3):
        for j in range(i, len(SAMPLE) + 1):
            out, scanner = run(cuts(SAMPLE, [i, j]))
            assert (out, scanner.files.payload, scanner.status) == (BEFORE + AFTER, PAYLOAD, 7), (i, j)


def test_byte_at_a_time_and_random_cuts() -> None:
    assert run([SAMPLE[i:i + 1] for i in range(len(SAMPLE))])[0] == BEFORE + AFTER
    rng = random.Random(18)
    for _ in range(300):
        points = rng.sample(range(len(SAMPLE) + 1), rng.randint(1, 12))
        out, scanner = run(cuts(SAMPLE, points))
        assert (out, scanner.files.payload, scanner.status) == (BEFORE + AFTER, PAYLOAD, 7), points


@pytest.mark.parametrize(("stream", "output", "payload"), [
    (b"", b"", None),
    (TRAILER, b"", None),
    (files_block(b"") + TRAILER, b"", b""),  # an empty block (length 0)
    (b"x" + files_block(b"abc") + TRAILER, b"x", b"abc"),
    (files_block(b"a" * CAP) + TRAILER, b"", b"a" * CAP),  # exactly at the cap
    # A second block is not the host's (it writes one): output.
    (files_block(b"1") + files_block(b"2") + TRAILER, files_block(b"2"), b"1"),
    # Blocks and trailers of another nonce are output.
    (files_block(b"1").replace(NONCE.encode(), OTHER.encode()) + TRAILER,
     files_block(b"1").replace(NONCE.encode(), OTHER.encode()), None),
])
def test_table(stream: bytes, output: bytes, payload: bytes | None) -> None:
    for chunks in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
        out, scanner = run(chunks)
        assert out == output
        assert scanner.files.payload == payload
        assert scanner.status == (7 if TRAILER in stream else None)


@pytest.mark.parametrize("split", [None, 1, 7, 4096])
def test_a_block_over_the_cap_is_refused_its_bytes_consumed_and_later_output_kept(split: int | None) -> None:
    block = files_block(b"z" * (CAP + 1))
    stream = b"before\n" + block + AFTER + TRAILER
    chunks = [stream] if split is None else [stream[i:i + split] for i in range(0, len(stream), split)]
    out, scanner = run(chunks)
    assert out == b"before\n" + AFTER
    assert scanner.files.payload is None
    assert str(CAP) in scanner.files.refused
    assert scanner.status == 7


def test_a_block_that_claims_10_gb_is_refused_without_holding_it() -> None:
    scanner = CallScanner(NONCE, CAP)
    assert scanner.feed(files_block(b"", length=9_999_999_999)) == b""
    for _ in range(16):  # 16 MiB of it: consumed, not output, not held
        assert scanner.feed(b"q" * MIB) == b""
    assert scanner.files.refused and scanner.files.payload is None
    assert scanner.feed(TRAILER) == b""  # still inside the block: not the end
    assert not scanner.done


def test_a_stream_cut_inside_the_block_has_no_payload() -> None:
    out, scanner = run([b"x" + files_block(b"abcdef")[:-2]])
    assert out == b"x"
    assert scanner.files.payload is None and not scanner.done


@pytest.mark.parametrize("tail", [HEAD, HEAD + b"00000", TRAILER[:-1], b"\x1etoolcell-", b"\x1e"])
def test_a_partial_header_at_the_end_of_the_stream_is_output(tail: bytes) -> None:
    scanner = CallScanner(NONCE, CAP)
    first = scanner.feed(b"out" + tail)
    assert first == b"out"  # held back: it could still be the header
    assert first + scanner.flush() == b"out" + tail


# -- the worst input at the cap --------------------------------------------------------------------------


WORST: dict[str, Callable[[int], bytes]] = {
    "record separators": lambda n: b"\x1e" * n,
    "header prefix repeated": lambda n: (HEAD * (n // len(HEAD) + 1))[:n],
    "header with a malformed length repeated": lambda n: ((HEAD + b"x" * 11) * (n // HEADER_BYTES + 1))[:n],
    "header one byte short repeated": lambda n: (HEAD[:-1] * (n // len(HEAD) + 1))[:n],
    "trailer prefix repeated": lambda n: ((TRAILER[:-5] + b":") * n)[:n],
    "trailer with a malformed status repeated": lambda n: ((TRAILER[:-4] + b"xyz\n") * n)[:n],
    "another nonce's headers": lambda n: ((files_block(b"").replace(NONCE.encode(), OTHER.encode())
                                           + TRAILER.replace(NONCE.encode(), OTHER.encode())) * n)[:n],
}


def timed_scan(data: bytes, chunk: int) -> tuple[float, bytes, int]:
    """Seconds to scan ``data`` in chunks of ``chunk``, the output, and the most ever held back."""
    scanner = CallScanner(NONCE, CAP)
    out = bytearray()
    held = 0
    started = time.perf_counter()
    for i in range(0, len(data), chunk):
        out += scanner.feed(data[i:i + chunk])
        held = max(held, min(i + chunk, len(data)) - len(out))
    out += scanner.flush()
    return time.perf_counter() - started, bytes(out), held


@pytest.mark.parametrize("name", sorted(WORST))
@pytest.mark.parametrize("chunk", [8 * MIB, 65536])
def test_worst_input_at_the_cap_is_linear_and_holds_back_little(name: str, chunk: int) -> None:
    big = WORST[name](8 * MIB)
    small = WORST[name](MIB)
    elapsed, out, held = timed_scan(big, chunk)
    assert out == big  # none of it is a header or a trailer of this call: all of it is output
    assert elapsed < 2.0, f"{name}: 8 MiB took {elapsed:.2f} s"
    # Roughly linear: 8x the input, nowhere near 64x the time (best of three for the small one).
    small_elapsed = min(timed_scan(small, chunk)[0] for _ in range(3))
    assert elapsed < 24 * small_elapsed + 0.05, f"{name}: 1 MiB {small_elapsed:.3f} s, 8 MiB {elapsed:.3f} s"
    # What is held back at any time is at most one header's worth (a files header here, a trailer there).
    assert held <= HEADER_BYTES + TRAILER_BYTES, held


@pytest.mark.parametrize("name", ["record separators", "header prefix repeated", "header one byte short repeated"])
def test_held_back_never_exceeds_the_header(name: str) -> None:
    data = WORST[name](64 * 1024)
    scanner = CallScanner(NONCE, CAP)
    fed = emitted = 0
    for size in (1, 2, 3, 5, 7, 11, 13, 61, 62, 63, 64, 65, 127, 1000):
        for i in range(0, len(data), size):
            piece = data[i:i + size]
            fed += len(piece)
            emitted += len(scanner.feed(piece))
            assert fed - emitted <= HEADER_BYTES, (size, i, fed - emitted)
    assert emitted + len(scanner.flush()) == fed


def test_trailer_scanner_worst_input_is_linear() -> None:
    data = ((TRAILER[:-4] + b"xyz\n") * (8 * MIB // len(TRAILER) + 1))[:8 * MIB]
    scanner = TrailerScanner(NONCE)
    started = time.perf_counter()
    out = scanner.feed(data) + scanner.flush()
    assert time.perf_counter() - started < 2.0
    assert out == data and not scanner.done
