"""Workspace files (issue 18): the in-sandbox writer and collector (run here, on tmp dirs) and the
supervisor's checks and parse of the hostile payload, each at its worst input."""

from __future__ import annotations

import ast
import base64
import json
import os
import runpy
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from toolcell.errors import InvalidArguments
from toolcell.model import InputFile, OutputFile, WorkspacePolicy
from toolcell.policy.scrub import Redactor
from toolcell.sessions.config import MAX_OUTPUT_BYTES
from toolcell.workspace import (
    BINARY_MEDIA_TYPE,
    TEXT_MEDIA_TYPE,
    CollectedFiles,
    check_inputs,
    encode_inputs,
    parse_collected,
    path_problem,
    payload_cap,
)

SOURCE = Path(__file__).resolve().parents[2] / "runtime" / "data" / "workspace.py"
WS: dict[str, Any] = runpy.run_path(str(SOURCE))
ws_write_inputs: Callable[[str, list[Any]], None] = WS["ws_write_inputs"]
ws_collect: Callable[[str, int, int, int], bytes] = WS["ws_collect"]

SECRET = "s3cr3t-Workspace-Value-42"
POLICY = WorkspacePolicy(outputs="/tmp/out")


def inp(path: str, data: bytes = b"x") -> dict[str, str]:
    return {"path": path, "data": base64.b64encode(data).decode()}


def collect(root: Path | str, files: int = 64, total: int = 8 << 20, per_file: int = 4 << 20) -> dict[str, Any]:
    payload = ws_collect(str(root), files, total, per_file)
    payload.decode("ascii")  # the payload is ASCII
    doc: dict[str, Any] = json.loads(payload)
    return doc


def tree(root: Path) -> list[str]:
    """Every path under root (not following symlinks), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"original")
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "ws"


# -- the in-sandbox module's shape ----------------------------------------------------------------

def test_source_is_only_imports_prefixed_defs_and_constants() -> None:
    """It is concatenated in front of the session host: nothing runs at import, every name is ws_/WS_."""
    module = ast.parse(SOURCE.read_text())
    for i, node in enumerate(module.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Import):
            assert all(alias.asname is None and "." not in alias.name for alias in node.names)
            assert all(alias.name in sys.stdlib_module_names for alias in node.names)
            continue
        if isinstance(node, ast.FunctionDef):
            assert node.name.startswith("ws_"), node.name
            continue
        assert isinstance(node, ast.Assign), ast.dump(node)
        assert all(isinstance(t, ast.Name) and t.id.startswith("WS_") for t in node.targets)


def test_runs_isolated_in_front_of_another_script(tmp_path: Path) -> None:
    """``python3 -I -S -c workspace + script``: the functions are globals of the script."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("hi")
    script = SOURCE.read_text() + "\nimport sys\nsys.stdout.buffer.write(ws_collect(sys.argv[1], 4, 100, 100))\n"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(tmp_path / "out")],
                          capture_output=True, timeout=30, check=True)
    doc = json.loads(done.stdout)
    assert [f["path"] for f in doc["files"]] == ["a.txt"]
    assert base64.b64decode(doc["files"][0]["data"]) == b"hi"


# -- ws_write_inputs ------------------------------------------------------------------------------

def test_round_trip_text_and_binary(root: Path) -> None:
    binary = bytes(range(256)) * 4
    ws_write_inputs(str(root), [inp("notes.txt", f"hello {SECRET}\n".encode()), inp("deep/er/blob.bin", binary),
                                inp("deep/x.png", b"\x89PNG\r\n\x1a\n\x00")])
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "notes.txt").stat().st_mode) == 0o600
    got = parse_collected(ws_collect(str(root), 64, 1 << 20, 1 << 20), POLICY, Redactor({"k": SECRET}))
    by_path = {f.path: f for f in got.files}
    assert [f.path for f in got.files] == ["deep/er/blob.bin", "deep/x.png", "notes.txt"]
    assert by_path["deep/er/blob.bin"] == OutputFile("deep/er/blob.bin", len(binary), data=binary)
    assert by_path["deep/x.png"].media_type == "image/png" and by_path["deep/x.png"].data.startswith(b"\x89PNG")
    notes = by_path["notes.txt"]
    assert notes.text == "hello [REDACTED:injected_secret]\n" and notes.data == b""
    assert notes.media_type == TEXT_MEDIA_TYPE and not notes.truncated
    assert got.redactions == {"injected_secret": 1} and not got.truncated and got.skipped == {}


def test_inputs_into_an_existing_workspace_and_no_inputs(root: Path) -> None:
    ws_write_inputs(str(root), [])
    assert root.is_dir()  # created even without inputs: the tool can work there
    ws_write_inputs(str(root), [inp("a/b")])
    ws_write_inputs(str(root), [inp("a/c")])  # an existing directory is entered
    assert tree(root) == ["a", "a/b", "a/c"]


BAD_INPUTS: list[tuple[str, list[Any]]] = [
    ("parent", [inp("../x")]),
    ("absolute", [inp("/abs")]),
    ("climbs back", [inp("a/../../b")]),
    ("dot", [inp("./a")]),
    ("empty component", [inp("a//b")]),
    ("trailing slash", [inp("a/")]),
    ("empty", [inp("")]),
    ("newline", [inp("a\nb")]),
    ("NUL", [inp("a\x00b")]),
    ("escape", [inp("a\x1b[31mb")]),
    ("C1 control", [inp("a\x9bb")]),
    ("backslash", [inp("a\\..\\b")]),
    ("lone surrogate", [inp("a\udcffb")]),
    ("too deep", [inp("/".join(["d"] * 17))]),
    ("component too long", [inp("x" * 256)]),
    ("component too long in UTF-8", [inp("\u00e9" * 128)]),
    ("path huge", [inp("a/" * 100_000 + "b")]),
    ("duplicate", [inp("a"), inp("a")]),
    ("not an object", ["a"]),
    ("path not a string", [{"path": 3, "data": ""}]),
    ("data not base64", [{"path": "a", "data": "!!!"}]),
    ("data not ASCII", [{"path": "a", "data": "\u00e9\u00e9\u00e9\u00e9"}]),
    ("data missing", [{"path": "a"}]),
    ("a good one first", [inp("ok"), inp("../x")]),
]


@pytest.mark.parametrize(("case", "inputs"), BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_before_anything_is_written(root: Path, outside: Path, case: str,
                                                           inputs: list[Any]) -> None:
    with pytest.raises(ValueError, match=r"^inputs\[\d\]") as info:
        ws_write_inputs(str(root), inputs)
    assert len(str(info.value)) < 120 and "\n" not in str(info.value)
    assert not root.exists() or tree(root) == []
    assert tree(outside.parent) == ["outside", "outside/victim"]


def test_refusal_never_echoes_the_data(root: Path) -> None:
    with pytest.raises(ValueError) as info:
        ws_write_inputs(str(root), [inp("../x", SECRET.encode()), {"path": "y", "data": SECRET + "!"}])
    assert SECRET not in str(info.value) and base64.b64encode(SECRET.encode()).decode() not in str(info.value)


def _plant_symlink_file(root: Path, outside: Path) -> str:
    (root / "f").symlink_to(outside / "victim")
    return "f"


def _plant_symlink_dir(root: Path, outside: Path) -> str:
    (root / "d").symlink_to(outside)
    return "d/victim2"


def _plant_deeper_symlink_dir(root: Path, outside: Path) -> str:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c").symlink_to(outside)
    return "a/b/c/new"


def _plant_dangling_symlink(root: Path, outside: Path) -> str:
    (root / "g").symlink_to(outside / "not-yet")
    return "g"


def _plant_fifo(root: Path, outside: Path) -> str:
    os.mkfifo(root / "p")
    return "p"


def _plant_file(root: Path, outside: Path) -> str:
    (root / "exists").write_bytes(b"mine")
    return "exists"


def _plant_file_as_dir(root: Path, outside: Path) -> str:
    (root / "file").write_bytes(b"mine")
    return "file/below"


PLANTED = [_plant_symlink_file, _plant_symlink_dir, _plant_deeper_symlink_dir, _plant_dangling_symlink,
           _plant_fifo, _plant_file, _plant_file_as_dir]


@pytest.mark.parametrize("plant", PLANTED, ids=[p.__name__[7:] for p in PLANTED])
def test_something_planted_in_the_way_is_refused_and_nothing_is_written_outside(
        root: Path, outside: Path, plant: Callable[[Path, Path], str]) -> None:
    """What the tool left in an earlier call of its session (a symlink out, a FIFO, a file) is never
    written through, and the writer never blocks."""
    root.mkdir()
    path = plant(root, outside)
    before = {p: p.read_bytes() if p.is_file() and not p.is_symlink() else None for p in root.rglob("*")}
    with pytest.raises(ValueError, match=r"^inputs\[0\]: not written"):
        ws_write_inputs(str(root), [inp(path, b"attacker")])
    assert sorted(os.listdir(outside)) == ["victim"] and (outside / "victim").read_bytes() == b"original"
    assert {p: p.read_bytes() if p.is_file() and not p.is_symlink() else None for p in root.rglob("*")} == before


def test_a_symlinked_workspace_root_is_refused(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "ws").symlink_to(outside)
    with pytest.raises(ValueError, match="workspace directory unusable"):
        ws_write_inputs(str(tmp_path / "ws"), [inp("x")])
    assert sorted(os.listdir(outside)) == ["victim"]


# -- ws_collect -----------------------------------------------------------------------------------

def test_missing_root_collects_nothing(tmp_path: Path) -> None:
    assert collect(tmp_path / "nope") == {"files": [], "skipped": {}, "truncated": False}


def test_a_symlinked_root_is_not_followed(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "out").symlink_to(outside)
    assert collect(tmp_path / "out") == {"files": [], "skipped": {"root": 1}, "truncated": False}


def test_symlinks_out_are_never_followed(root: Path, outside: Path) -> None:
    root.mkdir()
    (outside / "sub").mkdir()
    (outside / "sub" / "secret").write_bytes(b"host file")
    (root / "to-file").symlink_to(outside / "victim")
    (root / "to-dir").symlink_to(outside)
    (root / "to-sub").symlink_to(outside / "sub")
    (root / "mine").write_bytes(b"ok")
    doc = collect(root)
    assert [f["path"] for f in doc["files"]] == ["mine"]
    assert doc["skipped"] == {"symlink": 3}


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "fifo"


def _socket(path: Path) -> str:
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a relative name: tmp paths can be longer than sun_path
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
        sock.close()
    return "socket"


def _char_device(path: Path) -> str:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    return "device"


SPECIALS = [_fifo, _socket, _char_device]


@pytest.mark.parametrize("make", SPECIALS, ids=[m.__name__[1:] for m in SPECIALS])
def test_special_files_are_skipped_without_blocking(root: Path, make: Callable[[Path], str]) -> None:
    root.mkdir()
    (root / "regular").write_bytes(b"r")
    reason = make(root / "special")
    started = time.monotonic()
    doc = run_bounded(lambda: collect(root))
    assert time.monotonic() - started < 5
    assert [f["path"] for f in doc["files"]] == ["regular"]
    assert doc["skipped"] == {reason: 1}


def run_bounded(work: Callable[[], Any], timeout: float = 10.0) -> Any:
    """``work()`` in a thread: a collector blocked on a FIFO fails the test instead of hanging it."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(work()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the collector blocked"
    return out[0]


def test_a_file_swapped_for_a_fifo_after_the_listing_is_not_read(root: Path) -> None:
    """The listing said regular file; the open finds a FIFO: O_NONBLOCK + fstat, skipped, no block."""
    root.mkdir()
    os.mkfifo(root / "swapped")
    state: dict[str, Any] = {"files": [], "skipped": {}, "truncated": False, "bytes": 0, "max_files": 4,
                             "max_bytes": 100, "max_file_bytes": 100}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        run_bounded(lambda: WS["ws_copy_file"](fd, "swapped", "swapped", state))
    finally:
        os.close(fd)
    assert state["files"] == [] and state["skipped"] == {"fifo": 1}


def test_a_huge_sparse_file_costs_one_bounded_read(root: Path) -> None:
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        os.truncate(f.fileno(), 1 << 40)
    started = time.monotonic()
    doc = collect(root, per_file=1 << 20)
    assert time.monotonic() - started < 5
    (entry,) = doc["files"]
    assert entry["size"] == 1 << 40 and entry["truncated"] is True
    assert base64.b64decode(entry["data"]) == b"\0" * (1 << 20)
    assert doc["truncated"] is True


def test_five_thousand_files_keep_max_files_in_bounded_time(root: Path) -> None:
    root.mkdir()
    for i in range(5000):
        (root / f"f{i:05d}").write_bytes(b"x")
    started = time.monotonic()
    doc = collect(root, files=64)
    assert time.monotonic() - started < 5
    paths = [f["path"] for f in doc["files"]]
    assert len(paths) == 64 and paths == sorted(paths)
    assert doc["truncated"] is True
    # The entry budget (10 per file + 1000) stopped the listing: what it listed was kept or counted.
    assert doc["skipped"]["walk_limit"] == 1
    assert 64 + doc["skipped"]["too_many"] == 10 * 64 + 1000


def test_many_files_within_the_entry_budget_are_counted(root: Path) -> None:
    root.mkdir()
    for i in range(300):
        (root / f"f{i:03d}").write_bytes(b"x")
    doc = collect(root, files=10)
    assert [f["path"] for f in doc["files"]] == [f"f{i:03d}" for i in range(10)]
    assert doc["skipped"] == {"too_many": 290} and doc["truncated"] is True


def test_the_entry_budget_bounds_a_wide_tree_of_directories(root: Path) -> None:
    root.mkdir()
    for i in range(1200):
        (root / f"d{i:04d}").mkdir()
    doc = collect(root, files=1)
    assert doc["skipped"]["walk_limit"] == 1 and doc["truncated"] is True


NAMES = [
    ("a..b", True), ("..a", True), ("...", True), ("a b", True), ("\u00e9t\u00e9", True), ("-rf", True),
    ("a\nb", False), ("a\rb", False), ("a\x1b[31mb", False), ("a\x7fb", False), ("a\x85b", False),
    ("a\\b", False),
]


def test_clean_names_are_kept_and_unclean_ones_skipped(root: Path) -> None:
    root.mkdir()
    for name, _ in NAMES:
        (root / name).write_bytes(b"x")
    os.close(os.open(bytes(root) + b"/not-utf8-\xff", os.O_WRONLY | os.O_CREAT, 0o600))
    (root / "bad\ndir").mkdir()
    (root / "bad\ndir" / "inside").write_bytes(b"x")
    doc = collect(root)
    assert sorted(f["path"] for f in doc["files"]) == sorted(n for n, ok in NAMES if ok)
    assert doc["skipped"] == {"bad_name": sum(1 for _, ok in NAMES if not ok) + 2}


def test_the_total_byte_cap_spans_files(root: Path) -> None:
    root.mkdir()
    for name in ("a", "b", "c", "d"):
        (root / name).write_bytes(name.encode() * 100)
    doc = collect(root, total=250, per_file=1000)
    got = [(f["path"], len(base64.b64decode(f["data"])), f["size"], f["truncated"]) for f in doc["files"]]
    assert got == [("a", 100, 100, False), ("b", 100, 100, False), ("c", 50, 100, True), ("d", 0, 100, True)]
    assert doc["truncated"] is True


def test_the_per_file_cap(root: Path) -> None:
    root.mkdir()
    (root / "big").write_bytes(b"y" * 1000)
    (root / "small").write_bytes(b"z" * 10)
    doc = collect(root, per_file=100)
    got = [(f["path"], len(base64.b64decode(f["data"])), f["truncated"]) for f in doc["files"]]
    assert got == [("big", 100, True), ("small", 10, False)]


def test_depth_is_bounded(root: Path) -> None:
    deep = root
    for i in range(20):
        deep = deep / f"d{i}"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(b"x")
    doc = collect(root)
    depths = sorted(f["path"].count("/") + 1 for f in doc["files"])
    assert depths == list(range(2, 17))  # d0/f .. 15 directories + f: 16 components at most
    assert doc["skipped"] == {"too_deep": 1}


def test_empty_directories_and_order_are_deterministic(root: Path) -> None:
    for path in ("b/2", "a/1", "c", "a/0"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    (root / "empty").mkdir()
    first = ws_collect(str(root), 64, 1000, 1000)
    assert [f["path"] for f in json.loads(first)["files"]] == ["a/0", "a/1", "b/2", "c"]
    assert ws_collect(str(root), 64, 1000, 1000) == first


# -- supervisor: check_inputs, encode_inputs ------------------------------------------------------

SMALL = WorkspacePolicy(max_input_files=3, max_input_bytes=100)


def files(*paths: str, size: int = 1) -> tuple[InputFile, ...]:
    return tuple(InputFile(p, b"x" * size) for p in paths)


CHECKS: list[tuple[str, tuple[InputFile, ...], str, str]] = [
    ("too many", files("a", "b", "c", "d"), "files", "at most 3 files"),
    ("too large", files("a", "b", size=51), "files", "at most 100 bytes"),
    ("parent", files("../x"), "files[0].path", "'..'"),
    ("absolute", files("ok", "/abs"), "files[1].path", "relative"),
    ("climbs", files("a/../../b"), "files[0].path", "'..'"),
    ("newline", files("a\nb"), "files[0].path", "control"),
    ("NUL", files("a\x00b"), "files[0].path", "control"),
    ("escape", files("\x1b[2J"), "files[0].path", "control"),
    ("backslash", files("a\\b"), "files[0].path", "backslash"),
    ("surrogate", files("a\udcff"), "files[0].path", "surrogate"),
    ("too deep", files("/".join("d" * 17)), "files[0].path", "more than 16 components"),
    ("component", files("x" * 256), "files[0].path", "longer than 255 bytes"),
    ("long", files("x" * 100_000), "files[0].path", "longer than 4096"),
    ("empty", files(""), "files[0].path", "non-empty"),
    ("trailing slash", files("a/"), "files[0].path", "empty"),
    ("duplicate", files("a", "b", "a"), "files[2].path", "is also files[0].path"),
    ("file and directory", files("a/b", "a"), "files[0].path", "is files[1].path"),
]


@pytest.mark.parametrize(("case", "given", "path", "message"), CHECKS, ids=[c[0] for c in CHECKS])
def test_check_inputs_refuses(case: str, given: tuple[InputFile, ...], path: str, message: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        check_inputs(given, SMALL)
    assert info.value.path == path
    assert message in str(info.value)
    assert len(str(info.value)) < 160  # never more than a short quoted part of a name
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_check_inputs_accepts_the_limits_exactly() -> None:
    check_inputs(files("a", "b/c", "b/d", size=33), SMALL)
    check_inputs(files("/".join(["d"] * 15 + ["x" * 255])), SMALL)
    check_inputs(files("a..b", "\u00e9", ".hidden"), SMALL)
    check_inputs((), SMALL)


def test_encode_inputs_round_trips_through_the_writer(root: Path) -> None:
    given = (InputFile("t.txt", b"text"), InputFile("d/b.bin", bytes(range(256))))
    encoded = encode_inputs(given)
    assert encoded == [{"path": "t.txt", "data": "dGV4dA=="},
                       {"path": "d/b.bin", "data": base64.b64encode(bytes(range(256))).decode()}]
    ws_write_inputs(str(root), list(encoded))
    assert (root / "t.txt").read_bytes() == b"text" and (root / "d" / "b.bin").read_bytes() == bytes(range(256))


PATHS = ["a", "a/b", "a..b", ".hidden", "\u00e9", "/".join(["d"] * 16), "x" * 255, "\u00e9" * 127,
         "", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "a\nb", "a\tb", "a\x7fb", "a\x9bb", "a\\b",
         "a\udcff", "/".join(["d"] * 17), "x" * 256, "\u00e9" * 128, "x" * 5000]


@pytest.mark.parametrize("path", PATHS)
def test_both_halves_agree_on_clean_paths(path: str) -> None:
    """What the supervisor lets through, the sandbox writes; what it refuses, the sandbox refuses too."""
    try:
        WS["ws_split"](path)
        sandbox_ok = True
    except ValueError:
        sandbox_ok = False
    assert (path_problem(path) is None) == sandbox_ok


# -- supervisor: payload_cap and parse_collected --------------------------------------------------

def payload(entries: list[Any], skipped: Any = None, truncated: Any = False) -> bytes:
    doc = {"files": entries, "skipped": {} if skipped is None else skipped, "truncated": truncated}
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode()


def entry(path: str, data: bytes, size: int | None = None, truncated: bool = False) -> dict[str, Any]:
    return {"path": path, "size": len(data) if size is None else size, "data": base64.b64encode(data).decode(),
            "truncated": truncated}


def parse(raw: bytes, policy: WorkspacePolicy = POLICY, redactor: Redactor | None = None) -> CollectedFiles:
    return parse_collected(raw, policy, redactor or Redactor({"k": SECRET}))


def test_payload_cap_holds_the_largest_honest_payload() -> None:
    """Every file at the longest path of astral characters (12 ASCII characters per 4 bytes), the bytes
    split so that each file's base64 is padded: the honest worst case fits."""
    policy = WorkspacePolicy(max_output_files=8, max_output_bytes=1001, max_file_bytes=1001)
    component = "\U0001f600" * 63  # 252 bytes
    longest = "/".join([component] * 15 + ["\U0001f600" * 63 + "abc"])
    reasons = {r: 1 << 30 for r in ("symlink", "fifo", "socket", "device", "other", "bad_name", "too_deep",
                                    "too_many", "unreadable", "vanished", "walk_limit", "root")}
    entries = [entry(longest + str(i), b"x" * (1001 // 8 + (i == 0)), size=1 << 40, truncated=True)
               for i in range(8)]
    raw = payload(entries, reasons, True)
    assert len(raw) <= payload_cap(policy)
    assert len(raw) > payload_cap(policy) // 2  # and the cap is not loose by orders of magnitude


def test_payload_cap_grows_with_the_policy() -> None:
    assert payload_cap(POLICY) >= 4 * POLICY.max_output_bytes // 3
    assert payload_cap(POLICY) < 2 * POLICY.max_output_bytes


def test_secrets_in_text_are_redacted_and_binary_is_kept() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    got = parse(payload([entry("out/report.txt", f"token {SECRET} and \x1b[31mred\x1b[0m\n".encode()),
                         entry("img.png", png), entry("page.html", b"\xff\xfe<html>"),
                         entry("archive.tar.gz", b"\x1f\x8b\x08\x00")]))
    by_path = {f.path: f for f in got.files}
    assert by_path["out/report.txt"].text == "token [REDACTED:injected_secret] and red\n"
    assert by_path["out/report.txt"].media_type == TEXT_MEDIA_TYPE
    assert by_path["img.png"] == OutputFile("img.png", len(png), data=png, media_type="image/png")
    assert by_path["page.html"].media_type == BINARY_MEDIA_TYPE  # never a textual type for bytes
    assert by_path["archive.tar.gz"].media_type == "application/gzip"
    assert got.redactions == {"injected_secret": 1} and got.sanitized == {"ansi_escape": 2}
    assert got.skipped == {} and not got.truncated


def test_a_secret_inside_a_binary_file_withholds_it() -> None:
    got = parse(payload([entry("dump.bin", b"\x00\xff" + SECRET.encode() + b"\x00"), entry("ok.bin", b"\x00\xff")]))
    assert [f.path for f in got.files] == ["ok.bin"]
    assert got.skipped == {"secret_in_binary": 1} and got.redactions == {"injected_secret": 1}


def test_a_truncated_text_cut_inside_a_character_is_still_text() -> None:
    data = "\u00e9t\u00e9".encode()[:-1]  # the last character's first byte only
    (f,) = parse(payload([entry("a.txt", data, size=10, truncated=True)])).files
    assert f.text == "\u00e9t" and f.truncated and f.size == 10


def test_a_short_read_marks_the_file_truncated() -> None:
    (f,) = parse(payload([entry("a.txt", b"abc", size=100)])).files
    assert f.truncated and f.text == "abc"


HOSTILE_ENTRIES: list[tuple[str, Any, str]] = [
    ("not an object", "x", "invalid"),
    ("no path", {"size": 1, "data": "eA==", "truncated": False}, "bad_name"),
    ("size not int", {**entry("a", b"x"), "size": "1"}, "invalid"),
    ("size bool", {**entry("a", b"x"), "size": True}, "invalid"),
    ("size negative", {**entry("a", b"x"), "size": -1}, "invalid"),
    ("size float", {**entry("a", b"x"), "size": 1.0}, "invalid"),
    ("truncated not bool", {**entry("a", b"x"), "truncated": 1}, "invalid"),
    ("data not str", {**entry("a", b"x"), "data": [1]}, "invalid"),
    ("data not base64", {**entry("a", b"x"), "data": "!!!!"}, "invalid"),
    ("data not ASCII", {**entry("a", b"x"), "data": "\u00e9\u00e9\u00e9\u00e9"}, "invalid"),
    ("more data than size", entry("a", b"xyz", size=2), "invalid"),
    ("parent", entry("../etc/passwd", b"x"), "bad_name"),
    ("absolute", entry("/etc/passwd", b"x"), "bad_name"),
    ("newline", entry("a\nb", b"x"), "bad_name"),
    ("escape", entry("\x1b]8;;http://x\x07a", b"x"), "bad_name"),
    ("bidi override", entry("evil\u202etxt.exe", b"x"), "bad_name"),
    ("zero width", entry("a\u200bb", b"x"), "bad_name"),
    ("full width", entry("\uff41", b"x"), "bad_name"),
    ("surrogate", entry("a\udcff", b"x"), "bad_name"),
    ("too deep", entry("/".join("d" * 17), b"x"), "bad_name"),
    ("secret in the name", entry(f"out/{SECRET}.txt", b"x"), "secret_in_name"),
    ("over the file cap", entry("big", b"x" * 101), "over_cap"),
]


@pytest.mark.parametrize(("case", "item", "reason"), HOSTILE_ENTRIES, ids=[c[0] for c in HOSTILE_ENTRIES])
def test_hostile_entries_are_skipped_and_counted(case: str, item: Any, reason: str) -> None:
    policy = WorkspacePolicy(max_file_bytes=100)
    got = parse(payload([item, entry("good", b"g")]), policy)
    assert [f.path for f in got.files] == ["good"]
    assert got.skipped == {reason: 1}
    assert got.truncated == (reason == "over_cap")


def test_duplicates_too_many_and_the_total_cap() -> None:
    policy = WorkspacePolicy(max_output_files=3, max_output_bytes=250, max_file_bytes=200)
    got = parse(payload([entry("a", b"a" * 100), entry("a", b"b"), entry("b", b"b" * 100),
                         entry("c", b"c" * 100), entry("d", b"d"), entry("e", b"e"), entry("f", b"f")]), policy)
    assert [f.path for f in got.files] == ["a", "b", "d"]
    assert got.skipped == {"duplicate": 1, "over_cap": 1, "too_many": 2} and got.truncated


def test_the_sandbox_counts_are_merged_and_checked() -> None:
    got = parse(payload([entry("a", b"x")], {"symlink": 2, "fifo": 1}, True))
    assert got.skipped == {"symlink": 2, "fifo": 1} and got.truncated and len(got.files) == 1
    for hostile in ({"x" * 100: 1}, {"Bad-Key": 1}, {"ok": -1}, {"ok": True}, {"ok": 1 << 40}, [1],
                    {f"k{i}": 1 for i in range(1000)}):
        got = parse(payload([entry("a", b"x")], hostile))
        assert got.skipped == {"invalid": 1} and len(got.files) == 1, hostile


INVALID_PAYLOADS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not JSON", b"not json"),
    ("not ASCII", payload([entry("a", b"x")]).replace(b'"a"', b'"\xc3\xa9"')),
    ("a list", b"[]"),
    ("files missing", b'{"skipped": {}, "truncated": false}'),
    ("files not a list", b'{"files": {}, "skipped": {}, "truncated": false}'),
    ("truncated missing", b'{"files": [], "skipped": {}}'),
    ("a huge number", b'{"files": [], "skipped": {}, "truncated": false, "x": ' + b"9" * 100_000 + b"}"),
    ("NUL", b"\x00" * 1000),
]


@pytest.mark.parametrize(("case", "raw"), INVALID_PAYLOADS, ids=[c for c, _ in INVALID_PAYLOADS])
def test_an_invalid_payload_is_reported_not_raised(case: str, raw: bytes) -> None:
    assert parse(raw) == CollectedFiles((), {"invalid_payload": 1}, True)


def _over_the_cap() -> bytes:
    return payload([entry("a", b"x")]) + b" " * payload_cap(POLICY)


def _garbage_at_the_cap() -> bytes:
    return os.urandom(payload_cap(POLICY))


def _ascii_garbage_at_the_cap() -> bytes:
    return bytes(b % 95 + 32 for b in os.urandom(payload_cap(POLICY)))


def _nested_at_the_cap() -> bytes:
    return b"[" * payload_cap(POLICY)


def _nested_objects_at_the_cap() -> bytes:
    half = payload_cap(POLICY) // 8
    return b'{"files":' + b'{"a":' * half + b"1" + b"}" * half + b',"truncated":false}'


WORST = [_over_the_cap, _garbage_at_the_cap, _ascii_garbage_at_the_cap, _nested_at_the_cap,
         _nested_objects_at_the_cap]


@pytest.mark.parametrize("make", WORST, ids=[m.__name__[1:] for m in WORST])
def test_the_worst_payloads_at_the_cap(make: Callable[[], bytes]) -> None:
    raw = make()
    started = time.process_time()
    assert parse(raw) == CollectedFiles((), {"invalid_payload": 1}, True)
    assert time.process_time() - started < 2


def _tiny_entries(n: int, fill: Callable[[int], Any]) -> Iterator[Any]:
    return (fill(i) for i in range(n))


def test_a_hundred_thousand_tiny_entries() -> None:
    """Invalid entries, then valid ones past max_output_files: counted one by one, in linear time (under a
    policy whose cap lets 100,000 entries in: the most the config allows, MAX_OUTPUT_BYTES)."""
    policy = WorkspacePolicy(outputs="/tmp/out", max_output_bytes=MAX_OUTPUT_BYTES)
    invalid = payload(list(_tiny_entries(100_000, lambda i: {})))
    assert len(invalid) <= payload_cap(policy)
    started = time.process_time()
    got = parse(invalid, policy)
    assert got.skipped == {"invalid": 100_000} and got.files == ()
    many = payload(list(_tiny_entries(100_000, lambda i: entry(f"f{i}", b""))))
    assert len(many) <= payload_cap(policy)
    got = parse(many, policy)
    assert len(got.files) == policy.max_output_files
    assert got.skipped == {"too_many": 100_000 - policy.max_output_files} and got.truncated
    assert time.process_time() - started < 5


def test_the_largest_text_payload_is_scrubbed_within_bounds() -> None:
    """max_output_bytes of text full of escapes and secrets, in files at the per-file cap."""
    policy = WorkspacePolicy(max_output_files=4, max_output_bytes=2 << 20, max_file_bytes=1 << 20)
    line = f"\x1b[1m{SECRET}\x1b[0m \u202e ghp_{'a' * 36}\n".encode()
    body = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
    raw = payload([entry(f"t{i}.txt", body) for i in range(2)])
    assert len(raw) <= payload_cap(policy)
    started = time.process_time()
    got = parse(raw, policy)
    assert time.process_time() - started < 20
    assert len(got.files) == 2 and all(f.text is not None and SECRET not in f.text for f in got.files)
    assert got.redactions["injected_secret"] >= 2 * ((1 << 20) // len(line))
