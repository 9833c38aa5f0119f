"""How an invocation ended: one value, filled in as the call runs, accounted once when it ends.

    result          the sandbox ran and the call has a Result (its status says ok, error, timeout, oom,
                    killed -- a Cancel RPC or shutdown kill --, denied)
    error           a gRPC error after the invocation got its id (invalid arguments, unknown tool, missing
                    image, engine unavailable...); ``status`` is the gRPC code's name
    disconnected    the caller went away: stream closed, MCP cancellation through the bridge, client killed
    deadline        the caller's gRPC deadline passed before a result could be sent
    shutdown        the supervisor stopped while the call was running
    internal_error  an unexpected exception (a bug): the caller gets INTERNAL, the log has the traceback
    swept           a crashed supervisor's sandbox, removed by the next start's sweep

Pure: no grpc, docker or OTel SDK. ``server/service.py`` turns an ``Ending`` into an audit record, a
metric, a log line and a span status in one ``finally``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from toolcell.model import Result

ENDINGS = ("result", "error", "disconnected", "deadline", "shutdown", "internal_error", "swept")
# A call whose deadline has less than this left when it is cancelled ended by its deadline.
_DEADLINE_SLACK_S = 0.05


@dataclass
class Ending:
    invocation_id: str
    tool: str  # as the caller sent it (already bounded at the API edge)
    known: bool  # the tool is in the config: only then does its name become a metric attribute
    profile: str = ""
    result: Result | None = None
    error: BaseException | None = None
    cancelled: bool = False
    kind: str = "internal_error"
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    duration_s: float = 0.0

    @property
    def metric_tool(self) -> str:
        return self.tool if self.known else "unknown"

    def finish(self, *, closing: bool, time_remaining: float | None, code_name: str = "") -> None:
        """Decide ``kind`` and ``status`` from what happened; idempotent."""
        self.duration_s = time.monotonic() - self.started
        if self.result is not None:
            self.kind, self.status = "result", self.result.status.value
        elif self.cancelled:
            if closing:
                self.kind = "shutdown"
            elif time_remaining is not None and time_remaining <= _DEADLINE_SLACK_S:
                self.kind = "deadline"
            else:
                self.kind = "disconnected"
            self.status = self.kind
        elif self.error is not None and code_name:
            self.kind, self.status = "error", code_name
        else:
            self.kind, self.status = "internal_error", "INTERNAL"
