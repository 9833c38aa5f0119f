"""toolcell MCP driver: runs inside a sandbox, in front of a stock stdio MCP server (issue 16).

Started as ``python3 -I -c <this source> -- <server argv>``. It spawns the server (its stdin and stdout
pipes only this driver holds, its stderr the sandbox's), runs ``initialize`` and
``notifications/initialized`` at once (so a pooled sandbox is warm), then reads ONE JSON request line
on stdin::

    {"op": "list", "max_line": N}
    {"op": "call", "name": "<tool>", "arguments": {...}, "max_line": N, "roots": [{"uri": .., "name": ..}] | null}

and reports on stdout as frames, one JSON object per line, each written whole::

    {"progress": {"progress": x, "total": y, "message": "..."}}   while a call runs (total/message optional)
    {"refused": {"method": "..."}}                                 a server->client request refused
    {"tools": [...], "server": {"name": .., "version": ..}, "instructions": ".."}   final (list)
    {"result": {...}}                                              final (call): the server's CallToolResult
    {"error": {"code": N, "message": "..", "data": ..}}            final: the server's JSON-RPC error, or ours

Exit status: 0 after tools/result/the server's JSON-RPC error, 1 after a failure this driver detected
(an error frame with code -32000 and a message of its own: server bytes are never quoted in it), 143 after
SIGTERM/SIGINT/SIGHUP (a request in flight is cancelled with ``notifications/cancelled`` first).

``--session`` (before ``--``; a session's resident tool, issue 18): the server is started and initialized
once, then request lines are served one after another, the server's state kept across them. After each
request's final frame is on stdout, ``NNN\n`` (the status a one-shot run would exit with: 0, or 1 for a
malformed request) is written to the fd named by env TOOLCELL_CALL_FD, and the next line is read. EOF on
stdin ends the session: the server is reaped, exit 0. Any other failure (the server's, a lost stdout or
call fd), and a signal, end it as in a one-shot run: a final error frame, exit 1 or 143, no status line.

Everything the server writes is hostile: its stdout is read in bounded lines (``max_line``, 1 MiB until
the request says otherwise), numbers must be finite, ids must match, batches are refused, and at most
100 server->client requests are answered ("ping" with {}, "roots/list" with the request's roots when it
carried some, everything else refused). The server is always reaped: stdin closed, up to 1 s, SIGKILL.
Output (frames on stdout, the server's log notifications on stderr) goes through one writer thread, so
a reader that stops reading never stops this driver from handling a signal, and queued progress frames
collapse into the latest one.

Standard library only; kept small: it is passed with ``python3 -c``.
"""
import collections
import contextlib
import json
import math
import os
import select
import signal
import subprocess  # nosec B404
import sys
import threading
import time
import typing

PROTOCOL = "2025-06-18"
ACCEPTED = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
VERSION = "0.1.0"
DEFAULT_MAX_LINE = 1 << 20
MAX_REQUEST = 64 << 20  # the request line from the supervisor
MAX_SERVER_REQUESTS = 100
MAX_PAGES = 100
MAX_ID = 256  # characters of a server's string request id we echo back
LOG_LINE = 4096
MAX_QUEUED_LOGS = 64
CHUNK = 65536
GRACE = 1.0
FAILED, CANCELLED = 1, 143
DRIVER_ERROR = -32000
REFUSED = {"code": -32601, "message": "refused by toolcell: server-to-client requests are not allowed"}
PROGRESS_TOKEN = 1
Message = dict[str, typing.Any]


class Failure(Exception):
    """A failure this driver detected: an error frame with this (driver-written) message, exit 1."""


class Malformed(Failure):
    """The request line is not a request (the caller's fault: a session goes on)."""


class NoRequest(Failure):
    """Stdin ended before a request line (a session's normal end)."""


class Signalled(Exception):
    """SIGTERM/SIGINT/SIGHUP arrived."""


def write_all(fd: int, data: bytes) -> bool:
    """Write every byte, over short writes; False once ``fd`` is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except (BlockingIOError, InterruptedError):
            select.select([], [fd], [])
        except OSError:
            return False
    return True


def encode(obj: object) -> bytes:
    """One frame line. UTF-8 as is (an escaped emoji is 12 bytes for 4: a result near the cap would no longer
    fit it). Control characters, and so newlines, are always escaped by json.dumps."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # A lone surrogate (a server's "\\ud800") is no UTF-8 and no text: replaced, as invalid output bytes are.
    return text.encode("utf-8", "replace") + b"\n"


def finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def no_constants(text: str) -> typing.NoReturn:
    raise ValueError("NaN/Infinity")


def parse(line: bytes) -> object:
    """JSON with finite numbers only, or ValueError."""
    try:
        return json.loads(line.decode("utf-8"), parse_float=finite, parse_constant=no_constants)
    except RecursionError as exc:
        raise ValueError("too deep") from exc


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


class Outbox(threading.Thread):
    """The one writer of stdout (frames) and stderr (log lines): each item written whole, in order. A
    progress frame replaces a queued one; log lines beyond ``MAX_QUEUED_LOGS`` queued are dropped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.cond = threading.Condition()
        self.items: collections.deque[tuple[int, bytes, str]] = collections.deque()
        self.busy = False
        self.live = {1: True, 2: True}

    def put(self, fd: int, data: bytes, kind: str = "") -> None:
        with self.cond:
            if kind == "progress" and self.items and self.items[-1][2] == "progress":
                self.items[-1] = (fd, data, kind)
            elif kind == "log" and sum(1 for item in self.items if item[2] == "log") >= MAX_QUEUED_LOGS:
                return
            else:
                self.items.append((fd, data, kind))
            self.cond.notify_all()

    def frame(self, obj: object, kind: str = "") -> None:
        self.put(1, encode(obj), kind)

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                fd, data, _ = self.items.popleft()
                self.busy = True
            if self.live[fd]:
                self.live[fd] = write_all(fd, data)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def drained(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.items and not self.busy, timeout)


class Lines:
    """Split a byte stream into lines of at most ``limit`` bytes (newline excluded), in linear time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        lines, start = [], 0
        while (end := data.find(b"\n", start)) >= 0:
            if len(self.buf) + end - start > self.limit:
                raise OverflowError
            lines.append(bytes(self.buf) + data[start:end])
            self.buf.clear()
            start = end + 1
        self.buf += data[start:]
        if len(self.buf) > self.limit:
            raise OverflowError
        return lines


class Driver:
    def __init__(self, session: bool = False) -> None:
        self.outbox = Outbox()
        self.signalled = 0
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake select via the wakeup fd
        self.outbox.start()
        self.phase = "during start-up"
        self.proc: subprocess.Popen[bytes] | None = None
        self.to_server: typing.IO[bytes] | None = None
        self.from_server = -1
        self.pending = bytearray()  # for the server's stdin
        self.lines = Lines(DEFAULT_MAX_LINE)
        self.inbox: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.exited = False
        self.request_lines = Lines(MAX_REQUEST)
        self.requests: collections.deque[bytes] = collections.deque()
        self.stdin_eof = False
        self.server_requests = 0
        self.in_flight: int | None = None  # our outstanding request id (tools/list, tools/call)
        self.calling = False
        self.token = PROGRESS_TOKEN  # the progress token of the call in flight: its request id
        self.roots: list[typing.Any] | None = None
        self.next_id = 1
        # The launcher's readiness pipe (pooled sandboxes), never the server's: taken out of the environment.
        named = os.environ.pop("TOOLCELL_READY_FD", "")
        self.ready_fd = int(named) if named.isdigit() else -1
        self.session = session
        self.call_fd = -1  # a session's: where each call's status line goes; taken out of the environment too
        if session:
            named = os.environ.pop("TOOLCELL_CALL_FD", "")
            self.call_fd = int(named) if named.isdigit() else -1

    def spawn(self, command: list[str]) -> None:
        """The server, its stdin and stdout pipes ours (non-blocking), its stderr and environment ours too."""
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE,  # noqa: S603 # nosec B603
                                         stdout=subprocess.PIPE, close_fds=True)
        except (OSError, ValueError) as exc:
            raise Failure(f"the server could not be started ({type(exc).__name__})") from None
        if self.proc.stdin is None or self.proc.stdout is None:
            raise Failure("the server could not be started (no pipes)")
        self.to_server = self.proc.stdin
        self.from_server = self.proc.stdout.fileno()
        os.set_blocking(self.to_server.fileno(), False)
        os.set_blocking(self.from_server, False)

    def on_signal(self, signum: int, frame: object) -> None:
        self.signalled = self.signalled or signum

    # --- I/O: one select step over the server's pipes, our stdin (when wanted) and the wakeup fd ---

    def send(self, message: Message) -> None:
        if self.to_server is not None:
            self.pending += encode({"jsonrpc": "2.0", **message})

    def step(self, want_stdin: bool = False) -> None:
        if self.signalled:
            raise Signalled
        readers = [self.wake_r] + ([] if self.eof else [self.from_server])
        readers += [0] if want_stdin and not self.stdin_eof else []
        writers = [self.to_server.fileno()] if self.pending and self.to_server is not None else []
        ready_r, ready_w, _ = select.select(readers, writers, [], GRACE)
        if self.wake_r in ready_r:
            with contextlib.suppress(OSError):
                os.read(self.wake_r, 512)
        if self.signalled:
            raise Signalled
        if ready_w and self.to_server is not None:
            self.flush_some(self.to_server)
        if self.from_server in ready_r:
            self.read_server()
        if 0 in ready_r:
            data = os.read(0, CHUNK)
            try:
                self.requests.extend(self.request_lines.feed(data or b"\n"))  # EOF ends a last line
            except OverflowError:
                raise Failure("the request is too long") from None
            self.stdin_eof = not data
        if not self.exited and self.proc is not None and self.proc.poll() is not None:
            self.read_server(drain=True)  # everything it wrote is in the pipe now
            self.exited = True

    def flush_some(self, to_server: typing.IO[bytes]) -> None:
        try:
            del self.pending[:os.write(to_server.fileno(), self.pending[:CHUNK])]
        except BlockingIOError:
            pass
        except OSError:  # the server closed its stdin: what it did not read is lost; its exit tells
            self.pending.clear()

    def read_server(self, drain: bool = False) -> None:
        for _ in range(64 if drain else 1):
            try:
                data = os.read(self.from_server, CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            try:
                self.inbox.extend(self.lines.feed(data))
            except OverflowError:
                raise Failure(f"the server wrote a message over {self.lines.limit} bytes") from None

    def gone(self) -> None:
        """The server's output ended (or it exited) with nothing left to read: fail, naming the phase."""
        if self.proc is None:
            raise Failure(f"the server is gone {self.phase}")
        try:
            status = self.proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            raise Failure(f"the server closed its output {self.phase}") from None
        raise Failure(f"the server exited {self.phase} (status {exit_status(status)})")

    def message(self, want_stdin: bool = False) -> Message | None:
        """The server's next message (None when a request line arrived on our stdin first)."""
        while True:
            while self.inbox:
                line = self.inbox.popleft()
                if line.strip():
                    return self.check(line)
            while want_stdin and self.requests and not self.requests[0].strip():
                self.requests.popleft()
            if want_stdin and self.requests:
                return None
            if self.eof or self.exited:
                self.gone()
            self.step(want_stdin)
            if want_stdin and self.stdin_eof and not self.requests:
                raise NoRequest("no request arrived")

    @staticmethod
    def check(line: bytes) -> Message:
        try:
            message = parse(line)
        except ValueError:
            raise Failure("the server wrote invalid JSON-RPC (not JSON)") from None
        if isinstance(message, list):
            raise Failure("the server wrote invalid JSON-RPC (a batch)")
        if not isinstance(message, dict):
            raise Failure("the server wrote invalid JSON-RPC (not an object)")
        if message.get("jsonrpc") != "2.0":
            raise Failure("the server wrote invalid JSON-RPC (no jsonrpc 2.0)")
        return message

    # --- protocol ---

    def request(self, method: str, params: Message, phase: str) -> Message:
        """Send a request and handle the server's messages until its response: its result, or a
        ServerError carrying the server's JSON-RPC error."""
        if method == "initialize":
            ident = 0
        else:
            ident, self.next_id = self.next_id, self.next_id + 1
            self.in_flight = ident
        self.phase = phase
        self.send({"id": ident, "method": method, "params": params})
        while True:
            message = self.message()
            if message is None:  # only when waiting for the request too
                continue
            if "method" in message:
                self.handle(message)
                continue
            if message.get("id") != ident or type(message.get("id")) is not int:
                raise Failure("the server wrote invalid JSON-RPC (a response to no request)")
            self.in_flight = None
            if isinstance(message.get("result"), dict) and "error" not in message:
                return typing.cast(Message, message["result"])
            error = message.get("error")
            if isinstance(error, dict) and type(error.get("code")) is int and isinstance(error.get("message"), str):
                raise ServerError({k: error[k] for k in ("code", "message", "data") if k in error})
            raise Failure("the server wrote invalid JSON-RPC (a malformed response)")

    def handle(self, message: Message) -> None:
        """A notification or a request from the server."""
        method, params = message.get("method"), message.get("params")
        params = params if isinstance(params, dict) else {}
        if not isinstance(method, str):
            raise Failure("the server wrote invalid JSON-RPC (a method that is not a string)")
        if "id" not in message:
            self.notification(method, params)
            return
        ident = message["id"]
        if not (type(ident) is int or (isinstance(ident, str) and len(ident) <= MAX_ID)):
            raise Failure("the server wrote invalid JSON-RPC (a request with a bad id)")
        self.server_requests += 1
        if self.server_requests > MAX_SERVER_REQUESTS:
            raise Failure(f"the server sent over {MAX_SERVER_REQUESTS} requests to the client")
        if method == "ping":
            self.send({"id": ident, "result": {}})
        elif method == "roots/list" and self.roots is not None:
            self.send({"id": ident, "result": {"roots": self.roots}})
        else:
            self.send({"id": ident, "error": REFUSED})
            if self.in_flight is not None:
                self.outbox.frame({"refused": {"method": method[:64]}})

    def notification(self, method: str, params: Message) -> None:
        if method == "notifications/progress" and self.calling:
            token, progress, total = params.get("progressToken"), params.get("progress"), params.get("total")
            if type(token) is not int or token != self.token or not is_number(progress):
                return
            frame: Message = {"progress": progress}
            if is_number(total):
                frame["total"] = total
            if isinstance(params.get("message"), str):
                frame["message"] = params["message"]
            self.outbox.frame({"progress": frame}, "progress")
        elif method == "notifications/message":
            level, logger = params.get("level"), params.get("logger")
            text = "[{}] {}: {}".format(
                json.dumps(level if isinstance(level, str) else "?")[1:-1][:32],
                json.dumps(logger if isinstance(logger, str) else "-")[1:-1][:128],
                json.dumps(params.get("data"), ensure_ascii=True))
            self.outbox.put(2, text.encode()[:LOG_LINE] + b"\n", "log")

    def initialize(self) -> Message:
        try:
            result = self.request("initialize", {
                "protocolVersion": PROTOCOL, "capabilities": {},
                "clientInfo": {"name": "toolcell", "version": VERSION}}, "during initialize")
        except ServerError:
            raise Failure("the server answered initialize with an error") from None
        if result.get("protocolVersion") not in ACCEPTED:
            raise Failure("the server's protocol version is not supported")
        self.send({"method": "notifications/initialized"})
        self.ready()
        return result

    def ready(self) -> None:
        """Tell a pooled sandbox's launcher the server is initialized (``--tool-ready``): one byte, then let go."""
        fd, self.ready_fd = self.ready_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"r")
            with contextlib.suppress(OSError):
                os.close(fd)

    def read_request(self) -> Message:
        self.phase = "before the request arrived"
        while True:
            message = self.message(want_stdin=True)
            if message is None:
                break
            if "method" not in message:
                raise Failure("the server wrote invalid JSON-RPC (a response to no request)")
            self.handle(message)
        try:
            request = parse(self.requests.popleft())
        except ValueError:
            request = None
        if not isinstance(request, dict) or request.get("op") not in ("list", "call"):
            raise Malformed("the request is malformed")
        max_line = request.get("max_line", DEFAULT_MAX_LINE)
        roots = request.get("roots")
        if type(max_line) is not int or max_line < 1 or not (roots is None or isinstance(roots, list)):
            raise Malformed("the request is malformed")
        if request["op"] == "call" and not (isinstance(request.get("name"), str)
                                            and isinstance(request.get("arguments", {}), dict)):
            raise Malformed("the request is malformed")
        self.lines.limit = max_line
        self.roots = roots
        return request

    def list_tools(self, server: Message, max_line: int) -> Message:
        tools: list[typing.Any] = []
        size, params = 0, typing.cast(Message, {})
        for _ in range(MAX_PAGES):
            page = self.request("tools/list", params, "before answering tools/list")
            if not isinstance(page.get("tools"), list):
                raise Failure("the server's tools/list result is malformed")
            size += len(encode(page["tools"]))
            if size > max_line:
                raise Failure(f"the server's tools list is over {max_line} bytes")
            tools += page["tools"]
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
            params = {"cursor": cursor}
        else:
            raise Failure(f"the server's tools/list has over {MAX_PAGES} pages")
        info = server.get("serverInfo")
        info = info if isinstance(info, dict) else {}
        frame: Message = {"tools": tools, "server": {
            key: info[key] if isinstance(info.get(key), str) else "" for key in ("name", "version")}}
        if isinstance(server.get("instructions"), str):
            frame["instructions"] = server["instructions"]
        return frame

    def call_tool(self, request: Message) -> Message:
        self.calling, self.token = True, self.next_id  # a late progress of an earlier call is not this one's
        try:
            result = self.request("tools/call", {
                "name": request["name"], "arguments": request.get("arguments", {}),
                "_meta": {"progressToken": self.token}}, "before answering tools/call")
        finally:
            self.calling = False
        return {"result": result}

    def answer(self, server: Message, request: Message) -> Message:
        if request["op"] == "list":
            return self.list_tools(server, request.get("max_line", DEFAULT_MAX_LINE))
        return self.call_tool(request)

    def run(self, command: list[str]) -> Message | None:
        """The final frame (one-shot), or None: a session that ended with stdin, every request answered."""
        if self.session and self.call_fd < 0:
            raise Failure("--session needs TOOLCELL_CALL_FD")
        self.spawn(command)
        server = self.initialize()
        if not self.session:
            return self.answer(server, self.read_request())
        while True:
            status = 0
            try:
                final = self.answer(server, self.read_request())
            except NoRequest:
                return None
            except Malformed as exc:
                final, status = {"error": {"code": DRIVER_ERROR, "message": str(exc)}}, FAILED
            except ServerError as exc:
                final = {"error": exc.error}
            self.deliver(final, status)
            self.server_requests = 0  # a budget per call, not per session

    def deliver(self, final: Message, status: int) -> None:
        """A session's call is over: its final frame, written out whole, then its status line on the call fd."""
        status = put_final(self.outbox, final, status)
        while not self.outbox.drained(0.1):
            if self.signalled:
                raise Signalled
        if not self.outbox.live[1]:
            raise Failure("the driver's stdout is gone")
        if not write_all(self.call_fd, b"%03d\n" % status):
            raise Failure("the session's call fd is gone")

    # --- the end ---

    def cancel(self) -> None:
        """A request in flight is cancelled; then what is queued for the server gets up to a grace period."""
        if self.in_flight is None or self.to_server is None:
            return
        self.send({"method": "notifications/cancelled",
                   "params": {"requestId": self.in_flight, "reason": "cancelled by the caller"}})
        self.in_flight = None

    def reap(self, graceful: bool = True) -> None:
        """Close the server's stdin (after what is queued for it, within the grace), discard its output, wait
        up to the grace for it to exit, then kill it. Not ``graceful`` (the call is answered): kill it now; its
        sandbox goes next, so a clean exit would only add its shutdown time to the call's."""
        proc = self.proc
        if proc is None:
            return
        deadline = time.monotonic() + (GRACE if graceful else 0.0)
        while self.to_server is not None:
            left = deadline - time.monotonic()
            if not self.pending or left <= 0 or proc.poll() is not None:
                with contextlib.suppress(OSError):
                    self.to_server.close()
                self.to_server = None
                break
            readers = [] if self.eof else [self.from_server]
            ready_r, ready_w, _ = select.select(readers, [self.to_server.fileno()], [], left)
            if ready_w:
                self.flush_some(self.to_server)
            if ready_r:
                self.discard()
        while proc.poll() is None and (left := deadline - time.monotonic()) > 0:
            ready_r, _, _ = select.select([] if self.eof else [self.from_server], [], [], min(left, 0.05))
            if ready_r:
                self.discard()
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    def discard(self) -> None:
        try:
            if not os.read(self.from_server, CHUNK):
                self.eof = True
        except BlockingIOError:
            pass


class ServerError(Exception):
    def __init__(self, error: Message) -> None:
        super().__init__("the server answered with an error")
        self.error = error


def put_final(outbox: Outbox, final: Message, status: int) -> int:
    """Queue the final frame (a driver error frame when it cannot be encoded); the status after it."""
    try:
        outbox.frame(final)
    except (ValueError, RecursionError):
        outbox.frame({"error": {"code": DRIVER_ERROR, "message": "the driver failed (a frame it could not encode)"}})
        status = FAILED
    return status


def main() -> int:
    command = sys.argv[1:]
    session = command[:1] == ["--session"]
    if session:
        command = command[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no /proc/<pid>/mem or fd for the server
    except Exception:  # noqa: S110 # nosec B110 - best effort
        pass
    driver = Driver(session)
    status = 0
    try:
        if not command:
            raise Failure("no server command")
        final = driver.run(command)
    except Failure as exc:
        final, status = {"error": {"code": DRIVER_ERROR, "message": str(exc)}}, FAILED
    except ServerError as exc:
        final = {"error": exc.error}
    except Signalled:
        final, status = {"error": {"code": DRIVER_ERROR, "message": "cancelled by the caller"}}, CANCELLED
        driver.cancel()
    except (ValueError, TypeError, OSError, RecursionError) as exc:  # e.g. a frame that cannot be encoded
        final = {"error": {"code": DRIVER_ERROR, "message": f"the driver failed ({type(exc).__name__})"}}
        status = FAILED
    outbox = driver.outbox
    if final is not None:  # None: a session ended by EOF on stdin, its requests all answered
        status = put_final(outbox, final, status)
    driver.reap(graceful=bool(driver.signalled) or status != 0 or final is None)
    # The final frame must reach the caller; after a signal it gets the grace period, no more.
    while not outbox.drained(0.1):
        if driver.signalled:
            outbox.drained(GRACE)
            break
    if driver.signalled:
        status = CANCELLED
    if status == 0 and not outbox.live[1]:
        status = FAILED
    return status


if __name__ == "__main__":
    os._exit(main())
