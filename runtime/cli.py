"""Command line: ``toolcell serve | call | tools | profiles check | images build | version``.

Exit codes: 0 ok; 1 the tool ran and its status is not ok; 2 usage error; 3 rejected (bad config,
bad arguments, unknown tool ...); 4 the supervisor or the engine is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from typing import Any

from runtime import __version__
from runtime.errors import ConfigError, EngineUnavailable, ToolcellError

EXIT_OK, EXIT_STATUS, EXIT_USAGE, EXIT_REJECTED, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
UNAVAILABLE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def _fail(message: str, code: int) -> int:
    print(f"toolcell: {message}", file=sys.stderr)
    return code


async def _serve(args: argparse.Namespace) -> int:
    from runtime.backends.docker import DockerBackend
    from runtime.server.app import App
    from runtime.settings import load_config
    from runtime.supervisor import Supervisor
    from runtime.telemetry import setup_tracing

    config = load_config(args.config, listen=args.listen)
    provider = setup_tracing(config.telemetry)
    backend = DockerBackend(config.docker_host)
    app = App(Supervisor(config, backend))
    try:
        address = await app.start()
    except BaseException:
        await backend.close()
        raise
    print(f"toolcell: serving on {address} (config {config.source}, {len(config.tools)} tools)",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("toolcell: shutting down", file=sys.stderr, flush=True)
    await app.stop()
    provider.shutdown()
    return EXIT_OK


def _result_dict(result: Any) -> dict[str, Any]:
    d = dataclasses.asdict(result)
    d["status"] = result.status.value
    return d


async def _call(args: argparse.Namespace) -> int:
    from runtime.client import Client, ClientError
    from runtime.model import OutputChunk, Result, Started

    try:
        json.loads(args.args)
    except json.JSONDecodeError as exc:
        return _fail(f"--args is not valid JSON: {exc.msg} at column {exc.colno}", EXIT_USAGE)
    async with Client(args.target) as client:
        try:
            async for event in client.execute(args.tool, args.args, timeout=args.timeout):
                if isinstance(event, Started) and not args.json:
                    print(f"toolcell: started {event.invocation_id} in {event.sandbox_id[:12]} "
                          f"(profile {event.profile})", file=sys.stderr, flush=True)
                elif isinstance(event, OutputChunk) and not args.json:
                    stream = sys.stdout if event.stream == "stdout" else sys.stderr
                    stream.write(event.text)
                    stream.flush()
                elif isinstance(event, Result):
                    if args.json:
                        print(json.dumps(_result_dict(event), indent=None))
                    else:
                        print(f"toolcell: status={event.status.value} exit_code={event.exit_code} "
                              f"duration_ms={event.duration_ms} truncated={str(event.truncated).lower()} "
                              f"peak_memory_bytes={event.usage.peak_memory_bytes} "
                              f"trace_id={event.trace_id}" + (f" ({event.message})" if event.message else ""),
                              file=sys.stderr)
                    return EXIT_OK if event.status.value == "ok" else EXIT_STATUS
        except ClientError as exc:
            code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
            return _fail(f"{exc.code}: {exc.details}", code)
    return _fail("stream ended without a result", EXIT_UNAVAILABLE)


async def _tools(args: argparse.Namespace) -> int:
    from runtime.client import Client, ClientError

    async with Client(args.target) as client:
        try:
            tools = await client.list_tools()
        except ClientError as exc:
            code = EXIT_UNAVAILABLE if exc.code in UNAVAILABLE_CODES else EXIT_REJECTED
            return _fail(f"{exc.code}: {exc.details}", code)
    if args.json:
        print(json.dumps([{"name": t.name, "title": t.title, "description": t.description,
                           "inputSchema": t.input_schema, "annotations": dict(t.annotations)} for t in tools]))
    else:
        for t in tools:
            print(f"{t.name:24} {t.description}")
    return EXIT_OK


def _profiles_check(args: argparse.Namespace) -> int:
    from runtime.settings import load_config

    config = load_config(args.file)
    print(f"{args.file}: ok ({len(config.profiles)} profiles, {len(config.tools)} tools)")
    return EXIT_OK


async def _doctor(args: argparse.Namespace) -> int:
    from runtime.backends.docker import DEFAULT_BASE_URL, DockerBackend
    from runtime.doctor import Level, render, run_doctor
    from runtime.settings import load_config

    config = load_config(args.config)
    address = config.docker_host or DEFAULT_BASE_URL
    backend = DockerBackend(address, timeout_s=10.0)
    try:
        findings = await run_doctor(address, backend.info, {p.runtime for p in config.profiles.values()})
    finally:
        await backend.close()
    if args.json:
        print(json.dumps([{"check": f.check, "level": f.level.value.lower(), "detail": f.detail, "fix": f.fix}
                          for f in findings]))
    else:
        print(render(findings))
    return EXIT_STATUS if any(f.level is Level.FAIL for f in findings) else EXIT_OK


def _images_build(args: argparse.Namespace) -> int:
    from runtime.images import build_images

    return build_images()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolcell", description="Sandboxed tool-execution supervisor for MCP servers.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the supervisor")
    s.add_argument("--config", help="YAML config file (default: $TOOLCELL_CONFIG or built-in)")
    s.add_argument("--listen", help="gRPC address to listen on: unix:///path.sock or host:port")
    s.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("call", help="call a tool through a running supervisor")
    c.add_argument("tool")
    c.add_argument("--args", default="{}", help="arguments as one JSON object")
    c.add_argument("--target", help="supervisor address (default: the built-in socket)")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")
    c.add_argument("--timeout", type=float, help="gRPC deadline in seconds")
    t = sub.add_parser("tools", help="list the tools a caller may use")
    t.add_argument("--target")
    t.add_argument("--json", action="store_true")
    pr = sub.add_parser("profiles", help="isolation profiles")
    prs = pr.add_subparsers(dest="subcommand", required=True)
    chk = prs.add_parser("check", help="validate a config file completely, as the supervisor would")
    chk.add_argument("file")
    im = sub.add_parser("images", help="runner images")
    ims = im.add_subparsers(dest="subcommand", required=True)
    ims.add_parser("build", help="build the runner images offline (debootstrap + docker import/build)")
    d = sub.add_parser("doctor", help="check the host: engine, seccomp, cgroups, runtimes, socket, sysctls")
    d.add_argument("--config", help="YAML config file (its engine address and profiles' runtimes)")
    d.add_argument("--json", action="store_true")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "call":
            return asyncio.run(_call(args))
        if args.command == "tools":
            return asyncio.run(_tools(args))
        if args.command == "profiles":
            return _profiles_check(args)
        if args.command == "doctor":
            return asyncio.run(_doctor(args))
        if args.command == "images":
            return _images_build(args)
        print(f"toolcell {__version__}")
        return EXIT_OK
    except ConfigError as exc:
        return _fail(f"invalid configuration: {exc}", EXIT_REJECTED)
    except EngineUnavailable as exc:
        return _fail(f"container engine unavailable: {exc}", EXIT_UNAVAILABLE)
    except ToolcellError as exc:
        return _fail(str(exc), EXIT_REJECTED)
    except KeyboardInterrupt:
        return 130
