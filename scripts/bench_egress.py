"""Measure what a network grant costs: the same trivial tool, ungranted and granted, end to end.

    .venv/bin/python scripts/bench_egress.py [ROUNDS]

Runs in process against the real engine (no gRPC), alternating the two so engine load affects both
alike, and prints median and max wall time per call. The granted tool makes no connection: this is the
price of its network and proxy alone (opened in the Docker backend's create, closed in its remove).
Everything it creates carries a unique owner label and is swept.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

from toolcell.backends.factory import open_backend
from toolcell.model import Event, InvocationRequest, Status
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor


async def main(rounds: int) -> None:
    owner = f"bench-egress-{uuid.uuid4().hex[:8]}"
    tool = {"description": "noop", "image": "toolcell/python:bookworm", "command": ["python3", "-I", "-c", "pass"]}
    config = parse_config({
        "version": 1,
        "server": {"instance": owner},
        "profiles": {"granted": {"network": ["allowed.test"]}},
        "tools": [{**tool, "name": "ungranted"}, {**tool, "name": "granted", "profile": "granted"}],
    }, environ={})
    backend = open_backend(config)  # docker, with the config's egress settings (egress is its capability)
    sup = Supervisor(config, backend)
    await sup.start()

    async def emit(_: Event) -> None:
        return None

    times: dict[str, list[float]] = {"ungranted": [], "granted": []}
    try:
        for name in times:  # warm-up: image cache, the upstream network
            await sup.execute(InvocationRequest(tool=name, arguments_json="{}"), emit)
        for _ in range(rounds):
            for name in times:
                t0 = time.perf_counter()
                result = await sup.execute(InvocationRequest(tool=name, arguments_json="{}"), emit)
                times[name].append(time.perf_counter() - t0)
                assert result.status is Status.OK, result.message
    finally:
        await sup.shutdown()
        await backend.close()
    for name, values in times.items():
        print(f"{name:10s} median {statistics.median(values) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms"
              f"   ({len(values)} calls)")
    overhead = statistics.median(times["granted"]) - statistics.median(times["ungranted"])
    print(f"grant overhead (median): {overhead * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
